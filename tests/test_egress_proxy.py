"""Egress through a real forward proxy (tinyproxy): CONNECT tunnels, end-to-end TLS, failures.

Each test starts tinyproxy on loopback (``tests/support/forwardproxy.py``) with CONNECT allowed
to the fakes' ports, points the proxy's configuration at it, and asserts on what the forward
proxy saw (its CONNECT lines) and what the fakes saw (one Bearer token upstream, the assertion at
the token endpoint). Without tinyproxy (``make test-tools`` installs it) these tests are skipped.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import io
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
import pytest

from proxy.config import Config, parse_config
from proxy.credentials import load_credentials
from proxy.onboarding import check as checklist
from proxy.onboarding import token as token_command
from proxy.server import start
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO, write_toml
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.forwardproxy import TINYPROXY, TinyProxy, free_port, start_tinyproxy
from tests.support.partner import CLIENT_ID, PartnerFiles
from tests.support.wait import until

pytestmark = pytest.mark.skipif(
    TINYPROXY is None, reason="tinyproxy is not installed (make test-tools installs it as root)"
)

PROXY_USER: Final = "svc-ksz"
PROXY_PASSWORD: Final = "proxy-canary-Pw-5e1d"  # must never show up anywhere
PROXY_BASIC: Final = base64.b64encode(f"{PROXY_USER}:{PROXY_PASSWORD}".encode()).decode()
TinyFactory = Callable[..., AbstractAsyncContextManager[TinyProxy]]


def authority_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def port_of(url: str) -> int:
    return int(urlsplit(url).port or 443)


@pytest.fixture
def password_file(tmp_path: Path) -> Path:
    return write_secret(tmp_path / "proxy.password", PROXY_PASSWORD)


def write_secret(path: Path, secret: str) -> Path:
    """Write ``secret`` as a password file of mode 0600, as an operator would."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(secret + "\n")
    return path


@pytest.fixture
def tinyproxy(
    tmp_path: Path, authserver: AuthServerHandle, fake_upstream: UpstreamHandle
) -> TinyFactory:
    """Return a starter of tinyproxy allowing CONNECT to the fakes' ports (auth on by default)."""
    ports = {port_of(authserver.url), port_of(fake_upstream.url)}

    def factory(*, auth: bool = True) -> AbstractAsyncContextManager[TinyProxy]:
        return start_tinyproxy(
            tmp_path / "tinyproxy",
            connect_ports=ports,
            user=PROXY_USER if auth else None,
            password=PROXY_PASSWORD if auth else None,
        )

    return factory


def egress_table(proxy: TinyProxy, password_file: Path, **extra: Any) -> dict[str, Any]:
    return {
        "proxy_url": proxy.url,
        "proxy_user": PROXY_USER,
        "proxy_password_file": str(password_file),
        **extra,
    }


async def get_json(chain: Chain, url: str) -> tuple[int, dict[str, Any], str]:
    async with chain.session.get(url) as response:
        text = await response.text()
        data = await response.json(content_type=None) if text.startswith("{") else {}
        return response.status, data, text


def log_dump(caplog: pytest.LogCaptureFixture) -> str:
    """Return every captured record with its extra fields (caplog.text shows messages only)."""
    return caplog.text + "\n".join(str(vars(record)) for record in caplog.records)


def assert_no_proxy_secret(*texts: str) -> None:
    for text in texts:
        assert PROXY_PASSWORD not in text
        assert PROXY_BASIC not in text


# -- through the proxy -------------------------------------------------------------------------


