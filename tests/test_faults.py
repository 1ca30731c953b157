"""Faults on the wire and in time, end to end (SECURITY 5, 19, 20, 31, 32, 35, 36, 38).

A ``FaultProxy`` (tests/support/faultproxy.py) sits between ksz-proxy and the fake KSZ API or the
fake authorization server; TLS passes through it, so ksz-proxy still verifies the fakes'
certificate. Each transport fault must reach the caller as its stable status and reason, counted in
``kszproxy_upstream_errors_total``, and never cause a second connection attempt: a request is never
resent after a transport fault. Host names under ``.invalid`` (RFC 2606) never resolve, which gives
DNS failures without touching the resolver. The token clock travels through an injected monotonic
clock, the assertion's wall clock through an injected skew. The fault proxy is first checked on its
own, against a plain echo server.

The last section shows what no other module did: expired and TLS 1.1 peers, the total timeout,
the connection pool limit, a redirect to the upstream itself, the non-loopback warning.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import socket
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import trustme

from proxy import tls
from proxy.credentials import load_credentials
from proxy.errors import TokenUnavailable
from proxy.oauth import make_session
from proxy.sandbox.authserver import FakeAuthServer
from proxy.sandbox.serve import Served, serve
from proxy.sandbox.upstream import FakeUpstream, stream_chunks, stream_sha256
from proxy.tokens import TokenProvider
from tests.support.chain import Chain, ChainFactory
from tests.support.clock import FakeClock
from tests.support.config import DEMO, make_config
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.metrics import samples, scrape
from tests.support.partner import DEFAULT_SCOPES, PartnerFiles
from tests.support.process import free_port
from tests.support.wait import until

KIB: Final = 1024
MIB: Final = 1024 * KIB
NOWHERE: Final = "https://nonexistent.invalid"  # RFC 2606: never resolves

FaultProxies = Callable[..., Awaitable[FaultProxy]]


@pytest.fixture
async def fault_proxies() -> AsyncIterator[FaultProxies]:
    """Start fault proxies on demand: ``await fault_proxies(port, tls=None)``; closed after."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(target_port: int, *, tls: ssl.SSLContext | None = None) -> FaultProxy:
            return await stack.enter_async_context(FaultProxy(target_port, tls=tls))

        yield start


@pytest.fixture
async def upstream_fault(
    fault_proxies: FaultProxies, fake_upstream: UpstreamHandle, server_ssl: ssl.SSLContext
) -> FaultProxy:
    """Return a fault proxy in front of the fake KSZ API (garbage is spoken inside TLS)."""
    return await fault_proxies(fake_upstream.served.port, tls=server_ssl)


@pytest.fixture
async def auth_fault(fault_proxies: FaultProxies, authserver: AuthServerHandle) -> FaultProxy:
    """Return a fault proxy in front of the fake authorization server."""
    return await fault_proxies(int(authserver.url.rsplit(":", 1)[1]))


async def through(make_chain: ChainFactory, fault: FaultProxy | str, **upstream: Any) -> Chain:
    """Return a ready chain whose upstream is ``fault`` (a fault proxy or an origin)."""
    origin = fault.url if isinstance(fault, FaultProxy) else fault
    settings = {"connect_timeout_s": 1.0, "read_timeout_s": 1.0, **upstream}
    return await make_chain(upstream={"url": origin, **settings})


