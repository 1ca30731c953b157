"""The upstream client (proxy/upstream_client.py) against a scripted raw HTTPS upstream.

Each criterion of issue 17 is one test here: the request goes out byte-exact with nothing added,
no redirect is followed, nothing is decompressed, one framing, streaming with backpressure both
ways, verified TLS (custom CA, client certificate), CONNECT through an egress proxy, per-phase
timeouts, and a strict answer parser whose refusals never leave a connection in the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from multidict import CIMultiDict

from proxy.errors import ProxyTunnelError, UpstreamError, UpstreamTimeout
from proxy.tls import client_context
from proxy.upstream_client import EgressProxy, UpstreamClient, UpstreamResponse
from tests.support.rawupstream import Answer, RawUpstream, answer


def make_client(context: ssl.SSLContext, **kwargs: Any) -> UpstreamClient:
    settings: dict[str, Any] = {
        "max_connections": 10,
        "connect_timeout_s": 2.0,
        "read_timeout_s": 2.0,
        "total_timeout_s": 10.0,
    }
    settings.update(kwargs)
    return UpstreamClient(ssl_context=context, **settings)


@contextlib.asynccontextmanager
async def client_for(context: ssl.SSLContext, **kwargs: Any) -> AsyncIterator[UpstreamClient]:
    client = make_client(context, **kwargs)
    try:
        yield client
    finally:
        await client.close()


async def get(
    client: UpstreamClient, upstream: RawUpstream, target: str = "/x", **kwargs: Any
) -> tuple[UpstreamResponse, bytes]:
    method = kwargs.pop("method", "GET")
    headers = kwargs.pop("headers", CIMultiDict())
    response = await client.request(method, upstream.origin, target, headers, **kwargs)
    try:
        body = await response.read()
    finally:
        response.release()
    return response, body


# -- what goes out ------------------------------------------------------------------------------


async def test_the_request_goes_out_byte_exact_with_nothing_added(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    target = "/a/%7e/./b/../c%2F;p=1?x=%2F&y=caf%C3%A9&&z=%zz#no"
    headers = CIMultiDict(
        [("x-lower", "v"), ("X-UPPER", "caf\u00e9"), ("X-Dup", "1"), ("X-Dup", "2"), ("Accept", "")]
    )
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        response, body = await get(client, upstream, target, headers=headers)
    assert (response.status, body) == (200, b"ok")
    (seen,) = upstream.seen
    assert (
        seen.head
        == (
            f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
            "x-lower: v\r\nX-UPPER: caf\u00e9\r\nX-Dup: 1\r\nX-Dup: 2\r\nAccept: \r\n\r\n"
        ).encode()
    )


async def test_the_upstream_path_prefixes_the_target(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        await client.request("GET", upstream.origin + "/base/", "/x?q", CIMultiDict())
        assert upstream.seen[0].head.startswith(b"GET /base/x?q HTTP/1.1\r\n")


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/x y", []),
        ("/x\r\nX-Evil: 1", []),
        ("/x", [("X-A", "1\r\nX-Evil: 1")]),
        ("/x", [("X-A", "1\nX-Evil: 1")]),
        ("/x", [("X-A", "a\x00b")]),
    ],
)
async def test_a_head_that_would_split_is_refused_before_sending(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, target: str, headers: Any
) -> None:
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        with pytest.raises(UpstreamError):
            await client.request("GET", upstream.origin, target, CIMultiDict(headers))
    assert upstream.connections == 0


async def test_one_framing_per_body(server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext) -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"abc"
        yield b""
        yield b"def"

    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        await get(client, upstream, method="POST", body=parts())
        await get(
            client,
            upstream,
            method="POST",
            body=parts(),
            length=6,
            headers=CIMultiDict({"Content-Length": "6"}),
        )
        await get(
            client,
            upstream,
            method="PUT",
            body=b"xyz",
            headers=CIMultiDict({"Content-Length": "3"}),
        )
        await get(client, upstream, method="POST")
    chunked, counted, whole, empty = upstream.seen
    assert b"Transfer-Encoding: chunked\r\n" in chunked.head
    assert b"Content-Length" not in chunked.head
    assert chunked.body == b"abcdef"
    assert counted.head.count(b"Content-Length: 6\r\n") == 1
    assert b"Transfer-Encoding" not in counted.head
    assert counted.body == whole.body + b"" or counted.body == b"abcdef"
    assert whole.body == b"xyz"
    assert empty.head.endswith(b"Content-Length: 0\r\n\r\n")


async def test_redirects_and_compressed_answers_come_back_as_they_are(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    packed = gzip.compress(b"hello" * 100)
    answers = iter(
        [
            answer(302, b"", "Location: https://127.0.0.1:1/elsewhere", reason="Found"),
            answer(200, packed, "Content-Encoding: gzip"),
        ]
    )
    async with RawUpstream(server_ssl, lambda head: next(answers)) as upstream:
        async with client_for(client_ssl) as client:
            moved, _ = await get(client, upstream)
            packed_response, body = await get(client, upstream)
    assert (moved.status, moved.reason, moved.headers["Location"]) == (
        302,
        "Found",
        "https://127.0.0.1:1/elsewhere",
    )
    assert body == packed
    assert packed_response.headers["Content-Encoding"] == "gzip"
    assert len(upstream.seen) == 2


# -- the answer parser ----------------------------------------------------------------------------

MALFORMED = {
    "te_and_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n",
    "two_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "same_cl_twice": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "cl_list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nab",
    "signed_cl": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nab",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nab",
    "nul_in_name": b"HTTP/1.1 200 OK\r\nX\x00A: ab\r\nContent-Length: 2\r\n\r\nab",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 2\r\n\r\nab",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nab",
    "http_0_9": b"hello world\r\n",
    "bad_version": b"HTTP/2.7 200 OK\r\nContent-Length: 2\r\n\r\nab",
    "bad_status": b"HTTP/1.1 2OO OK\r\nContent-Length: 2\r\n\r\nab",
    "obfuscated_te": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: xchunked\r\n\r\nab",
    "bad_chunk_size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nab\r\n0\r\n\r\n",
    "switching_protocols": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\n\r\n",
    "bare_101": b"HTTP/1.1 101 Switching Protocols\r\n\r\n",
}


@pytest.mark.parametrize("name", MALFORMED)
async def test_malformed_answers_are_refused_and_the_connection_dropped(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, name: str
) -> None:
    answers = iter([MALFORMED[name], answer()])
    async with RawUpstream(server_ssl, lambda head: next(answers)) as upstream:
        async with client_for(client_ssl) as client:
            with pytest.raises(UpstreamError) as caught:
                await get(client, upstream)
            assert caught.value.reason in {"protocol", "reset"}
            response, body = await get(client, upstream)
    assert (response.status, body) == (200, b"ok")
    assert upstream.connections == 2  # the refused answer's connection was not reused


@pytest.mark.parametrize(
    ("first", "tail", "method"),
    [
        (answer(200), answer(200, b"extra"), "GET"),  # a second answer to one request
        (b"HTTP/1.1 204 No Content\r\n\r\n", b"body", "GET"),  # a body on 204
        (b"HTTP/1.1 304 Not Modified\r\n\r\n", b"body", "GET"),
    ],
    ids=["appended_answer", "body_on_204", "body_on_304"],
)
async def test_bytes_after_a_complete_answer_are_refused_and_never_reused(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext, first: bytes, tail: bytes, method: str
) -> None:
    answers = iter([first, answer()])
    async with RawUpstream(server_ssl, lambda head: next(answers), tail=tail) as upstream:
        async with client_for(client_ssl) as client:
            with pytest.raises(UpstreamError) as caught:
                await get(client, upstream, method=method)
            assert caught.value.reason == "protocol"
            upstream.tail = b""
            response, body = await get(client, upstream)
    assert (response.status, body) == (200, b"ok")
    assert upstream.connections == 2


async def test_a_head_answer_is_complete_without_a_body_and_not_reused(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    head_answer = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"
    answers = iter([head_answer, answer()])
    async with RawUpstream(server_ssl, lambda head: next(answers)) as upstream:
        async with client_for(client_ssl) as client:
            response, body = await get(client, upstream, method="HEAD")
            assert (response.status, body, response.headers["Content-Length"]) == (200, b"", "1000")
            await get(client, upstream)
    assert upstream.connections == 2


async def test_a_body_cut_short_is_reset(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    cut = b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabcde"

    def script(head: bytes) -> bytes:
        return cut

    async with RawUpstream(server_ssl, script) as upstream, client_for(client_ssl) as client:
        upstream.script = lambda head: "close"  # answer nothing more after the cut
        response = None

        def once(head: bytes) -> Any:
            upstream.script = lambda head: "close"
            raise_after = cut
            return raise_after

        upstream.script = once
        # the server keeps the connection open after the cut bytes: close it from a task
        response = await client.request("GET", upstream.origin, "/x", CIMultiDict())
        assert await response.read_chunk() == b"abcde"
        for task in list(upstream._tasks):
            task.cancel()
        with pytest.raises(UpstreamError) as caught:
            await response.read_chunk()
        response.release()
    assert caught.value.reason == "reset"


async def test_interim_answers_are_skipped(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    async with RawUpstream(server_ssl, lambda head: interim + answer()) as upstream:
        async with client_for(client_ssl) as client:
            response, body = await get(client, upstream)
            await get(client, upstream)
    assert (response.status, body, "Link" in response.headers) == (200, b"ok", False)
    assert upstream.connections == 1


async def test_an_answer_ending_with_the_connection_is_complete(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        upstream.script = lambda head: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"
        response = await client.request("GET", upstream.origin, "/x", CIMultiDict())
        await asyncio.sleep(0.05)
        for task in list(upstream._tasks):
            task.cancel()
        body = await response.read()
        response.release()
    assert body == b"all of it"


# -- streaming ------------------------------------------------------------------------------------


async def test_a_request_body_is_pulled_only_as_fast_as_the_upstream_reads(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    pulled = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 65536

    async with RawUpstream(server_ssl, lambda head: "hang", read_body=False) as upstream:
        async with client_for(client_ssl, read_timeout_s=0.5) as client:
            with pytest.raises(UpstreamTimeout):
                await client.request("POST", upstream.origin, "/up", CIMultiDict(), body=endless())
    # The upstream never read: the socket buffers hold a few MiB, the rest was never pulled.
    assert 0 < pulled * 65536 < 32 * 1024 * 1024


async def test_an_answer_is_read_only_as_fast_as_the_caller_takes_it(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    size = 256 * 1024 * 1024
    written = 0

    class Counting(RawUpstream):
        pass

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal written
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
        chunk = b"y" * 65536
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            while written < size:
                writer.write(chunk)
                written += len(chunk)
                await writer.drain()
        writer.transport.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for(client_ssl) as client:
            response = await client.request("GET", f"https://127.0.0.1:{port}", "/", CIMultiDict())
            assert len(await response.read_chunk()) > 0
            await asyncio.sleep(0.5)  # the caller takes nothing for a while
            assert written < 32 * 1024 * 1024
            response.release()
    finally:
        server.close()


# -- TLS ------------------------------------------------------------------------------------------


async def test_an_untrusted_upstream_is_tls_and_sees_no_request(server_ssl: ssl.SSLContext) -> None:
    stranger = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode("ascii"))
    async with RawUpstream(server_ssl) as upstream, client_for(stranger) as client:
        with pytest.raises(UpstreamError) as caught:
            await get(client, upstream)
    assert caught.value.reason == "tls"
    assert upstream.seen == []


async def test_a_certificate_for_another_name_is_tls(
    tls_ca: trustme.CA, client_ssl: ssl.SSLContext
) -> None:
    other = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("elsewhere.example").configure_cert(other)
    async with RawUpstream(other) as upstream, client_for(client_ssl) as client:
        with pytest.raises(UpstreamError) as caught:
            await get(client, upstream)
    assert caught.value.reason == "tls"
    assert upstream.seen == []


async def test_a_client_certificate_is_presented_when_configured(tls_ca: trustme.CA) -> None:
    demanding = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("127.0.0.1").configure_cert(demanding)
    demanding.verify_mode = ssl.CERT_REQUIRED
    tls_ca.configure_trust(demanding)
    anonymous = ssl.create_default_context(cadata=tls_ca.cert_pem.bytes().decode("ascii"))
    identified = ssl.create_default_context(cadata=tls_ca.cert_pem.bytes().decode("ascii"))
    tls_ca.issue_cert("partner.example").configure_cert(identified)
    async with RawUpstream(demanding) as upstream:
        async with client_for(identified) as client:
            response, _ = await get(client, upstream)
            assert response.status == 200
        async with client_for(anonymous) as client:
            with pytest.raises(UpstreamError):
                await get(client, upstream)
    assert len(upstream.seen) == 1


# -- egress proxy ---------------------------------------------------------------------------------


class ConnectProxy:
    """A forward proxy: CONNECT host:port with Basic credentials, then bytes both ways."""

    def __init__(self, credentials: str | None) -> None:
        self.credentials = credentials
        self.heads: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        expected = f"Proxy-Authorization: {self.credentials}\r\n".encode()
        if self.credentials is not None and expected not in head:
            writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            writer.close()
            return
        target = head.split(b" ")[1].decode()
        host, port = target.rsplit(":", 1)
        up_reader, up_writer = await asyncio.open_connection(host, int(port))
        self.writers.append(up_writer)
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))


async def test_connect_through_an_egress_proxy_with_basic_credentials(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    basic = "Basic dXNlcjpzM2NyZXQ="
    async with RawUpstream(server_ssl) as upstream, ConnectProxy(basic) as proxy:
        egress = EgressProxy("127.0.0.1", proxy.port, basic)
        async with client_for(client_ssl) as client:
            response, body = await get(client, upstream, "/through", egress=egress)
            await get(client, upstream, "/again", egress=egress)
    assert (response.status, body) == (200, b"ok")
    assert proxy.heads == [
        f"CONNECT 127.0.0.1:{upstream.port} HTTP/1.1\r\nHost: 127.0.0.1:{upstream.port}\r\n"
        f"Proxy-Authorization: {basic}\r\n\r\n".encode()
    ]
    assert [s.head.split(b" ")[1] for s in upstream.seen] == [b"/through", b"/again"]
    assert "s3cret" not in repr(egress) and "dXNl" not in repr(egress)


async def test_an_egress_proxy_refusing_the_tunnel_is_a_proxy_failure(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with RawUpstream(server_ssl) as upstream, ConnectProxy("Basic other") as proxy:
        egress = EgressProxy("127.0.0.1", proxy.port, "Basic wrong")
        async with client_for(client_ssl) as client:
            with pytest.raises(ProxyTunnelError) as caught:
                await get(client, upstream, egress=egress)
    # The forward proxy's fault (reason "proxy", as on the forwarding path), with its answer.
    assert (caught.value.reason, caught.value.proxy_status) == ("proxy", 407)
    assert "wrong" not in str(caught.value) and "wrong" not in repr(caught.value)
    assert upstream.seen == []


async def test_tunnels_are_pooled_per_proxy_and_origin(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    # One client, one origin, reached directly and through two proxies: three pools, each
    # connection kept alive and reused by its own kind of request only.
    async with (
        RawUpstream(server_ssl) as upstream,
        ConnectProxy(None) as first,
        ConnectProxy("Basic b3RoZXI6eA==") as second,
        client_for(client_ssl) as client,
    ):
        ways = [
            None,
            EgressProxy("127.0.0.1", first.port),
            EgressProxy("127.0.0.1", second.port, "Basic b3RoZXI6eA=="),
        ]
        for _ in range(3):
            for way in ways:
                response, _ = await get(client, upstream, egress=way)
                assert response.status == 200
    assert len(first.heads) == 1
    assert len(second.heads) == 1
    assert upstream.connections == 3
    assert [s.connection for s in upstream.seen] == [1, 2, 3] * 3


async def test_an_unreachable_egress_proxy_is_a_proxy_failure(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    closed = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = closed.sockets[0].getsockname()[1]
    closed.close()
    await closed.wait_closed()
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        for host in ("127.0.0.1", "proxy.invalid"):
            with pytest.raises(ProxyTunnelError) as caught:
                await get(client, upstream, egress=EgressProxy(host, port))
            assert (caught.value.reason, caught.value.proxy_status) == ("proxy", None)
    assert upstream.connections == 0


# -- timeouts, faults and the pool ----------------------------------------------------------------


async def test_a_tls_handshake_that_never_comes_is_a_connect_timeout(
    client_ssl: ssl.SSLContext,
) -> None:
    held: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda r, w: held.append(w), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    try:
        async with client_for(client_ssl, connect_timeout_s=0.3) as client:
            with pytest.raises(UpstreamTimeout):
                await client.request("GET", f"https://127.0.0.1:{port}", "/", CIMultiDict())
    finally:
        for writer in held:
            writer.transport.abort()
        silent.close()


async def test_silence_after_the_request_is_a_read_timeout(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with RawUpstream(server_ssl, lambda head: "hang") as upstream:
        async with client_for(client_ssl, read_timeout_s=0.3) as client:
            with pytest.raises(UpstreamTimeout):
                await get(client, upstream)


async def test_an_answer_dripping_past_the_total_time_is_a_timeout(
    client_ssl: ssl.SSLContext, server_ssl: ssl.SSLContext
) -> None:
    async def drip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            for _ in range(1000):
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.05)

    server = await asyncio.start_server(drip, "127.0.0.1", 0, ssl=server_ssl)
    port = server.sockets[0].getsockname()[1]
    try:
        async with client_for(client_ssl, read_timeout_s=0.3, total_timeout_s=0.6) as client:
            response = await client.request("GET", f"https://127.0.0.1:{port}", "/", CIMultiDict())
            with pytest.raises(UpstreamTimeout):
                await response.read()
            response.release()
    finally:
        server.close()


async def test_refused_and_unresolvable_upstreams(client_ssl: ssl.SSLContext) -> None:
    probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = probe.sockets[0].getsockname()[1]
    probe.close()
    await probe.wait_closed()
    async with client_for(client_ssl) as client:
        with pytest.raises(UpstreamError) as refused:
            await client.request("GET", f"https://127.0.0.1:{port}", "/", CIMultiDict())
        with pytest.raises(UpstreamError) as unknown:
            await client.request("GET", "https://nowhere.invalid", "/", CIMultiDict())
    assert (refused.value.reason, unknown.value.reason) == ("connect", "dns")


async def test_connections_are_kept_alive_and_limited(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async def slow(head: bytes) -> bytes:
        return answer()

    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl, max_connections=2) as c:
        for _ in range(3):
            await get(c, upstream)
        assert upstream.connections == 1
        results = await asyncio.gather(*(get(c, upstream) for _ in range(12)))
    assert [r.status for r, _ in results] == [200] * 12
    assert upstream.connections <= 2


async def test_a_new_connection_resumes_the_tls_session_of_the_last_one(
    server_ssl: ssl.SSLContext, ca_file: Path
) -> None:
    # Pool growth and idle closes make new connections; each offers the session the last one
    # got, so the server skips the certificate and its signature (tls.ResumingContext).
    context = client_context(ca_file, resume_sessions=True)
    async with RawUpstream(server_ssl) as upstream:
        async with client_for(context, max_connections=4) as c:
            await get(c, upstream)
        async with client_for(context, max_connections=4) as c:
            results = await asyncio.gather(*(get(c, upstream) for _ in range(3)))
    assert [r.status for r, _ in results] == [200] * 3
    assert upstream.connections >= 2
    assert upstream.resumed[0] is False
    assert all(upstream.resumed[1:])


def test_the_contexts_verify_as_create_default_context_does(
    ca_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # client_context builds its contexts itself (for SSLKEYLOGFILE and resumption); it must not
    # verify less than the standard one on any Python: 3.13 added strict X.509 flags to it.
    monkeypatch.delenv("SSLKEYLOGFILE", raising=False)
    standard = ssl.create_default_context(cafile=str(ca_file))
    for resume in (False, True):
        ours = client_context(ca_file, resume_sessions=resume)
        assert ours.verify_flags & standard.verify_flags == standard.verify_flags
        assert ours.verify_mode == ssl.CERT_REQUIRED and ours.check_hostname
        assert ours.options & standard.options == standard.options
        assert ours.minimum_version == ssl.TLSVersion.TLSv1_2
        assert ours.cert_store_stats()["x509_ca"] >= standard.cert_store_stats()["x509_ca"]


def test_no_environment_variable_makes_the_contexts_log_tls_secrets(
    ca_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # ssl.create_default_context honours SSLKEYLOGFILE; the proxy's contexts do not.
    monkeypatch.setenv("SSLKEYLOGFILE", str(tmp_path / "keys.log"))
    assert ssl.create_default_context().keylog_filename == str(tmp_path / "keys.log")
    for resume in (False, True):
        assert client_context(ca_file, resume_sessions=resume).keylog_filename is None


async def test_a_plain_context_never_offers_a_session(
    server_ssl: ssl.SSLContext, ca_file: Path
) -> None:
    context = client_context(ca_file)
    async with RawUpstream(server_ssl) as upstream:
        for _ in range(2):
            async with client_for(context) as c:
                await get(c, upstream)
    assert upstream.resumed == [False, False]


@pytest.mark.parametrize(
    ("method", "body", "resent"),
    [("GET", None, True), ("HEAD", None, True), ("GET", b"x", False), ("POST", None, False)],
)
async def test_a_kept_alive_connection_closing_first_resends_only_bodiless_idempotent_requests(
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    method: str,
    body: bytes | None,
    resent: bool,
) -> None:
    answers: Iterator[Answer] = iter([answer(), "close", answer(), answer()])
    async with RawUpstream(server_ssl, lambda head: next(answers)) as upstream:
        async with client_for(client_ssl) as client:
            await get(client, upstream)  # the connection is now kept alive
            headers = CIMultiDict({"Content-Length": "1"} if body else {})
            if resent:
                response, _ = await get(client, upstream, method=method, body=body, headers=headers)
                assert response.status == 200
            else:
                with pytest.raises(UpstreamError) as caught:
                    await get(client, upstream, method=method, body=body, headers=headers)
                assert caught.value.reason == "reset"
    assert upstream.connections == (2 if resent else 1)
    assert len(upstream.seen) == (3 if resent else 2)


async def test_a_released_answer_can_neither_be_read_nor_release_the_next_one(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    async with RawUpstream(server_ssl) as upstream, client_for(client_ssl) as client:
        first, _ = await get(client, upstream)
        second = await client.request("GET", upstream.origin, "/x", CIMultiDict())
        first.release()  # again: must not touch the connection the second answer now uses
        with pytest.raises(UpstreamError):
            await first.read_chunk()
        assert await second.read() == b"ok"
        second.release()
    assert upstream.connections == 1


# -- found by review: the pool after an abandoned answer, a lost wake-up ---------------------------


@contextlib.asynccontextmanager
async def answering_upstream(
    server_ssl: ssl.SSLContext, body: bytes, seen: list[bytes]
) -> AsyncIterator[str]:
    """Serve ``body`` to every request on every connection; record the request heads."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
                declared = seen[-1].lower().partition(b"content-length:")[2].split(b"\r\n")[0]
                await reader.readexactly(int(declared or 0))
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
                await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ssl)
    try:
        yield f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()