async def test_explicit_proxy_with_auth_tunnels_both_destinations_end_to_end(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with tinyproxy() as forward:
        chain = await make_chain(egress=egress_table(forward, password_file))
        for _ in range(3):
            async with chain.request("GET", DEMO + "/x") as response:
                assert response.status == 200
                await response.read()
        connects = forward.connects()
        # The token request and the API calls each went through one tunnel; the upstream tunnel
        # is pooled and reused by the later calls.
        assert connects.count(authority_of(authserver.token_url)) >= 1
        assert connects.count(authority_of(fake_upstream.url)) == 1
        assert set(connects) == {authority_of(authserver.url), authority_of(fake_upstream.url)}
        # What the fakes saw: the assertion at the token endpoint, one Bearer token upstream, and
        # nothing of the proxy's credentials (sent on CONNECT only).
        # One token per configured scope set (the chain has two routes).
        assert [r.outcome for r in authserver.server.requests] == ["issued", "issued"]
        for record in authserver.server.requests:
            assert "proxy-authorization" not in {name.lower() for name in record.headers}
        assert chain.upstream.count == 3
        for seen in chain.upstream.seen:
            (bearer,) = seen.header_values("Authorization")
            assert bearer.startswith("Bearer ")
            assert seen.header_values("Proxy-Authorization") == []
            assert bearer.removeprefix("Bearer ") not in forward.log_text()
        admin = chain.proxy.admin_url
        status, health, health_text = await get_json(chain, admin + "/health")
        assert status == 200
        route = (
            f"via proxy {forward.host}:{forward.port} (egress.proxy_url, with Proxy-Authorization)"
        )
        assert health["details"]["egress"] == {
            f"oauth {authserver.url}": route,
            f"upstream {fake_upstream.url}": route,
        }
        _, _, metrics = await get_json(chain, admin + "/metrics")
    assert_no_proxy_secret(log_dump(caplog), health_text, metrics)


async def test_tls_through_the_tunnel_is_verified_against_the_destination(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
) -> None:
    # Without the test CA the upstream's certificate is untrusted: the tunnel carries TLS
    # end to end, so the proxy cannot vouch for the destination.
    async with tinyproxy() as forward:
        chain = await make_chain(
            egress=egress_table(forward, password_file), upstream={"ca_file": None}
        )
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 502
            assert (await response.json())["reason"] == "upstream_tls"
        assert authority_of(fake_upstream.url) in forward.connects()
    assert chain.upstream.count == 0


async def test_discovery_goes_through_the_proxy_too(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    authserver: AuthServerHandle,
) -> None:
    async with tinyproxy() as forward:
        chain = await make_chain(
            egress=egress_table(forward, password_file),
            oauth={"token_url": None, "discovery_url": authserver.metadata_url},
        )
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert authority_of(authserver.metadata_url) in forward.connects()
    assert chain.upstream.count == 1


async def test_no_proxy_host_is_reached_directly(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
) -> None:
    # The upstream by the name localhost (its certificate names it), listed in no_proxy.
    upstream_url = fake_upstream.url.replace("127.0.0.1", "localhost")
    async with tinyproxy() as forward:
        chain = await make_chain(
            egress=egress_table(forward, password_file, no_proxy=["localhost"]),
            upstream={"url": upstream_url},
        )
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert set(forward.connects()) == {authority_of(authserver.url)}
    assert chain.upstream.count == 1


async def test_per_destination_override_direct_token_endpoint(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    fake_upstream: UpstreamHandle,
) -> None:
    async with tinyproxy() as forward:
        chain = await make_chain(
            egress=egress_table(forward, password_file), oauth={"proxy": "direct"}
        )
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert forward.connects() == [authority_of(fake_upstream.url)]


async def test_per_destination_proxy_url_without_an_egress_proxy(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    password_file: Path,
    fake_upstream: UpstreamHandle,
) -> None:
    # Only upstream.proxy names the proxy; [egress] gives the credentials and nothing else.
    async with tinyproxy() as forward:
        chain = await make_chain(
            egress={"proxy_user": PROXY_USER, "proxy_password_file": str(password_file)},
            upstream={"proxy": forward.url},
        )
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert forward.connects() == [authority_of(fake_upstream.url)]


async def test_from_environment_takes_https_proxy_and_no_proxy(
    tinyproxy: TinyFactory,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
) -> None:
    async with tinyproxy() as forward:
        environ = {
            "HTTPS_PROXY": f"http://{PROXY_USER}:{PROXY_PASSWORD}@{forward.host}:{forward.port}",
            "NO_PROXY": "localhost",
        }
        upstream_url = fake_upstream.url.replace("127.0.0.1", "localhost")
        config = env_config(authserver, upstream_url, partner_files, ca_file, environ)
        await call_once(config)
        assert forward.connects() == [authority_of(authserver.url)]


async def test_without_configuration_https_proxy_is_ignored(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with tinyproxy(auth=False) as forward:
        for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "ALL_PROXY"):
            monkeypatch.setenv(name, forward.url)
        chain = await make_chain()
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert forward.connects() == []
    assert chain.upstream.count == 1


# -- failures: named reasons, no hang ------------------------------------------------------------


async def test_wrong_proxy_password_is_token_proxy_auth(
    make_chain: ChainFactory,
    tinyproxy: TinyFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = write_secret(tmp_path / "wrong.password", PROXY_PASSWORD + "-wrong")
    async with tinyproxy() as forward:
        chain = await make_chain(ready=False, egress=egress_table(forward, wrong))
        async with asyncio.timeout(10):
            body = await first_failure(chain)
        assert body["reason"] == "token_proxy_auth"
        admin = chain.proxy.admin_url
        health_text = ""

        async def every_scope_set_failed() -> bool:
            # Each scope set has its own fetch: the caller saw one fail, the others may still run.
            nonlocal health_text
            _, health, health_text = await get_json(chain, admin + "/health")
            states = health["details"]["tokens"].values()
            return {state["lastError"] for state in states} == {"proxy_auth"}

        await until(every_scope_set_failed, 10.0)
        _, _, metrics = await get_json(chain, admin + "/metrics")
        assert 'kszproxy_token_requests_total{client="default",outcome="error"}' in metrics
    hints = {getattr(r, "hint", None) for r in caplog.records}
    assert any("egress.proxy_user" in str(h) for h in hints)  # names the keys to check
    assert chain.upstream.count == 0
    assert chain.auth.server.requests == []
    assert_no_proxy_secret(log_dump(caplog), health_text, metrics, str(body))


async def test_missing_proxy_credentials_on_the_upstream_are_upstream_proxy(
    make_chain: ChainFactory, tinyproxy: TinyFactory
) -> None:
    # The token endpoint direct, the upstream through a proxy that wants credentials (407).
    async with tinyproxy() as forward:
        chain = await make_chain(egress={"proxy_url": forward.url}, oauth={"proxy": "direct"})
        async with asyncio.timeout(10), chain.request("GET", DEMO + "/x") as response:
            assert response.status == 502
            body = await response.json()
        assert body["reason"] == "upstream_proxy"
        assert "egress.proxy_user" in body["detail"]
        _, _, metrics = await get_json(chain, chain.proxy.admin_url + "/metrics")
    assert f'kszproxy_upstream_errors_total{{reason="proxy",route="{DEMO}"}} 1.0' in metrics
    assert chain.upstream.count == 0


async def test_proxy_down_is_a_named_reason_not_a_hang(make_chain: ChainFactory) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    chain = await make_chain(ready=False, egress={"proxy_url": closed})
    async with asyncio.timeout(10):
        body = await first_failure(chain)
    assert body["reason"] == "token_proxy"
    chain = await make_chain(egress={"proxy_url": closed}, oauth={"proxy": "direct"})
    async with asyncio.timeout(10), chain.request("GET", DEMO + "/x") as response:
        assert response.status == 502
        assert (await response.json())["reason"] == "upstream_proxy"
    assert chain.upstream.count == 0


async def test_silent_proxy_is_bounded_by_the_configured_timeouts(
    make_chain: ChainFactory,
) -> None:
    # A proxy that accepts the connection and never answers CONNECT: the token request ends at
    # oauth.timeout_s (aiohttp puts no read timeout on the CONNECT answer), a forwarded request
    # at upstream.total_timeout_s (or connect_timeout_s, which the tunnel counts toward, if
    # shorter).
    async with silent_listener() as url:
        chain = await make_chain(ready=False, egress={"proxy_url": url}, oauth={"timeout_s": 0.5})
        async with asyncio.timeout(10):
            body = await first_failure(chain)
        assert body["reason"] == "token_timeout"
        chain = await make_chain(
            egress={"proxy_url": url}, oauth={"proxy": "direct"}, upstream={"total_timeout_s": 0.5}
        )
        async with asyncio.timeout(10), chain.request("GET", DEMO + "/x") as response:
            assert response.status == 504
            assert (await response.json())["reason"] == "upstream_timeout"
    assert chain.upstream.count == 0


# -- helpers -------------------------------------------------------------------------------------


async def first_failure(chain: Chain) -> dict[str, Any]:
    """Call until the proxy answers with a problem carrying the token's failure reason."""
    while True:
        async with chain.request("GET", DEMO + "/x") as response:
            body = await response.json(content_type=None)
        if response.status == 503 and body.get("reason", "").startswith("token_"):
            return dict(body)
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def silent_listener() -> AsyncIterator[str]:
    """Accept connections and never answer; yield an http:// URL for it."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(OSError):
            await reader.read()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in held:
            writer.close()
        await server.wait_closed()


def env_config(
    auth: AuthServerHandle,
    upstream_url: str,
    files: PartnerFiles,
    ca_file: Path,
    environ: dict[str, str],
) -> Config:
    data: dict[str, Any] = {
        "client": {
            "id": CLIENT_ID,
            "pkcs12": str(files.pkcs12),
            "password_file": str(files.password_file),
        },
        "oauth": {"token_url": auth.token_url, "ca_file": str(ca_file)},
        "upstream": {"url": upstream_url, "ca_file": str(ca_file)},
        "listen": {"port": 0},
        "admin": {"port": 0},
        "egress": {"from_environment": True},
        "routes": [{"prefix": DEMO, "scopes": ["scope:demo:consult"]}],
    }
    return parse_config(data, environ)


async def call_once(config: Config) -> None:
    running = await start(config, load_credentials(config.client), drain_s=1.0)
    try:
        async with aiohttp.ClientSession() as session:
            async with asyncio.timeout(20):
                while True:
                    async with session.get(running.proxy_url + DEMO + "/x") as response:
                        if response.status == 200:
                            return
                    await asyncio.sleep(0.05)
    finally:
        await running.close()


# -- check and token ------------------------------------------------------------------------------


CheckConfig = Callable[..., Path]


@pytest.fixture
def check_config(
    tmp_path: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
) -> CheckConfig:
    """Return ``write(egress, upstream_url=None)``: a config for ``check`` against the fakes."""

    def write(egress: dict[str, Any], upstream_url: str | None = None) -> Path:
        return write_toml(
            tmp_path / "ksz-proxy.toml",
            {
                "client": {
                    "id": CLIENT_ID,
                    "pkcs12": str(partner_files.pkcs12),
                    "password_file": str(partner_files.password_file),
                },
                "oauth": {"token_url": authserver.token_url, "ca_file": str(ca_file)},
                "upstream": {"url": upstream_url or fake_upstream.url, "ca_file": str(ca_file)},
                "egress": egress,
                "routes": [{"prefix": DEMO, "scopes": ["scope:demo:consult"]}],
            },
        )

    return write


def rendered(report: checklist.Report) -> str:
    out = io.StringIO()
    checklist.render(report, out)
    return out.getvalue()


async def test_check_steps_report_the_route_through_the_proxy(
    tinyproxy: TinyFactory,
    password_file: Path,
    check_config: CheckConfig,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
) -> None:
    async with tinyproxy() as forward:
        path = check_config(egress_table(forward, password_file))
        report = await checklist.run_checks(path, {})
        connects = forward.connects()
    text = rendered(report)
    assert report.exit_code == 0, text
    via = f"via proxy {forward.host}:{forward.port}"
    by_name = {(r.name, r.target): r for r in report.results}
    for name in ("dns", "tcp", "tls"):
        found = [r for (n, _), r in by_name.items() if n == name]
        assert len(found) == 2, text  # the token endpoint and the REST API
        assert all(via in r.detail for r in found), text
    tcp = [r for r in report.results if r.name == "tcp"]
    assert all("CONNECT 127.0.0.1:" in r.detail and "answered 200" in r.detail for r in tcp)
    # Each step that connects opened its own tunnel: TCP, TLS, then the token and health calls.
    assert authority_of(authserver.url) in connects
    assert authority_of(fake_upstream.url) in connects
    assert_no_proxy_secret(text)


async def test_check_resolves_the_proxys_name_when_it_is_one(
    tinyproxy: TinyFactory, password_file: Path, check_config: CheckConfig
) -> None:
    # "localhost" comes from /etc/hosts: step 2 looks the proxy's name up, not the destination's.
    async with tinyproxy() as forward:
        egress = egress_table(forward, password_file)
        egress["proxy_url"] = f"http://localhost:{forward.port}"
        path = check_config(egress)
        report = await checklist.run_checks(path, {})
    text = rendered(report)
    dns = [r for r in report.results if r.name == "dns"]
    assert len(dns) == 2 and all(r.status == "ok" for r in dns), text
    assert all("(localhost resolves to " in r.detail for r in dns), text
    assert all("the proxy resolves 127.0.0.1" in r.detail for r in dns), text


async def test_check_says_the_proxy_refused_the_credentials(
    tinyproxy: TinyFactory, tmp_path: Path, check_config: CheckConfig
) -> None:
    wrong = write_secret(tmp_path / "wrong.password", "not-" + PROXY_PASSWORD)
    async with tinyproxy() as forward:
        path = check_config(egress_table(forward, wrong))
        async with asyncio.timeout(30):
            report = await checklist.run_checks(path, {})
    text = rendered(report)
    assert report.exit_code == 1
    tcp = [r for r in report.results if r.name == "tcp"]
    assert tcp and all(r.status == "failed" for r in tcp), text
    assert all("proxy refused the credentials" in r.detail for r in tcp), text
    assert all("egress.proxy_user" in (r.fix or "") for r in tcp), text
    assert "egress.proxy_password_file" in text
    assert {r.status for r in report.results if r.name in ("tls", "token", "health")} == {"skipped"}
    assert_no_proxy_secret(text)
    assert "not-" + PROXY_PASSWORD not in text


async def test_token_command_names_the_route_and_the_proxy_reason(
    make_chain: ChainFactory, tinyproxy: TinyFactory, password_file: Path, tmp_path: Path
) -> None:
    async with tinyproxy() as forward:
        chain = await make_chain(ready=False, egress=egress_table(forward, password_file))
        credentials = load_credentials(chain.config.client)
        out = io.StringIO()
        code = await token_command._token(
            chain.config, chain.config.client, credentials, frozenset(), False, out
        )
        assert code == 0, out.getvalue()
        assert f"via proxy {forward.host}:{forward.port}" in out.getvalue()
        broken = chain_with_egress(chain.config, {"proxy_url": forward.url})
        out = io.StringIO()
        code = await token_command._token(
            broken, broken.client, credentials, frozenset(), False, out
        )
    assert code == 1
    assert "reason: proxy_auth" in out.getvalue()
    assert "egress.proxy_user" in out.getvalue()
    assert_no_proxy_secret(out.getvalue())


def chain_with_egress(config: Config, egress: dict[str, Any]) -> Config:
    """Return ``config`` with another [egress] table (parsed the way the loader does)."""
    policy = parse_config(
        {
            "client": {"id": "x", "pkcs12": "x.p12"},
            "oauth": {"token_url": "https://x.example/token"},
            "upstream": {"url": "https://x.example"},
            "egress": egress,
            "routes": [{"prefix": "/x"}],
        },
        {},
    ).egress
    return dataclasses.replace(config, egress=policy)


async def test_check_names_tls_inspection_when_the_destination_is_untrusted_via_proxy(
    tinyproxy: TinyFactory, password_file: Path, check_config: CheckConfig, ca_file: Path
) -> None:
    # What a TLS-inspecting proxy looks like from here: a certificate no configured CA vouches for.
    async with tinyproxy() as forward:
        path = check_config(egress_table(forward, password_file))
        text = path.read_text(encoding="utf-8")
        path.write_text(text.replace(f'ca_file = "{ca_file}"\n[upstream]', "[upstream]"))
        report = await checklist.run_checks(path, {})
    (tls,) = [r for r in report.results if r.name == "tls" and r.status == "failed"]
    assert "token endpoint" in tls.target
    assert "certificate verify failed" in tls.detail
    assert f"the forward proxy {forward.host}:{forward.port} may be inspecting TLS" in (
        tls.cause or ""
    )
    assert "oauth.ca_file" in (tls.fix or "")


async def test_check_says_why_a_destination_is_reached_directly(
    tinyproxy: TinyFactory,
    password_file: Path,
    check_config: CheckConfig,
    fake_upstream: UpstreamHandle,
) -> None:
    async with tinyproxy() as forward:
        path = check_config(
            egress_table(forward, password_file, no_proxy=["localhost"]),
            upstream_url=fake_upstream.url.replace("127.0.0.1", "localhost"),
        )
        report = await checklist.run_checks(path, {})
    assert report.exit_code == 0, rendered(report)
    (direct,) = [r for r in report.results if r.name == "tcp" and "REST API" in r.target]
    assert direct.detail.endswith(", direct (egress.no_proxy localhost)")
    (proxied,) = [r for r in report.results if r.name == "tcp" and "token" in r.target]
    assert f"via proxy {forward.host}:{forward.port}" in proxied.detail