async def problem_answer(chain: Chain, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    """Send one request; return its problem+json body, with the status checked against it."""
    async with chain.request(method, path, **kwargs) as response:
        assert response.content_type == "application/problem+json"
        problem = dict(await response.json(content_type=None))
        assert problem["status"] == response.status
        assert response.headers["BelGov-Trace-Id"]
        return problem


async def upstream_errors(chain: Chain, reason: str) -> float:
    """Return ``kszproxy_upstream_errors_total`` for the demo route and ``reason``."""
    key = ("kszproxy_upstream_errors_total", frozenset({("route", DEMO), ("reason", reason)}))
    return samples(await scrape(chain)).get(key, 0.0)


async def warm(chain: Chain, proxy: FaultProxy) -> None:
    """Leave one pooled keep-alive connection through ``proxy``."""
    proxy.fault = Fault()
    async with chain.request("GET", DEMO + "/warm") as response:
        assert response.status == 200
        await response.read()


# -- the fault proxy itself, on a plain echo server ---------------------------------------------


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    async with server:
        yield int(server.sockets[0].getsockname()[1])


async def test_the_fault_proxy_does_what_it_says(
    fault_proxies: FaultProxies, echo_port: int
) -> None:
    proxy = await fault_proxies(echo_port)

    async def talk(fault: Fault, data: bytes = b"x" * 1000, timeout_s: float = 0.5) -> bytes:
        """Send ``data`` through ``fault``; return the echo, marked by how it ended."""
        proxy.fault = fault
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        received = b""
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(timeout_s):
                while len(received) < len(data):
                    chunk = await reader.read(65536)
                    if not chunk:
                        return received + b"<EOF>"
                    received += chunk
            return received
        except ConnectionResetError:
            return received + b"<RST>"
        except TimeoutError:
            return received + b"<silence>"
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    assert await talk(Fault()) == b"x" * 1000
    assert (await talk(Fault(cut="reset", cut_after=100))).endswith(b"<RST>")
    assert await talk(Fault(cut="half_close", cut_after=100)) == b"x" * 100 + b"<EOF>"
    assert await talk(Fault(cut="half_close", cut_direction="request")) == b"<EOF>"
    assert await talk(Fault(black_hole=True)) == b"<silence>"
    assert await talk(Fault(garbage=b"junk")) == b"junk<silence>"
    started = time.monotonic()
    assert await talk(Fault(bytes_per_s=20_000), b"y" * 10_000, 5.0) == b"y" * 10_000
    assert time.monotonic() - started > 0.4  # 10 kB each way at 20 kB/s
    assert proxy.connections == 7


# -- SECURITY 38: each transport fault, its status and its stable reason ----------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """A transport fault on the way to the upstream and what the caller must get for it."""

    where: str  # "fault" (TLS-aware fault proxy), "raw" (plain), "dns", "closed"
    fault: Fault = field(default_factory=Fault)
    pooled: bool = False  # strike on a kept-alive connection rather than a new one
    status: int
    reason: str


TRANSPORT_FAULTS: Final = {
    "dns": Case(where="dns", status=502, reason="dns"),
    "connect_refused": Case(where="closed", status=502, reason="connect"),
    "connect_reset_in_handshake": Case(
        where="fault",
        fault=Fault(cut="reset", cut_direction="request"),
        status=502,
        reason="connect",
    ),
    "tls_garbage_instead_of_handshake": Case(
        where="raw", fault=Fault(garbage=b"SSH-2.0-OpenSSH_9.6\r\n"), status=502, reason="tls"
    ),
    "reset_after_the_request": Case(
        where="fault",
        fault=Fault(cut="reset", cut_direction="request"),
        pooled=True,
        status=502,
        reason="reset",
    ),
    "half_close_after_the_request": Case(
        where="fault",
        fault=Fault(cut="half_close", cut_direction="request"),
        pooled=True,
        status=502,
        reason="reset",
    ),
    "timeout_black_hole_new_connection": Case(
        where="fault", fault=Fault(black_hole=True), status=504, reason="timeout"
    ),
    "timeout_black_hole_kept_connection": Case(
        where="fault", fault=Fault(black_hole=True), pooled=True, status=504, reason="timeout"
    ),
    "protocol_garbage_answer": Case(
        where="fault",
        fault=Fault(garbage=b"HTTP/1.1 2OO WAT\r\n\x00\x01\r\n\r\n"),
        status=502,
        reason="protocol",
    ),
}


@pytest.mark.parametrize("name", TRANSPORT_FAULTS)
async def test_transport_fault_maps_to_its_status_and_reason_and_is_never_resent(
    make_chain: ChainFactory,
    fault_proxies: FaultProxies,
    upstream_fault: FaultProxy,
    fake_upstream: UpstreamHandle,
    name: str,
) -> None:
    case = TRANSPORT_FAULTS[name]
    proxy: FaultProxy | None = None
    if case.where == "fault":
        proxy = upstream_fault
    elif case.where == "raw":
        proxy = await fault_proxies(fake_upstream.served.port)
    origin = {"dns": NOWHERE, "closed": f"https://127.0.0.1:{free_port()}"}.get(case.where)
    chain = await through(make_chain, proxy or origin or "", read_timeout_s=0.5)
    if case.pooled:
        assert proxy is not None
        await warm(chain, proxy)
    connections = proxy.connections if proxy is not None else 0
    errors = await upstream_errors(chain, case.reason)
    if proxy is not None:
        proxy.fault = case.fault

    problem = await problem_answer(chain, "POST", DEMO + "/order", data=b"payload")

    assert (problem["status"], problem["reason"]) == (case.status, "upstream_" + case.reason)
    assert problem["type"].endswith("gatewayTimeout" if case.status == 504 else "badGateway")
    assert await upstream_errors(chain, case.reason) == errors + 1
    # One attempt: a kept-alive connection is not replaced by a new one, a new one not retried.
    if proxy is not None:
        assert proxy.connections - connections == (0 if case.pooled else 1)
    assert [s for s in fake_upstream.upstream.seen if s.target == DEMO + "/order"] == []


@pytest.mark.parametrize("method", ["GET", "HEAD", "PUT", "DELETE", "POST", "PATCH"])
@pytest.mark.parametrize("cut", ["reset", "half_close"])
async def test_a_request_meeting_a_dead_kept_alive_connection_is_not_resent(
    make_chain: ChainFactory, upstream_fault: FaultProxy, method: str, cut: str
) -> None:
    # aiohttp resends idempotent requests after exactly this (the server closed a kept-alive
    # connection as the request arrived); ksz-proxy switched that off, for every method.
    chain = await through(make_chain, upstream_fault)
    await warm(chain, upstream_fault)
    connections = upstream_fault.connections
    upstream_fault.fault = Fault(cut=cut, cut_direction="request")  # type: ignore[arg-type]
    async with chain.request(method, DEMO + "/once", data=b"x" * 10) as response:
        assert response.status == 502
        if method != "HEAD":
            assert (await response.json(content_type=None))["reason"] == "upstream_reset"
    assert upstream_fault.connections == connections
    assert chain.upstream.count == 1  # the warm-up only


@pytest.mark.parametrize("replay_max_bytes", [1 * MIB, 0], ids=["buffered", "streamed"])
@pytest.mark.parametrize("cut", ["reset", "half_close"])
async def test_connection_cut_mid_request_body_is_502_once(
    make_chain: ChainFactory, upstream_fault: FaultProxy, replay_max_bytes: int, cut: str
) -> None:
    chain = await through(make_chain, upstream_fault, replay_max_bytes=replay_max_bytes)
    upstream_fault.fault = Fault(
        cut=cut,  # type: ignore[arg-type]
        cut_direction="request",
        cut_after=64 * KIB,
    )
    body = b"z" * (300 * KIB)
    problem = await problem_answer(chain, "POST", DEMO + "/upload", data=body)
    assert (problem["status"], problem["reason"]) == (502, "upstream_reset")
    assert upstream_fault.connections == 1
    await until(lambda: chain.upstream.count >= 1)
    (seen,) = chain.upstream.seen  # it started, and never got the whole body
    assert not seen.body_complete
    assert seen.body_bytes < len(body)


# -- faults in the middle of the answer: the caller's connection is cut ------------------------


@pytest.mark.parametrize("cut", ["reset", "half_close"])
@pytest.mark.parametrize("chunked", [False, True], ids=["length", "chunked"])
async def test_cut_mid_answer_cuts_the_callers_connection(
    make_chain: ChainFactory, upstream_fault: FaultProxy, cut: str, chunked: bool
) -> None:
    chain = await through(make_chain, upstream_fault)
    errors = await upstream_errors(chain, "reset")
    upstream_fault.fault = Fault(cut=cut, cut_after=512 * KIB)  # type: ignore[arg-type]
    size = 4 * MIB
    received = 0
    with pytest.raises(aiohttp.ClientPayloadError):
        path = f"{DEMO}/stream?bytes={size}" + ("&chunked=1" if chunked else "")
        async with chain.request("GET", path) as response:
            assert response.status == 200  # the headers were out before the fault
            async for chunk in response.content.iter_chunked(64 * KIB):
                received += len(chunk)
    # No clean end: the caller never takes a truncated body for a whole one.
    assert 0 < received < size
    assert upstream_fault.connections == 1
    await until(lambda: chain.proxy.drain.in_flight == 0)
    assert await upstream_errors(chain, "reset") == errors + 1
    upstream_fault.fault = Fault()
    async with chain.request("GET", DEMO + "/after") as response:
        assert response.status == 200


# -- slow but working links ------------------------------------------------------------------


async def test_latency_under_the_read_timeout_works(
    make_chain: ChainFactory, upstream_fault: FaultProxy
) -> None:
    upstream_fault.fault = Fault(latency_s=0.15)
    chain = await through(make_chain, upstream_fault, read_timeout_s=1.0)
    body = bytes(range(256)) * 400
    async with chain.request("POST", DEMO + "/slow", data=body) as response:
        assert response.status == 200
        echo = await response.json()
    assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    async with chain.request("GET", f"{DEMO}/stream?bytes={256 * KIB}") as response:
        assert response.status == 200
        assert hashlib.sha256(await response.read()).hexdigest() == stream_sha256(256 * KIB)


async def test_latency_over_the_read_timeout_is_504(
    make_chain: ChainFactory, upstream_fault: FaultProxy
) -> None:
    chain = await through(make_chain, upstream_fault, read_timeout_s=0.3)
    await warm(chain, upstream_fault)
    upstream_fault.fault = Fault(latency_s=1.0)
    problem = await problem_answer(chain, "GET", DEMO + "/late")
    assert (problem["status"], problem["reason"]) == (504, "upstream_timeout")


async def test_bandwidth_cap_still_streams_whole_bodies_both_ways(
    make_chain: ChainFactory, upstream_fault: FaultProxy
) -> None:
    rate = 2 * MIB
    size = 2 * MIB
    upstream_fault.fault = Fault(bytes_per_s=rate)
    # The read timeout bounds each wait for answer bytes, not the whole answer (about 1 s here).
    chain = await through(make_chain, upstream_fault, read_timeout_s=0.5)
    started = time.monotonic()
    digest = hashlib.sha256()
    async with chain.request("GET", f"{DEMO}/stream?bytes={size}&chunked=1") as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(64 * KIB):
            digest.update(chunk)
    assert digest.hexdigest() == stream_sha256(size)
    # Not a speed check of ksz-proxy: it shows that the cap was in force.
    assert time.monotonic() - started > 0.5 * size / rate

    async def upload() -> AsyncIterator[bytes]:
        for chunk in stream_chunks(size):
            yield chunk

    # Upwards the read timeout starts once the body is handed to the kernel, whose socket
    # buffers (a MiB or more on loopback) then drain at the capped rate: it must cover that.
    chain = await through(make_chain, upstream_fault, read_timeout_s=3.0)
    async with chain.request("PUT", DEMO + "/up", data=upload()) as response:
        assert response.status == 200
        echo = await response.json()
    assert (echo["body_bytes"], echo["body_sha256"]) == (size, stream_sha256(size))


# -- the token endpoint behind faults (SECURITY 36) -----------------------------------------


TOKEN_FAULTS: Final = {
    "black_hole": (Fault(black_hole=True), "token_timeout"),
    "reset": (Fault(cut="reset", cut_direction="request"), "token_unreachable"),
    "half_close": (Fault(cut="half_close", cut_direction="request"), "token_unreachable"),
    "garbage": (Fault(garbage=b"SSH-2.0-OpenSSH_9.6\r\n"), "token_tls"),
    "slow_under_the_timeout": (Fault(latency_s=0.05), None),
}


@pytest.mark.parametrize("name", TOKEN_FAULTS)
async def test_token_endpoint_transport_faults_are_503_with_retry_after(
    make_chain: ChainFactory, auth_fault: FaultProxy, name: str
) -> None:
    fault, reason = TOKEN_FAULTS[name]
    auth_fault.fault = fault
    token_url = auth_fault.url + FakeAuthServer.TOKEN_PATH
    chain = await make_chain(ready=False, oauth={"token_url": token_url, "timeout_s": 0.5})
    async with chain.request("GET", DEMO + "/x") as response:
        if reason is None:
            assert response.status == 200
            return
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        problem = await response.json(content_type=None)
    assert problem["reason"] == reason
    assert chain.upstream.count == 0
    auth_fault.fault = Fault()  # the endpoint comes back: so does the proxy
    await chain.wait_ready()
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 200


async def test_unresolvable_token_endpoint_is_503_token_unreachable(
    make_chain: ChainFactory,
) -> None:
    chain = await make_chain(ready=False, oauth={"token_url": NOWHERE + "/REST/oauth/v5/token"})
    problem = await problem_answer(chain, "GET", DEMO + "/x")
    assert (problem["status"], problem["reason"]) == (503, "token_unreachable")
    assert chain.upstream.count == 0


# -- time travel: the token clock (SECURITY 35, 36) and the wall clock ---------------------


@pytest.fixture
async def provider_through(
    auth_fault: FaultProxy, partner_files: PartnerFiles, ca_file: Path
) -> AsyncIterator[tuple[TokenProvider, FakeClock]]:
    """Return a token provider on a hand-moved clock whose token endpoint is behind faults."""
    config = make_config(
        auth_fault.url + FakeAuthServer.TOKEN_PATH,
        partner_files,
        ca_file,
        timeout_s=0.5,
        retry_initial_s=0.05,
        retry_max_s=0.2,
    )
    clock = FakeClock()
    async with make_session(config) as session:
        provider = TokenProvider(
            config, load_credentials(config.client), session, clock=clock, rng=lambda: 1.0
        )
        try:
            yield provider, clock
        finally:
            await provider.close()


async def test_black_holed_refresh_never_holds_callers_until_the_token_expires(
    provider_through: tuple[TokenProvider, FakeClock],
    auth_fault: FaultProxy,
    authserver: AuthServerHandle,
) -> None:
    provider, clock = provider_through
    authserver.server.expires_in = 100  # refresh at 80 s, usable until 95 s
    first = await provider.get(DEFAULT_SCOPES)
    auth_fault.fault = Fault(black_hole=True)
    clock.advance(81)
    for _ in range(3):  # the refresh hangs in the black hole; callers are served from the cache
        assert await asyncio.wait_for(provider.get(DEFAULT_SCOPES), 0.1) is first
    await until(lambda: provider.status()[0].consecutive_failures >= 1)
    assert provider.status()[0].last_reason == "timeout"
    assert provider.peek(DEFAULT_SCOPES) is first
    clock.advance(15)  # past usable_until on the monotonic clock
    assert provider.peek(DEFAULT_SCOPES) is None
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(DEFAULT_SCOPES)
    assert (info.value.reason, info.value.status) == ("timeout", 503)
    assert info.value.retry_after_s >= 1
    auth_fault.fault = Fault()
    # A background retry may have entered the black hole just before it closed; a caller then
    # joins that fetch and fails with it. Once it has timed out, the next fetch gets through.
    async with asyncio.timeout(5):
        while True:
            clock.advance(1)  # past the backoff
            try:
                second = await provider.get(DEFAULT_SCOPES)
                break
            except TokenUnavailable as exc:
                assert exc.reason == "timeout"
                await asyncio.sleep(0.1)
    assert second.value != first.value


@pytest.mark.parametrize(
    ("skew_s", "accepted"),
    [(20, True), (-20, True), (120, False), (-600, False)],
    ids=["ahead_within_leeway", "behind_within_leeway", "ahead_too_far", "behind_too_far"],
)
async def test_wall_clock_skew_within_leeway_works_beyond_is_invalid_client(
    authserver: AuthServerHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
    caplog: pytest.LogCaptureFixture,
    skew_s: int,
    accepted: bool,
) -> None:
    # The fake verifies iat/exp with 30 s leeway; the assertion lives 300 s.
    assert authserver.server.leeway_s == 30
    caplog.set_level(logging.WARNING, "ksz_proxy.tokens")
    config = make_config(authserver.token_url, partner_files, ca_file)
    async with make_session(config) as session:
        provider = TokenProvider(
            config,
            load_credentials(config.client),
            session,
            wall_clock=lambda: time.time() + skew_s,
        )
        try:
            if accepted:
                await provider.get(DEFAULT_SCOPES)
            else:
                with pytest.raises(TokenUnavailable) as info:
                    await provider.get(DEFAULT_SCOPES)
                assert (info.value.reason, info.value.oauth_error) == ("rejected", "invalid_client")
                (failed,) = [r for r in caplog.records if r.getMessage() == "token request failed"]
                assert "clock" in getattr(failed, "hint", "")
        finally:
            await provider.close()
    # The token endpoint's Date minus our clock: what kszproxy_clock_skew_seconds shows.
    assert provider.clock_skew_s is not None
    assert abs(provider.clock_skew_s + skew_s) < 3


# -- gaps no other module showed ----------------------------------------------------------


async def _impostor(context: ssl.SSLContext) -> tuple[FakeUpstream, Served]:
    """Serve a fake KSZ API with ``context``: a peer ksz-proxy must refuse."""
    upstream = FakeUpstream()
    return upstream, await serve(upstream.make_app(), ssl_context=context)


async def test_expired_upstream_certificate_is_502_tls_and_nothing_sent(
    make_chain: ChainFactory, tls_ca: trustme.CA
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    now = datetime.now(UTC)
    tls_ca.issue_cert(
        "127.0.0.1", not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
    ).configure_cert(context)
    impostor, served = await _impostor(context)
    try:
        chain = await through(make_chain, served.url)
        problem = await problem_answer(chain, "GET", DEMO + "/x")
        assert (problem["status"], problem["reason"]) == (502, "upstream_tls")
        # And the same certificate on the token endpoint: no token, nothing forwarded.
        expired_token_url = served.url + FakeAuthServer.TOKEN_PATH
        cold = await make_chain(ready=False, oauth={"token_url": expired_token_url})
        problem = await problem_answer(cold, "GET", DEMO + "/x")
        assert (problem["status"], problem["reason"]) == (503, "token_tls")
    finally:
        await served.close()
    assert impostor.count == 0


async def test_a_peer_offering_only_tls_1_1_is_refused(
    make_chain: ChainFactory, tls_ca: trustme.CA
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is deprecated, rightly
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    tls_ca.issue_cert("127.0.0.1").configure_cert(context)
    impostor, served = await _impostor(context)
    try:
        chain = await through(make_chain, served.url)
        problem = await problem_answer(chain, "GET", DEMO + "/x")
    finally:
        await served.close()
    # The peer resets the handshake when no version fits (so "connect" rather than "tls").
    assert problem["status"] == 502
    assert problem["reason"] in ("upstream_tls", "upstream_connect")
    assert impostor.count == 0
    # The policy itself, for every outbound context (token endpoint and upstream alike).
    context = tls.client_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname


async def test_total_timeout_bounds_an_answer_that_never_comes(make_chain: ChainFactory) -> None:
    chain = await make_chain(upstream={"read_timeout_s": 30, "total_timeout_s": 0.5})
    started = time.monotonic()
    problem = await problem_answer(chain, "GET", DEMO + "/stall?seconds=5")
    assert (problem["status"], problem["reason"]) == (504, "upstream_timeout")
    assert time.monotonic() - started < 4  # the 5 s stall was not waited out


async def test_connection_pool_limit_holds_under_concurrency(
    make_chain: ChainFactory, upstream_fault: FaultProxy
) -> None:
    chain = await through(make_chain, upstream_fault, max_connections=2)

    async def stall(i: int) -> int:
        async with chain.request("GET", f"{DEMO}/stall?seconds=0.3&i={i}") as response:
            await response.read()
            return int(response.status)

    assert await asyncio.gather(*(stall(i) for i in range(6))) == [200] * 6
    assert upstream_fault.max_active <= 2
    assert chain.upstream.count == 6


async def test_redirect_to_the_upstream_itself_is_returned_not_followed(chain: Chain) -> None:
    async with chain.request("GET", f"{DEMO}/redirect?to={DEMO}/followed") as response:
        assert response.status == 302
        assert response.headers["Location"] == f"{DEMO}/followed"
    assert [s.target for s in chain.upstream.seen] == [f"{DEMO}/redirect?to={DEMO}/followed"]


def _loopback_only_host_name() -> str | None:
    """Return this machine's name when it resolves to loopback addresses only."""
    name = socket.gethostname()
    try:
        addresses = {str(info[4][0]) for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        return None
    return name if addresses and all(a.startswith("127.") for a in addresses) else None


async def test_a_listener_bound_to_a_name_not_known_as_loopback_logs_a_warning(
    make_chain: ChainFactory, caplog: pytest.LogCaptureFixture
) -> None:
    name = _loopback_only_host_name()
    if name is None:
        pytest.skip("the host name does not resolve to loopback only; no safe address to bind")
    caplog.set_level(logging.WARNING, "ksz_proxy.app")
    await make_chain(ready=False, listen={"host": name, "allowed_hosts": [name]})
    (warning,) = [r for r in caplog.records if "non-loopback" in r.getMessage()]
    assert getattr(warning, "host", None) == name
    caplog.clear()
    await make_chain(ready=False)  # the default, 127.0.0.1: no warning
    assert not [r for r in caplog.records if "non-loopback" in r.getMessage()]
