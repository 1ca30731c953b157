"""``listen.workers = 2``: a supervisor and two forked workers on one port, run as operators do.

The proxy runs as ``python -m proxy run`` in a subprocess (see tests/support/process.py); the
fakes run in the test process and count what they saw. Also here: the metrics merge as a pure
function, and the configuration rule that workers need a fixed port.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from pathlib import Path
from typing import Final

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import merge_metrics
from proxy.config import parse_config
from proxy.errors import ConfigError
from tests.support.chain import ConfigWriter
from tests.support.config import DEMO
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.metrics import samples
from tests.support.process import ProxyProcess, free_port, get, run_proxy, run_to_exit, wait_ready
from tests.support.wait import until

WORKERS: Final = 2


@pytest.fixture
def workers_config(config_writer: ConfigWriter) -> Path:
    return config_writer(drain_timeout_s=5, listen={"port": free_port(), "workers": WORKERS})


def listen_port(config: Path) -> int:
    """Return the fixed listen.port written into ``config``."""
    return int(config.read_text(encoding="utf-8").split("[listen]\nport = ")[1].split("\n")[0])


def worker_pids(proxy: ProxyProcess) -> list[int]:
    (started,) = [e for e in proxy.entries if e["message"] == "ksz-proxy started"]
    return [int(p) for p in started["pids"].split()]


def running_with(config: Path) -> list[int]:
    """Return the processes whose command line names ``config``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(config).encode() in argv:
                found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def fresh_connection_get(url: str) -> int:
    """GET over a new connection: SO_REUSEPORT spreads connections, not requests."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s:
        async with s.get(url) as response:
            await response.read()
            return response.status


@pytest.mark.slow
async def test_two_workers_share_the_port_and_the_admin_listener_merges_them(
    workers_config: Path, authserver: AuthServerHandle, fake_upstream: UpstreamHandle
) -> None:
    async with run_proxy(workers_config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        pids = worker_pids(proxy)
        assert len(pids) == WORKERS and os.getpid() not in pids
        statuses = [await fresh_connection_get(f"{proxy.proxy_url}{DEMO}/p/{i}") for i in range(40)]
        assert statuses == [200] * 40
        assert fake_upstream.upstream.count == 40
        # One token per worker: each holds its own cache (README, "Workers").
        assert [r.outcome for r in authserver.server.requests] == ["issued"] * WORKERS

        status, body = await get(session, proxy.admin_url + "/metrics")
        assert status == 200
        text = body.decode()
        families = {f.name for f in text_string_to_metric_families(text)}  # valid exposition
        assert {"kszproxy_requests", "kszproxy_workers_running"} <= families
        parsed = samples(text)
        served: dict[str, float] = {}
        for (name, labels), count in parsed.items():
            if name == "kszproxy_requests_total":
                worker = dict(labels)["worker"]
                served[worker] = served.get(worker, 0.0) + count
        assert set(served) == {"0", "1"}  # both workers took connections
        assert sum(served.values()) == 40
        assert parsed[("kszproxy_workers_running", frozenset())] == WORKERS

        status, body = await get(session, proxy.admin_url + "/health")
        health = json.loads(body)
        assert status == 200 and health["status"] == "UP"
        assert [w["worker"] for w in health["workers"]] == [0, 1]
        assert "certificate" in health["details"]
        status, _ = await get(session, proxy.admin_url + "/livez")
        assert status == 200
        for path in ("/livez", "/readyz", "/health", "/metrics"):  # SECURITY 40, per worker too
            assert await fresh_connection_get(proxy.proxy_url + path) == 404

        proxy.send(signal.SIGHUP)
        await until(
            lambda: sum(e["message"] == "credentials reloaded" for e in proxy.entries) == WORKERS
        )

        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    assert not any(alive(pid) for pid in pids)
    messages = [e["message"] for e in proxy.entries]
    assert messages.count("worker started") == messages.count("worker stopped") == WORKERS
    stopped = [e for e in proxy.entries if e["message"] == "worker stopped"]
    assert sorted(e["worker"] for e in stopped) == [0, 1]
    assert {e["logger"] for e in proxy.entries if "worker" in e["message"]} == {"ksz_proxy.cli"}
    assert messages[-1] == "ksz-proxy stopped"
    # Every line a worker writes says which worker wrote it: access, token, reload (issue 16).
    by_workers = [
        e
        for e in proxy.entries
        if e["logger"] in {"ksz_proxy.access", "ksz_proxy.tokens"}
        or e["message"] == "credentials reloaded"
    ]
    assert sum(e["logger"] == "ksz_proxy.access" for e in by_workers) == 40 + 4  # + the 404s
    assert sum(e["logger"] == "ksz_proxy.tokens" for e in by_workers) >= WORKERS
    assert {e.get("worker") for e in by_workers} == {0, 1}
    # The supervisor's own lines carry none.
    assert "worker" not in next(e for e in proxy.entries if e["message"] == "ksz-proxy started")


@pytest.mark.slow
async def test_a_reloaded_drain_timeout_is_the_one_the_supervisor_waits_for(
    config_writer: ConfigWriter, fake_upstream: UpstreamHandle
) -> None:
    # The workers reload listen.drain_timeout_s with the rest; the supervisor, which kills a
    # worker still draining after drain_timeout_s + 5 s, used to keep the start-up value.
    port = free_port()
    config = config_writer(drain_timeout_s=0.5, listen={"port": port, "workers": WORKERS})
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        config_writer(drain_timeout_s=15, listen={"port": port, "workers": WORKERS})
        proxy.send(signal.SIGHUP)
        await until(
            lambda: any(
                e["message"] == "drain timeout changed by the reload" for e in proxy.entries
            )
        )
        await until(
            lambda: sum(e["message"] == "credentials reloaded" for e in proxy.entries) == WORKERS
        )
        # Longer than the old 0.5 s + 5 s the supervisor gave before it killed the workers.
        slow = asyncio.create_task(fresh_connection_get(f"{proxy.proxy_url}{DEMO}/stall?seconds=7"))
        await until(lambda: fake_upstream.upstream.count == 1)
        proxy.send(signal.SIGTERM)
        assert await slow == 200
        assert await proxy.exit_code() == 0
    assert not any(e["message"] == "worker did not stop in time; killing it" for e in proxy.entries)


@pytest.mark.slow
async def test_a_worker_that_dies_stops_the_proxy_with_exit_1(workers_config: Path) -> None:
    async with run_proxy(workers_config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        pids = worker_pids(proxy)
        os.kill(pids[1], signal.SIGKILL)
        assert await proxy.exit_code() == 1
    assert not any(alive(pid) for pid in pids)
    (died,) = [e for e in proxy.entries if e["message"].startswith("worker exited")]
    assert (died["worker"], died["exit_code"]) == (1, -signal.SIGKILL)


@pytest.mark.slow
async def test_a_taken_port_exits_2_naming_the_key(workers_config: Path) -> None:
    port = listen_port(workers_config)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        code, lines = await run_to_exit(workers_config)
    assert code == 2
    assert any("listen.port: cannot listen on 127.0.0.1:" in line for line in lines), lines
    assert running_with(workers_config) == []


@pytest.mark.slow
async def test_a_taken_admin_port_exits_2_naming_the_key(workers_config: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        set_admin_port(workers_config, int(taken.getsockname()[1]))
        code, lines = await run_to_exit(workers_config)
    assert code == 2
    assert any("admin.port: cannot listen on 127.0.0.1:" in line for line in lines), lines
    assert running_with(workers_config) == []  # the workers were stopped too


def set_admin_port(config: Path, port: int) -> None:
    text = config.read_text(encoding="utf-8")
    config.write_text(text.replace("[admin]\nport = 0\n", f"[admin]\nport = {port}\n"))


@pytest.mark.slow
async def test_readiness_waits_for_every_worker(workers_config: Path) -> None:
    async with run_proxy(workers_config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        pids = worker_pids(proxy)
        os.kill(pids[0], signal.SIGSTOP)  # alive but not answering
        try:
            status, body = await get(session, proxy.admin_url + "/readyz")
            assert status == 503
            assert json.loads(body)["reason"] == "worker_down"
        finally:
            os.kill(pids[0], signal.SIGCONT)
        await wait_ready(session, proxy)
        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0


# -- configuration and the merge, as pure functions ---------------------------------------------


def test_workers_need_a_fixed_port() -> None:
    base = {
        "client": {"id": "x", "pkcs12": "/k.p12", "password_env": "P"},
        "upstream": {"url": "https://api.example"},
        "oauth": {"token_url": "https://auth.example/token"},
        "routes": [{"prefix": "/REST/x/v1", "scopes": ["s"]}],
    }
    with pytest.raises(ConfigError, match=r"^listen\.workers: .*fixed listen\.port"):
        parse_config({**base, "listen": {"port": 0, "workers": 2}}, environ={"P": "p"})
    with pytest.raises(ConfigError, match=r"^listen\.workers: must be between 1 and 64"):
        parse_config({**base, "listen": {"workers": 0}}, environ={"P": "p"})
    config = parse_config({**base, "listen": {"workers": 4}}, environ={"P": "p"})
    assert config.listen.workers == 4


def test_merge_adds_the_worker_label_and_keeps_families_together() -> None:
    a = (
        "# HELP x_total Things.\n# TYPE x_total counter\n"
        'x_total{route="/a"} 1.0\n'
        "# HELP g A gauge.\n# TYPE g gauge\ng 5.0\n"
        "# HELP h Seconds.\n# TYPE h histogram\n"
        'h_bucket{le="+Inf"} 2.0\nh_sum 0.5\nh_count 2.0\n'
    )
    b = a.replace(" 1.0\n", " 3.0\n").replace("g 5.0", "g 7.0")
    merged = merge_metrics([(0, a), (1, b)])
    assert merged.splitlines() == [
        "# HELP x_total Things.",
        "# TYPE x_total counter",
        'x_total{worker="0",route="/a"} 1.0',
        'x_total{worker="1",route="/a"} 3.0',
        "# HELP g A gauge.",
        "# TYPE g gauge",
        'g{worker="0"} 5.0',
        'g{worker="1"} 7.0',
        "# HELP h Seconds.",
        "# TYPE h histogram",
        'h_bucket{worker="0",le="+Inf"} 2.0',
        'h_sum{worker="0"} 0.5',
        'h_count{worker="0"} 2.0',
        'h_bucket{worker="1",le="+Inf"} 2.0',
        'h_sum{worker="1"} 0.5',
        'h_count{worker="1"} 2.0',
    ]
    assert len(list(text_string_to_metric_families(merged))) == 3
    assert merge_metrics([]) == ""
