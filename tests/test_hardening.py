"""Second hardening round (issue 13, SECURITY 41-48): the hostile review's findings, end to end.

Most tests write exact bytes on a raw socket (``tests/rawhttp.py``) and assert both what the caller
got back and what the fake upstream recorded; the malicious upstream answers come from the fake
upstream's malicious modes (``switch``, ``reflect-token``, ``early``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Final

import pytest

from proxy.sandbox.upstream import FakeUpstream
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO
from tests.support.rawhttp import (
    RawResult,
    assert_problem,
    build,
    close_writer,
    exchange,
    read_responses,
)

MIB: Final = 1024 * 1024


def chunked_head(port: int, path: str = DEMO + "/first", *, extra: str = "") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()


def all_header_names(upstream: FakeUpstream) -> set[str]:
    return {name.lower() for seen in upstream.seen for name, _ in seen.headers}


async def status_lines(port: int, data: bytes) -> list[bytes]:
    """Write ``data`` and return every status line the proxy answered with."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        received = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(65536):
                received += chunk
    finally:
        await close_writer(writer)
    return [line for line in received.split(b"\r\n") if line.startswith(b"HTTP/")]


# -- 41: trailers -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "trailer",
    [
        "X-Original-URL: /REST/other-api/admin",
        "Origin: http://evil.example",
        "X-Trailer-Canary: leaked",
    ],
    ids=["rewrite", "origin", "canary"],
)
async def test_a_trailer_never_reaches_the_next_request_on_the_connection(
    chain: Chain, trailer: str
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    try:
        writer.write(chunked_head(chain.port) + f"3\r\nabc\r\n0\r\n{trailer}\r\n\r\n".encode())
        await writer.drain()
        first = await read_responses(reader, count=1)
        assert first.statuses == [200]
        # The workaround closes the connection after a chunked request: the victim request
        # below must never be read on it (before, it went upstream with the trailer in it).
        try:
            writer.write(build("GET", DEMO + "/victim", chain.port))
            await writer.drain()
            rest = await read_responses(reader)
        except ConnectionError:
            rest = RawResult(responses=[], closed=True)
    finally:
        await close_writer(writer)
    assert rest.closed
    assert [status for status in rest.statuses if status != 200] == []
    name = trailer.partition(":")[0].lower()
    assert name not in all_header_names(chain.upstream)
    assert chain.upstream.seen[0].body_bytes == 3


async def test_a_trailer_never_reaches_a_pipelined_request(chain: Chain) -> None:
    data = (
        chunked_head(chain.port)
        + b"3\r\nabc\r\n0\r\nX-Trailer-Canary: leaked\r\n\r\n"
        + build("GET", DEMO + "/victim", chain.port)
    )
    result = await exchange(chain.port, data)
    assert result.statuses[0] == 200
    assert result.closed
    assert "x-trailer-canary" not in all_header_names(chain.upstream)
    assert [seen.target for seen in chain.upstream.seen] == [DEMO + "/first"]


@pytest.mark.parametrize(
    "path", ["/REST/unrouted/x", DEMO + "/%2e%2e/x"], ids=["no_route", "bad_path"]
)
async def test_a_refused_chunked_request_closes_its_connection_too(chain: Chain, path: str) -> None:
    # An empty body is read to its end by the parser at once: only the close stops the trailer.
    data = (
        chunked_head(chain.port, path)
        + b"0\r\nX-Trailer-Canary: leaked\r\n\r\n"
        + build("GET", DEMO + "/victim", chain.port)
    )
    result = await exchange(chain.port, data)
    assert result.statuses == [404 if "unrouted" in path else 400]
    assert result.responses[0].headers["Connection"] == "close"
    assert result.closed
    assert chain.upstream.count == 0


async def test_a_chunked_request_without_trailers_closes_its_connection_too(chain: Chain) -> None:
    result = await exchange(chain.port, chunked_head(chain.port) + b"3\r\nabc\r\n0\r\n\r\n")
    assert result.only.status == 200
    assert result.only.headers["Connection"] == "close"


# -- 42: slow bodies ------------------------------------------------------------------------------


@pytest.mark.slow
async def test_slow_bodies_do_not_starve_other_callers(make_chain: ChainFactory) -> None:
    chain = await make_chain()  # the defaults: max_in_flight 256, body_read_timeout_s 30
    head = build("POST", DEMO + "/up", chain.port, [("Content-Length", "10")], close=False)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(300):
            _, writer = await asyncio.open_connection("127.0.0.1", chain.port)
            writer.write(head + b"x")
            writers.append(writer)
        for writer in writers:
            await writer.drain()
        await asyncio.sleep(0.5)
        for method, body in (("GET", None), ("POST", b"{}")):
            async with chain.request(method, DEMO + "/probe", data=body) as response:
                assert response.status == 200, await response.read()
    finally:
        for writer in writers:
            await close_writer(writer)
    assert [seen.target for seen in chain.upstream.seen] == [DEMO + "/probe"] * 2


async def test_receiving_bodies_have_their_own_cap(make_chain: ChainFactory) -> None:
    chain = await make_chain(listen={"max_in_flight": 2, "max_receiving": 3})
    head = build("POST", DEMO + "/up", chain.port, [("Content-Length", "10")], close=False)
    writers: list[asyncio.StreamWriter] = []
    try:
        for _ in range(3):
            _, writer = await asyncio.open_connection("127.0.0.1", chain.port)
            writer.write(head + b"x")
            await writer.drain()
            writers.append(writer)
        await asyncio.sleep(0.3)
        # In flight is free: a GET goes through; one more body is over the receiving cap.
        async with chain.request("GET", DEMO + "/probe") as response:
            assert response.status == 200
        result = await exchange(chain.port, head + b"0123456789")
        assert_problem(result.only, 503, "overloaded")
    finally:
        for writer in writers:
            await close_writer(writer)
    assert [seen.target for seen in chain.upstream.seen] == [DEMO + "/probe"]


# -- 43: rewrite and identity headers ------------------------------------------------------------

REWRITE_AND_IDENTITY: Final = (
    "X-Forwarded-Client-Cert",
    "X-Original-URL",
    "X-Rewrite-URL",
    "X-Forwarded-Uri",
    "X-Forwarded-Path",
    "X-Forwarded-Scheme",
    "X-Forwarded-Ssl",
    "X-Forwarded-Anything-New",
    "True-Client-IP",
    "X-Client-IP",
    "X-Real-IP",
    "Forwarded",
    "X-HTTP-Method-Override",
)


async def test_rewrite_and_identity_headers_never_reach_the_upstream(chain: Chain) -> None:
    headers = [(name, "/REST/other-api/admin") for name in REWRITE_AND_IDENTITY]
    headers += [(name.lower(), "10.0.0.1") for name in REWRITE_AND_IDENTITY]
    headers.append(("X-Kept", "kept"))
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, headers))
    assert result.only.status == 200
    names = all_header_names(chain.upstream)
    assert not names & {name.lower() for name in REWRITE_AND_IDENTITY}
    assert not [name for name in names if name.startswith("x-forwarded-")]
    assert chain.upstream.seen[-1].header_values("X-Kept") == ["kept"]