async def test_an_answer_left_unread_never_puts_a_deaf_connection_back(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    # The caller took one chunk of a large answer and left: the whole answer arrived, reading was
    # paused above the high-water mark, and the connection went back to the pool still paused.
    # The next request on it (a POST) was sent upstream and then waited for an answer never read.
    seen: list[bytes] = []
    async with (
        answering_upstream(server_ssl, b"x" * (400 * 1024), seen) as origin,
        client_for(client_ssl, max_connections=1, read_timeout_s=2.0, total_timeout_s=5.0) as c,
    ):
        first = await c.request("GET", origin, "/a", CIMultiDict())
        await first.read_chunk()
        await asyncio.sleep(0.3)  # the rest of the answer arrives meanwhile
        first.release()
        second = await c.request(
            "POST", origin, "/b", CIMultiDict({"Content-Length": "2"}), b"hi", 2
        )
        try:
            assert second.status == 200
            assert len(await second.read()) == 400 * 1024
        finally:
            second.release()
    assert len(seen) == 2


async def test_a_woken_waiter_that_is_cancelled_passes_the_slot_on(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> None:
    seen: list[bytes] = []
    async with (
        answering_upstream(server_ssl, b"ok", seen) as origin,
        client_for(client_ssl, max_connections=1, read_timeout_s=3.0, total_timeout_s=4.0) as c,
    ):
        first = await c.request("GET", origin, "/a", CIMultiDict())
        await first.read()
        waiting = asyncio.create_task(c.request("GET", origin, "/b", CIMultiDict()))
        behind = asyncio.create_task(c.request("GET", origin, "/c", CIMultiDict()))
        await asyncio.sleep(0.1)
        first.release()  # wakes /b ...
        waiting.cancel()  # ... whose caller leaves before it runs
        async with asyncio.timeout(2.0):
            third = await behind
        third.release()
        assert third.status == 200
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
