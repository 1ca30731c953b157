"""Resource limits end to end: body size and time, idle connections, in-flight cap, disconnects,
streaming memory, upstream timeouts and TLS names, bad tokens, proxy variables.

Raw-socket cases reuse the small HTTP/1.1 client of ``test_hostile``.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trustme

from proxy.sandbox.authserver import Fault
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream, stream_chunks, stream_sha256
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO
from tests.support.fakes import AuthServerHandle
from tests.support.rawhttp import assert_problem, build, close_writer, exchange, read_responses
from tests.support.rss import rss_bytes
from tests.support.wait import until

MIB: Final = 1024 * 1024


@asynccontextmanager
async def tcp_listener() -> AsyncIterator[tuple[int, list[int]]]:
    """Run a plain TCP server that accepts and never answers; yield its port and a counter."""
    accepted: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        writers.append(writer)
        try:
            await reader.read()
        except ConnectionError:
            pass

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()
        for writer in writers:
            await close_writer(writer)
        await server.wait_closed()


# -- G28: body size -------------------------------------------------------------------------------


async def test_declared_body_over_the_limit_is_413_before_100_continue(
    make_chain: ChainFactory,
) -> None:
    chain = await make_chain(listen={"max_body_bytes": 1000})
    for expect in ([("Expect", "100-continue")], []):
        headers = [("Content-Length", "5000"), ("Content-Type", "application/json"), *expect]
        # Headers only: the answer must come before any body byte is sent.
        data = build("POST", DEMO + "/up", chain.port, headers, close=False)
        result = await exchange(chain.port, data, count=1)
        assert result.statuses == [413], expect
        assert_problem(result.only, 413, "payload_too_large")
        assert result.only.headers["Connection"] == "close"
    assert chain.upstream.count == 0


@pytest.mark.parametrize("case", ["too_large", "too_slow"])
async def test_connection_is_closed_soon_after_a_refused_body(
    make_chain: ChainFactory, case: str
) -> None:
    chain = await make_chain(listen={"max_body_bytes": 1000, "body_read_timeout_s": 0.5})
    length = "5000" if case == "too_large" else "100"
    data = build("POST", DEMO + "/up", chain.port, [("Content-Length", length)], close=False)
    result = await exchange(chain.port, data + b"0123456789", timeout_s=3.0)
    assert result.statuses == [413 if case == "too_large" else 408]
    assert result.closed


async def test_chunked_body_crossing_the_limit_is_413_and_the_upstream_aborted(
    make_chain: ChainFactory,
) -> None:
    chain = await make_chain(listen={"max_body_bytes": 1000}, upstream={"replay_max_bytes": 100})
    head = build("POST", DEMO + "/up", chain.port, [("Transfer-Encoding", "chunked")], close=False)
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(head)
        reading = asyncio.create_task(read_responses(reader, count=1))
        for _ in range(25):
            if reading.done():
                break
            writer.write(b"c8\r\n" + b"z" * 200 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.02)
        result = await reading
    finally:
        await close_writer(writer)
    assert_problem(result.only, 413, "payload_too_large")
    assert result.only.headers["Connection"] == "close"
    # The upstream may have started receiving: it must never have seen a whole body.
    await until(lambda: all(not seen.body_complete for seen in chain.upstream.seen), 3.0)
    assert all(seen.body_bytes <= 1000 for seen in chain.upstream.seen)


async def test_expect_100_continue_under_the_limit_is_forwarded(make_chain: ChainFactory) -> None:
    chain = await make_chain(listen={"max_body_bytes": 1000})
    body = b"q" * 800
    headers = [("Content-Length", str(len(body))), ("Expect", "100-continue")]
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(build("POST", DEMO + "/up", chain.port, headers))
        interim = await read_responses(reader, count=1)
        assert interim.statuses == [100]
        writer.write(body)
        await writer.drain()
        final = await read_responses(reader)
    finally:
        await close_writer(writer)
    assert final.statuses == [200]
    seen = chain.upstream.seen[-1]
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header_values("Expect") == []


async def test_other_expectations_are_refused(chain: Chain) -> None:
    headers = [("Content-Length", "5"), ("Expect", "200-ok")]
    result = await exchange(chain.port, build("POST", DEMO + "/up", chain.port, headers), count=1)
    assert_problem(result.only, 400, "bad_expect")
    assert chain.upstream.count == 0


# -- G27: slow bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize("replay_max_bytes", [1024, 0], ids=["buffered", "streamed"])
async def test_slow_body_is_408(make_chain: ChainFactory, replay_max_bytes: int) -> None:
    chain = await make_chain(
        listen={"body_read_timeout_s": 0.5}, upstream={"replay_max_bytes": replay_max_bytes}
    )
    data = build("POST", DEMO + "/up", chain.port, [("Content-Length", "100")], close=False)
    started = time.monotonic()
    result = await exchange(chain.port, data + b"0123456789", count=1)
    assert time.monotonic() - started < 4.0
    assert_problem(result.only, 408, "body_timeout")
    assert result.only.headers["Connection"] == "close"
    await until(lambda: all(not seen.body_complete for seen in chain.upstream.seen), 3.0)


# -- G26: idle and slow-header connections --------------------------------------------------------


@pytest.mark.parametrize("sent", [b"", b"GET /REST/de"], ids=["idle", "slow_headers"])
async def test_idle_connections_are_closed(make_chain: ChainFactory, sent: bytes) -> None:
    chain = await make_chain(listen={"keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(sent)
        await writer.drain()
        result = await read_responses(reader, timeout_s=3.0)
    finally:
        await close_writer(writer)
    assert result.closed
    assert all(status >= 400 for status in result.statuses)
    assert chain.upstream.count == 0


async def test_idle_keep_alive_after_a_request_is_closed(make_chain: ChainFactory) -> None:
    chain = await make_chain(listen={"keepalive_timeout_s": 0.5})
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(build("GET", DEMO + "/x", chain.port, close=False))
        await writer.drain()
        first = await read_responses(reader, count=1)
        assert first.statuses == [200]
        rest = await read_responses(reader, timeout_s=3.0)
    finally:
        await close_writer(writer)
    assert rest.closed
    assert rest.statuses == []


# -- G32: in-flight cap ---------------------------------------------------------------------------


async def test_in_flight_cap_answers_503_fast(make_chain: ChainFactory) -> None:
    chain = await make_chain(listen={"max_in_flight": 2})

    async def stall() -> int:
        async with chain.request("GET", DEMO + "/stall?seconds=3") as response:
            return int(response.status)

    stalled = [asyncio.create_task(stall()) for _ in range(2)]
    try:
        await until(lambda: chain.proxy.drain.in_flight == 2)
        started = time.monotonic()
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 503
            body = await response.read()
        # Not a speed check: the answer must not wait for a slot (the stalls end at 3 s).
        assert time.monotonic() - started < 2.0
        assert response.content_type == "application/problem+json"
        assert b'"reason": "overloaded"' in body
        assert int(response.headers["Retry-After"]) >= 1
    finally:
        for task in stalled:
            task.cancel()
        await asyncio.gather(*stalled, return_exceptions=True)
    assert [seen.target for seen in chain.upstream.seen] == [DEMO + "/stall?seconds=3"] * 2
    await until(lambda: chain.proxy.drain.in_flight == 0)
    async with chain.request("GET", DEMO + "/after") as response:
        assert response.status == 200


# -- G33: caller disconnects ----------------------------------------------------------------------


async def test_caller_disconnect_cancels_the_upstream_request(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/warm") as response:
        assert response.status == 200
    await asyncio.sleep(0.1)
    baseline = len(asyncio.all_tasks())
    _, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(build("GET", DEMO + "/stall?seconds=10", chain.port))
        await writer.drain()
        await until(lambda: chain.upstream.count == 2)
        assert chain.proxy.drain.in_flight == 1
        # The proxy's handler and the fake upstream's stalled handler are both running now.
        assert len(asyncio.all_tasks()) > baseline
    finally:
        await close_writer(writer)
    await until(lambda: chain.proxy.drain.in_flight == 0, 2.0)
    # Both handlers are gone: nothing waits out the 10 s stall (the token refresher may tick).
    await until(lambda: len(asyncio.all_tasks()) <= baseline + 1, 2.0)


# -- G30: streaming memory ------------------------------------------------------------------------


@pytest.mark.slow
async def test_100_mib_up_and_down_in_bounded_memory(make_chain: ChainFactory) -> None:
    size = 100 * MIB
    chain = await make_chain(listen={"max_body_bytes": 2 * size})
    expected = stream_sha256(size)
    async with chain.request("GET", DEMO + "/stream/?bytes=1000") as response:
        await response.read()
    peak = [0]
    before = rss_bytes()

    async def sample() -> None:
        while True:
            peak[0] = max(peak[0], rss_bytes())
            await asyncio.sleep(0.05)

    async def upload() -> AsyncIterator[bytes]:
        for chunk in stream_chunks(size):
            yield chunk

    sampler = asyncio.create_task(sample())
    try:
        async with asyncio.timeout(40):
            async with chain.request("PUT", DEMO + "/up", data=upload()) as response:
                assert response.status == 200
                await response.read()
            seen = chain.upstream.seen[-1]
            assert (seen.body_bytes, seen.body_sha256) == (size, expected)
            assert peak[0] - before < 50 * MIB, "upload"

            digest = hashlib.sha256()
            received = 0
            async with chain.request("GET", DEMO + f"/stream/?bytes={size}") as response:
                assert response.status == 200
                async for chunk in response.content.iter_chunked(256 * 1024):
                    digest.update(chunk)
                    received += len(chunk)
            assert (received, digest.hexdigest()) == (size, expected)
            assert peak[0] - before < 50 * MIB, "download"
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    assert rss_bytes() - before < 50 * MIB


# -- G31: upstream timeouts -----------------------------------------------------------------------


async def test_black_hole_upstream_is_504(make_chain: ChainFactory) -> None:
    async with tcp_listener() as (port, accepted):
        chain = await make_chain(
            upstream={"connect_timeout_s": 0.3, "read_timeout_s": 0.5},
            routes=[{"prefix": DEMO, "upstream": f"https://127.0.0.1:{port}"}],
        )
        started = time.monotonic()
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 504
            problem = await response.json(content_type=None)
        assert time.monotonic() - started < 3.0
        assert problem["reason"] == "upstream_timeout"
        assert accepted == [1]


# -- C14: a token that is not a b64token ----------------------------------------------------------


async def test_token_with_crlf_is_refused(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    body = {"access_token": "a\r\nX-Injected: y", "token_type": "Bearer", "expires_in": 60}
    authserver.server.inject(Fault(kind="response", status=200, body=body), times=1000)
    chain = await make_chain(ready=False)
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 503
        problem = await response.json(content_type=None)
        assert "X-Injected" not in response.headers
    assert problem["reason"] == "token_invalid_response"
    assert chain.auth.server.token_requests >= 1
    assert chain.upstream.count == 0


# -- E20: TLS names -------------------------------------------------------------------------------


async def test_upstream_certificate_for_another_name_is_502_tls(
    make_chain: ChainFactory, tls_ca: trustme.CA
) -> None:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("wrong.example").configure_cert(context)
    impostor = FakeUpstream()
    served = await serve(impostor.make_app(), ssl_context=context)
    try:
        chain = await make_chain(routes=[{"prefix": DEMO, "upstream": served.url}])
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 502
            problem = await response.json(content_type=None)
        assert problem["reason"] == "upstream_tls"
    finally:
        await served.close()
    assert impostor.count == 0


# -- E21: proxy variables -------------------------------------------------------------------------


def _proxy_variables(url: str) -> Iterator[tuple[str, str]]:
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        yield name, url
        yield name.lower(), url


async def test_proxy_environment_variables_are_ignored(
    make_chain: ChainFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with tcp_listener() as (port, accepted):
        for name, value in _proxy_variables(f"http://127.0.0.1:{port}"):
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        chain = await make_chain()
        async with chain.request("GET", DEMO + "/x") as response:
            assert response.status == 200
        assert chain.upstream.count == 1
        assert accepted == []


async def test_a_caller_that_stops_reading_is_cut_and_frees_its_slot(
    make_chain: ChainFactory,
) -> None:
    # Found by review: upstream.total_timeout_s never ran while the proxy waited to write to a
    # caller that took nothing, so a few such callers held every in-flight slot. A write to the
    # caller now gets upstream.read_timeout_s; past it the caller counts as gone (499).
    chain = await make_chain(upstream={"read_timeout_s": 1.0}, listen={"max_in_flight": 1})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", chain.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(build("GET", DEMO + "/stream?bytes=200000000", chain.port, close=False))
        await writer.drain()
        assert (await reader.read(12)).startswith(b"HTTP/1.1 200")
        await until(lambda: chain.proxy.drain.in_flight == 1)
        # The caller reads nothing more; within a few read timeouts its slot is free again.
        await until(lambda: chain.proxy.drain.in_flight == 0, 10.0)
        async with chain.request("GET", DEMO + "/after") as response:
            assert response.status == 200
    finally:
        await close_writer(writer)