@pytest.mark.parametrize("name", ["X_Forwarded_For", "Proxy_Authorization", "x_custom"])
async def test_header_names_with_underscores_are_refused(chain: Chain, name: str) -> None:
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, [(name, "1")]))
    assert_problem(result.only, 400, "bad_header")
    assert result.closed
    assert chain.upstream.count == 0


# -- 44: framing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "coding"),
    [
        ("HTTP/1.1", "identity, chunked"),
        ("HTTP/1.1", "gzip, chunked"),
        ("HTTP/1.1", "chunked, chunked"),
        ("HTTP/1.0", "chunked"),
    ],
)
async def test_transfer_coding_other_than_chunked_is_400(
    chain: Chain, version: str, coding: str
) -> None:
    data = (
        f"POST {DEMO}/x {version}\r\nHost: 127.0.0.1:{chain.port}\r\n"
        f"Transfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    result = await exchange(chain.port, data)
    assert result.statuses == [400]
    assert result.closed
    await asyncio.sleep(0.05)
    assert chain.upstream.count == 0


@pytest.mark.parametrize("coding", ["Chunked", "CHUNKED", "chunked"])
async def test_chunked_in_any_case_is_valid(chain: Chain, coding: str) -> None:
    data = (
        f"POST {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n"
        f"Connection: close\r\nTransfer-Encoding: {coding}\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ).encode()
    result = await exchange(chain.port, data)
    assert result.statuses == [200]
    assert chain.upstream.seen[-1].body_sha256 == hashlib.sha256(b"hello").hexdigest()


# -- 45: upgrades from the upstream ---------------------------------------------------------------


async def test_an_upstream_101_is_502_and_its_connection_never_reused(chain: Chain) -> None:
    result = await exchange(chain.port, build("GET", DEMO + "/switch", chain.port))
    assert_problem(result.only, 502, "upstream_protocol")
    # The next request must not read the answer queued behind the 101.
    for _ in range(3):
        result = await exchange(chain.port, build("GET", DEMO + "/after", chain.port))
        assert result.only.status == 200
        assert "X-Desync" not in result.only.headers
        assert result.only.body != b"smuggled"
    switch, *after = chain.upstream.seen
    assert switch.target == DEMO + "/switch"
    assert switch.connection not in {seen.connection for seen in after}


# -- 46: header values and chunk extensions ------------------------------------------------------


async def test_a_header_value_that_is_not_ascii_is_refused_or_forwarded_exactly(
    chain: Chain,
) -> None:
    head = f"GET {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\nConnection: close\r\n"
    for value in (b"caf\xe9", b"caf\xc3\xa9", b"\xff\xfe"):
        result = await exchange(chain.port, head.encode() + b"X-Name: " + value + b"\r\n\r\n")
        if result.only.status == 400:
            assert_problem(result.only, 400, "bad_header")
            continue
        assert result.only.status == 200
        seen = chain.upstream.seen[-1]
        assert seen.header_values("X-Name") == [value.decode("latin-1")], value
    # Never forwarded altered: what went up is exactly what one of the requests carried.


async def test_a_long_chunk_extension_is_400(chain: Chain) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    reading = asyncio.create_task(read_responses(reader))
    sent = 0
    try:
        writer.write(chunked_head(chain.port) + b"5;ext=")
        while sent < 20 * MIB and not reading.done():
            try:
                writer.write(b"a" * (256 * 1024))
                await writer.drain()
            except ConnectionError:
                break
            sent += 256 * 1024
        result = await reading
    finally:
        await close_writer(writer)
    assert_problem(result.only, 400, "bad_chunk")
    assert result.closed
    assert sent < 20 * MIB
    assert chain.upstream.count == 0


async def test_short_chunk_extensions_and_small_chunks_are_served(chain: Chain) -> None:
    body = b"".join(b"1;name=value\r\n" + bytes([65 + i % 26]) + b"\r\n" for i in range(3000))
    head = chunked_head(chain.port, extra="Connection: close\r\n")
    result = await exchange(chain.port, head + body + b"0\r\n\r\n")
    assert result.only.status == 200
    expected = bytes(65 + i % 26 for i in range(3000))
    assert chain.upstream.seen[-1].body_sha256 == hashlib.sha256(expected).hexdigest()


# -- 47: HEAD, 1xx --------------------------------------------------------------------------------


async def test_head_keeps_the_upstream_content_length(chain: Chain) -> None:
    for size in (5000, 200_000):
        data = build("HEAD", f"{DEMO}/stream?bytes={size}", chain.port)
        (line, *fields) = (await head_answer(chain.port, data)).split(b"\r\n")
        assert line.startswith(b"HTTP/1.1 200 ")
        assert f"Content-Length: {size}".encode() in fields


async def head_answer(port: int, data: bytes) -> bytes:
    """Write ``data`` and return the answer's head; fail if anything follows it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            received = await reader.read()
    finally:
        await close_writer(writer)
    head, _, rest = received.partition(b"\r\n\r\n")
    assert rest == b""
    return head


# -- 48: the token sent back ----------------------------------------------------------------------


async def test_a_reflected_token_is_removed_and_counted(chain: Chain) -> None:
    result = await exchange(chain.port, build("GET", DEMO + "/reflect-token", chain.port))
    assert result.only.status == 200
    token = next(iter(chain.auth.server.issued.values())).value
    for name, value in result.only.headers.items():
        assert token not in value, name
    assert "X-Debug-Authorization" not in result.only.headers
    assert "X-Debug-Note" not in result.only.headers
    assert result.only.headers["X-Kept"] == "kept"
    async with chain.session.get(chain.proxy.admin_url + "/metrics") as response:
        metrics = await response.text()
    assert f'kszproxy_token_reflected_total{{route="{DEMO}"}} 2.0' in metrics


# -- refusal status lines (issue 13, finding 10) ------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GET /REST/demo/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: a\x00b\r\n\r\n",
        b"GET /REST/demo/v1/x HTTP/1.0\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /REST/demo/v1/x\r\nHost: 127.0.0.1\r\n\r\n",
        b"GET /REST/demo/v1/x HTTP/0.9\r\nHost: 127.0.0.1\r\n\r\n",
        b"GARBAGE\r\n\r\n",
    ],
    ids=["nul", "http10_two_lengths", "no_version", "http09", "garbage"],
)
async def test_refusals_answer_with_an_http11_status_line(chain: Chain, data: bytes) -> None:
    lines = await status_lines(chain.port, data)
    assert len(lines) == 1
    assert lines[0].startswith(b"HTTP/1.1 400 "), lines
    assert chain.upstream.count == 0


# -- early answers (issue 13, finding 11) -------------------------------------------------------


@pytest.mark.parametrize("keep", ["0", "1"], ids=["upstream_closes", "upstream_keeps"])
@pytest.mark.parametrize("status", [413, 401])
async def test_an_early_upstream_answer_is_relayed_and_its_connection_dropped(
    make_chain: ChainFactory, status: int, keep: str
) -> None:
    chain = await make_chain(upstream={"replay_max_bytes": 64 * 1024})
    size = 8 * MIB
    head = build(
        "POST",
        f"{DEMO}/early?status={status}&keep={keep}",
        chain.port,
        [("Content-Length", str(size))],
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    reading = asyncio.create_task(read_responses(reader, timeout_s=10))
    try:
        writer.write(head)
        block = b"b" * (256 * 1024)
        for _ in range(size // len(block)):
            if reading.done():
                break
            try:
                writer.write(block)
                await writer.drain()
            except ConnectionError:
                break
        result = await reading
    finally:
        await close_writer(writer)
    assert result.statuses == [status]
    assert result.closed
    # The upstream connection that answered early is never used again.
    async with chain.request("GET", DEMO + "/after") as response:
        assert response.status == 200
    early, after = chain.upstream.seen
    assert early.connection != after.connection
