"""The command line as an operator runs it: ``python -m proxy run -c CONFIG`` in a subprocess.

The fakes (authorization server, KSZ API) run in the test process; the proxy runs in its own
process and is steered with signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads the
credentials. Its stderr is read line by line and kept for log assertions. Every wait is bounded
and the process is always killed in the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import aiohttp
import pytest

from proxy.sandbox.pki import CertificateAuthority, Issued
from tests.support.chain import ConfigWriter
from tests.support.config import DEMO
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.partner import (
    PKCS12_PASSWORD,
    PartnerFiles,
    partner_client,
)
from tests.support.process import ProxyProcess, get, run_proxy, run_to_exit, wait_ready
from tests.support.wait import until

RFC3339_UTC: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")
TEXT_LINE: Final = re.compile(r"\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) +[\w.]+: .*")
LEVELS: Final = {"debug", "info", "warning", "error", "critical"}

pytestmark = pytest.mark.slow


# -- the process ---------------------------------------------------------------------------------


@pytest.fixture
def config_file(config_writer: ConfigWriter) -> Path:
    return config_writer()


def assert_json_log_lines(proxy: ProxyProcess) -> None:
    """Check that every stderr line is one JSON log entry of the documented shape."""
    assert proxy.lines
    for entry in proxy.entries:
        assert {"level", "time", "logger", "message"} <= set(entry), entry
        assert entry["level"] in LEVELS
        assert RFC3339_UTC.fullmatch(entry["time"]), entry["time"]


def write_private(path: Path, data: bytes) -> None:
    """Replace ``path`` atomically with ``data`` (mode 0600), as a deployment tool would."""
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(temporary, path)


# -- stopping ------------------------------------------------------------------------------------


async def test_sigterm_drains_the_request_in_flight_then_exits_0(
    config_file: Path, fake_upstream: UpstreamHandle
) -> None:
    async with run_proxy(config_file) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        in_flight = asyncio.create_task(get(session, proxy.proxy_url + DEMO + "/stall?seconds=2"))
        await until(lambda: fake_upstream.upstream.count == 1)
        proxy.send(signal.SIGTERM)

        # Readiness turns 503 at once, while the request is still in flight.
        async with asyncio.timeout(1):
            while True:
                status, body = await get(session, proxy.admin_url + "/readyz")
                if status == 503:
                    break
                await asyncio.sleep(0.01)
        assert json.loads(body)["reason"] == "draining"
        assert not in_flight.done()

        # The listener no longer accepts connections.
        async with asyncio.timeout(2), aiohttp.ClientSession() as fresh:
            while True:
                try:
                    async with fresh.get(proxy.proxy_url + DEMO + "/late") as response:
                        await response.read()
                except aiohttp.ClientConnectorError:
                    break
                await asyncio.sleep(0.02)

        async with asyncio.timeout(8):
            status, body = await in_flight
        assert status == 200
        assert json.loads(body)["target"] == DEMO + "/stall?seconds=2"
        assert await proxy.exit_code() == 0
    assert fake_upstream.upstream.count == 1  # the late request never reached it
    assert_json_log_lines(proxy)
    messages = [e["message"] for e in proxy.entries]
    assert "stopping: draining in-flight requests" in messages
    assert messages[-1] == "ksz-proxy stopped"
    stopping = next(e for e in proxy.entries if e["message"].startswith("stopping"))
    assert stopping["drain_s"] == 10
    (access,) = [e for e in proxy.entries if e["logger"] == "ksz_proxy.access"]
    assert access["path"] == DEMO + "/stall"
    assert access["status"] == 200
    assert access["duration_s"] >= 2


@dataclass(frozen=True, slots=True)
class Cut:
    """How a SIGTERM with a request stuck upstream ended."""

    exit_code: int
    exit_after_s: float  # from SIGTERM to the process exit
    outcome: tuple[int, bytes] | BaseException  # what the caller of the stuck request got
    handled_s: float  # the stuck request's duration in its access log line
    proxy: ProxyProcess


async def sigterm_with_a_stuck_request(
    config_writer: ConfigWriter, fake_upstream: UpstreamHandle, drain_timeout_s: float
) -> Cut:
    """Run the proxy, leave a request stuck upstream, send SIGTERM, and report how it ended."""
    config = config_writer("short-drain.toml", drain_timeout_s=drain_timeout_s)
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        stuck = asyncio.create_task(get(session, proxy.proxy_url + DEMO + "/stall?seconds=60"))
        await until(lambda: fake_upstream.upstream.count == 1)
        loop = asyncio.get_running_loop()
        signalled = loop.time()
        proxy.send(signal.SIGTERM)
        code = await proxy.exit_code(timeout_s=4 * drain_timeout_s + 5)
        exit_after_s = loop.time() - signalled
        async with asyncio.timeout(5):
            outcome = (await asyncio.gather(stuck, return_exceptions=True))[0]
    (access,) = [e for e in proxy.entries if e["logger"] == "ksz_proxy.access"]
    return Cut(
        exit_code=code,
        exit_after_s=exit_after_s,
        outcome=outcome,
        handled_s=access["duration_s"],
        proxy=proxy,
    )


async def test_sighup_while_draining_is_ignored_not_fatal(
    config_file: Path, fake_upstream: UpstreamHandle
) -> None:
    # Found by review: the SIGHUP handler was removed before the drain, which gave SIGHUP back
    # its default action, so a reload (logrotate, systemctl reload) mid-drain killed the process
    # and the request in flight with it.
    async with run_proxy(config_file) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        in_flight = asyncio.create_task(get(session, proxy.proxy_url + DEMO + "/stall?seconds=2"))
        await until(lambda: fake_upstream.upstream.count == 1)
        proxy.send(signal.SIGTERM)
        await until(lambda: any(e["message"].startswith("stopping") for e in proxy.entries), 5.0)
        proxy.send(signal.SIGHUP)
        async with asyncio.timeout(8):
            status, _ = await in_flight
        assert status == 200
        assert await proxy.exit_code() == 0
    messages = [e["message"] for e in proxy.entries]
    assert "reload ignored: the proxy is stopping" in messages
    assert messages[-1] == "ksz-proxy stopped"


async def test_sigterm_cuts_what_is_still_running_after_the_drain(
    config_writer: ConfigWriter, fake_upstream: UpstreamHandle
) -> None:
    cut = await sigterm_with_a_stuck_request(config_writer, fake_upstream, drain_timeout_s=0.5)
    assert cut.exit_code == 0
    assert cut.exit_after_s < 5
    # The caller sees its connection end (or a 5xx), never a 200 for an unfinished answer.
    if isinstance(cut.outcome, BaseException):
        assert isinstance(cut.outcome, aiohttp.ClientError), cut.outcome
    else:
        assert cut.outcome[0] >= 500, cut.outcome
    assert_json_log_lines(cut.proxy)
    assert cut.proxy.entries[-1]["message"] == "ksz-proxy stopped"


async def test_sigterm_drain_is_bounded_by_drain_timeout_s(
    config_writer: ConfigWriter, fake_upstream: UpstreamHandle
) -> None:
    cut = await sigterm_with_a_stuck_request(config_writer, fake_upstream, drain_timeout_s=1.5)
    assert cut.exit_code == 0
    # Generous margin either way: a correct drain ends near 1.5 s, the faulty one near 3 s.
    assert cut.handled_s < 2.25
    assert cut.exit_after_s < 2.5


async def test_sigint_stops_cleanly_with_text_logs(config_file: Path) -> None:
    async with (
        run_proxy(config_file, log_format="text", log_level="debug") as proxy,
        aiohttp.ClientSession() as session,
    ):
        await wait_ready(session, proxy)
        proxy.send(signal.SIGINT)
        assert await proxy.exit_code() == 0
    logged = [line for line in proxy.lines if TEXT_LINE.fullmatch(line)]
    assert not any(line.startswith("{") for line in proxy.lines)
    assert any("INFO    ksz_proxy.cli: ksz-proxy started" in line for line in logged)
    assert logged[-1].endswith("ksz_proxy.cli: ksz-proxy stopped")


# -- starting ------------------------------------------------------------------------------------


async def test_startup_summary_and_a_warning_for_a_certificate_expiring_soon(
    tmp_path: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_ca: CertificateAuthority,
    config_writer: ConfigWriter,
) -> None:
    soon = partner_ca.issue_client(
        "partner expiring soon", not_after=datetime.now(UTC) + timedelta(days=10)
    )
    authserver.server.register(partner_client(soon))
    keystore = soon.write_pkcs12(tmp_path / "soon.p12", PKCS12_PASSWORD.encode())
    config = config_writer("soon.toml", pkcs12=keystore)
    async with run_proxy(config) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        status, body = await get(session, proxy.admin_url + "/health")
        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    assert status == 200
    health = json.loads(body)
    assert health["status"] == "DEGRADED"
    assert health["details"]["certificate"]["daysLeft"] in (9, 10)

    assert_json_log_lines(proxy)
    warning = next(e for e in proxy.entries if e["level"] == "warning")
    assert warning["logger"] == "ksz_proxy.credentials"
    assert "expires" in warning["message"]
    assert re.search(r"in (9|10) days", warning["message"])
    started = next(e for e in proxy.entries if e["message"] == "ksz-proxy started")
    assert proxy.entries.index(warning) < proxy.entries.index(started)
    assert started["environment"] == "test"
    assert started["channel"] == "extranet"
    assert started["token_url"] == authserver.token_url
    assert started["upstream_url"] == fake_upstream.url
    assert started["routes"] == DEMO
    assert started["egress"] == (
        f"oauth {authserver.url} -> direct (no egress proxy); "
        f"upstream {fake_upstream.url} -> direct (no egress proxy)"
    )
    assert "partner expiring soon" in started["certificate_subject"]
    not_after = datetime.fromisoformat(started["certificate_not_after"])
    assert not_after == soon.certificate.not_valid_after_utc
    assert started["certificate_days_left"] in (9, 10)
    assert started["proxy"].startswith("http://127.0.0.1:")
    assert started["admin"].startswith("http://127.0.0.1:")
    assert PKCS12_PASSWORD not in "\n".join(proxy.lines)


@pytest.mark.parametrize(
    ("case", "key"),
    [
        ("plain http upstream", "upstream.url"),
        ("misspelt key", "listen.prot"),
        ("keystore readable by others", "client.pkcs12"),
        ("password file readable by others", "client.password_file"),
    ],
)
async def test_bad_configuration_exits_2_with_one_line_naming_the_key(
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    config_writer: ConfigWriter,
    partner_files: PartnerFiles,
    case: str,
    key: str,
) -> None:
    config = config_writer("bad.toml")
    text = config.read_text()
    if case == "plain http upstream":
        text = text.replace(f'url = "{fake_upstream.url}"', 'url = "http://127.0.0.1:9"')
    elif case == "misspelt key":
        text = text.replace("drain_timeout_s = 10", "drain_timeout_s = 10\nprot = 8080")
    elif case == "keystore readable by others":
        partner_files.pkcs12.chmod(0o644)
    else:
        partner_files.password_file.chmod(0o644)
    config.write_text(text)
    code, lines = await run_to_exit(config)
    assert code == 2
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"ksz-proxy: {key}: "), lines[0]
    assert PKCS12_PASSWORD not in lines[0]
    assert fake_upstream.upstream.count == 0
    assert authserver.server.token_requests == 0


# -- reloading credentials -----------------------------------------------------------------------


async def test_sighup_rotates_to_a_newly_registered_certificate(
    config_file: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_ca: CertificateAuthority,
    partner_files: PartnerFiles,
) -> None:
    server = authserver.server
    async with run_proxy(config_file) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        status, _body = await get(session, proxy.proxy_url + DEMO + "/before")
        assert status == 200
        in_flight = asyncio.create_task(get(session, proxy.proxy_url + DEMO + "/stall?seconds=1"))

        # KSZ registers the renewed certificate and forgets the old one; the file is replaced.
        renewed = partner_ca.issue_client(
            "partner renewed", not_after=datetime.now(UTC) + timedelta(days=200)
        )
        server.register(partner_client(renewed))
        write_private(partner_files.pkcs12, renewed.pkcs12(PKCS12_PASSWORD.encode()))
        requests_before, issued_before = len(server.requests), len(server.issued)
        proxy.send(signal.SIGHUP)

        reloaded = await proxy.wait_entry("credentials reloaded")
        await until(lambda: any(r.outcome == "issued" for r in server.requests[requests_before:]))
        # Whatever was signed since the reload verified against the renewed certificate only.
        assert {r.outcome for r in server.requests[requests_before:]} == {"issued"}
        new_tokens = list(server.issued)[issued_before:]

        async with asyncio.timeout(5):
            status, _body = await in_flight
        assert status == 200  # the request in flight was not disturbed
        status, _body = await get(session, proxy.proxy_url + DEMO + "/after")
        assert status == 200
        seen = fake_upstream.upstream.seen[-1]
        assert seen.target == DEMO + "/after"
        assert [v.removeprefix("Bearer ") for v in seen.header_values("Authorization")] == [
            new_tokens[-1]
        ]

        status, body = await get(session, proxy.admin_url + "/health")
        assert status == 200
        not_after = renewed.certificate.not_valid_after_utc
        certificate = json.loads(body)["details"]["certificate"]
        assert datetime.fromisoformat(certificate["notAfter"]) == not_after
        _status, metrics = await get(session, proxy.admin_url + "/metrics")
        expiry = re.search(
            rb'^kszproxy_certificate_expiry_timestamp_seconds\{client="default"\} (\S+)$',
            metrics,
            re.MULTILINE,
        )
        assert expiry is not None
        assert float(expiry.group(1)) == not_after.timestamp()
        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    assert "partner renewed" in reloaded["subject"]
    stderr = "\n".join(proxy.lines)
    for token in server.issued:
        assert token not in stderr
    for request in server.requests:
        assert request.form["client_assertion"] not in stderr
    assert datetime.fromisoformat(reloaded["not_after"]) == not_after
    assert_json_log_lines(proxy)


async def test_sighup_with_a_broken_keystore_keeps_the_old_credentials(
    config_file: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner: Issued,
    partner_files: PartnerFiles,
) -> None:
    server = authserver.server
    async with run_proxy(config_file) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        write_private(partner_files.pkcs12, b"\x30\x82garbage, not a keystore" * 10)
        token_requests = server.token_requests
        proxy.send(signal.SIGHUP)

        failed = await proxy.wait_entry(
            "configuration reload failed; keeping the running configuration"
        )
        status, _body = await get(session, proxy.proxy_url + DEMO + "/still")
        assert status == 200
        assert fake_upstream.upstream.seen[-1].target == DEMO + "/still"
        assert server.token_requests == token_requests  # nothing fetched with broken material
        status, body = await get(session, proxy.admin_url + "/health")
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "UP"
        not_after = partner.certificate.not_valid_after_utc
        assert datetime.fromisoformat(health["details"]["certificate"]["notAfter"]) == not_after
        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0
    assert failed["level"] == "error"
    assert failed["error"].startswith("client.pkcs12: ")
    assert str(partner_files.pkcs12) in failed["error"]
    assert not any("credentials reloaded" in line for line in proxy.lines)
    assert PKCS12_PASSWORD not in "\n".join(proxy.lines)
    assert_json_log_lines(proxy)
