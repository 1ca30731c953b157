"""Own one HTTP/1.1 connection to the upstream: an asyncio protocol with llhttp's strict parser.

``Connection`` runs one exchange at a time: it writes the request (a body with backpressure),
parses the answer with llhttp (httptools) in its strict mode, times out per phase (``read``
silence, ``total``) and hands the answer out as ``UpstreamResponse``; what it refuses, and why,
is listed in ``proxy.upstream_client``'s docstring. The pool, connecting, DNS and egress tunnels
are ``proxy.upstream_client``'s (which re-exports ``UpstreamResponse`` and ``EgressProxy``); a
connection reaches its pool only through ``Pool``.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final, Protocol

import httptools
from multidict import CIMultiDict

from proxy.errors import UpstreamError, UpstreamTimeout

_HIGH_WATER: Final = 256 * 1024  # answer bytes buffered before reading pauses
_LOW_WATER: Final = 64 * 1024


def upstream_error(reason: str) -> UpstreamError:
    """Return the ``UpstreamError`` for ``reason`` (dns, connect, tls, reset, protocol)."""
    return UpstreamError(_DETAILS[reason], reason=reason)


_DETAILS: Final = {
    "dns": "The upstream host name does not resolve.",
    "connect": "The upstream refused or dropped the connection.",
    "tls": "The TLS handshake with the upstream failed.",
    "reset": "The upstream connection was reset.",
    "protocol": "The upstream answer could not be read.",
}


@dataclass(frozen=True, slots=True)
class EgressProxy:
    """An HTTP forward proxy the upstream connections tunnel through (``CONNECT``)."""

    host: str
    port: int
    authorization: str | None = None  # the Proxy-Authorization value, e.g. "Basic ..."

    def __repr__(self) -> str:
        return f"EgressProxy(host={self.host!r}, port={self.port})"


@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Where connections go, and the pool key: an origin, reached directly or through a proxy.

    Compared and hashed by identity (``eq=False``): the client makes one per (upstream, egress)
    and keeps it, so identity is equality, and the pool's lookups for every request skip a
    Python-level hash of five fields.
    """

    host: str
    port: int
    host_header: str
    base_path: str
    proxy: EgressProxy | None = None


class Stale(Exception):
    """A reused connection ended before any answer byte: the request may be sent again."""


class Interim(Exception):
    """HEAD's answer head is complete: the parser must stop before it looks for a body."""


class UpstreamResponse:
    """One answer: status, reason, headers, and its body read as the caller wants it."""

    __slots__ = ("_conn", "content_length", "headers", "reason", "status")

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_length = conn.content_length

    async def read_chunk(self) -> bytes:
        """Return the next body bytes, ``b""`` at the end of the body."""
        if self._conn is None:
            raise upstream_error("reset")  # released: the connection may serve another request now
        return await self._conn.read_chunk()

    async def read(self) -> bytes:
        """Return the whole body (for answers known to be small)."""
        conn = self._conn
        if conn is not None and conn.complete_in_buffer():
            return conn.take_buffered()  # the usual small answer: it came with its head
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back when the answer was read whole; otherwise close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()


class Pool(Protocol):
    """What a connection needs from its pool (``proxy.upstream_client.UpstreamClient``)."""

    @property
    def read_timeout_s(self) -> float: ...

    def put_back(self, conn: Connection) -> None: ...

    def forget(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, strict parsing, timeouts."""

    def __init__(self, client: Pool, key: Origin) -> None:
        self._client = client
        self.key = key
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._loop = asyncio.get_running_loop()
        self.closed = False
        self.idle_since = 0.0
        self.uses = 0
        self._reset_exchange()

    def _reset_exchange(self) -> None:
        self.status = 0
        self.reason = ""
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.content_length: int | None = None
        self._raw_headers: list[tuple[bytes, bytes]] = []
        self._framed = False  # Content-Length or chunked: the answer does not end at EOF
        self._active = False
        self._keep = True
        self._head = False  # the request was HEAD
        self._any_byte = False
        self._head_done = False
        self._complete = False
        self._sent = True
        self._error: BaseException | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._write_paused = False
        self._sender: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0
        self._wait_since = 0.0

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport

    def data_received(self, data: bytes) -> None:
        if not self._active or self._complete:
            # Bytes nobody asked for: an answer appended to the last one, or a body on 204.
            self._fail(upstream_error("protocol"))
            return
        self._any_byte = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, Interim):
                self._fail(exc.__context__ or upstream_error("protocol"))
                return
            # HEAD: the head is the whole answer; the parser cannot go on, nor the connection.
            self._complete = True
            self._keep = False
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(upstream_error("protocol"))
            return
        self._wake()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._active and not self._complete:
            if self._head_done and not self._framed and self._error is None:
                self._complete = True  # an answer delimited by the end of the connection
            elif not self._any_byte and self.uses > 1 and self._sent_nothing_back():
                self._fail(Stale())
            else:
                self._fail(upstream_error("reset"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._wake()
        self._client.forget(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # -- llhttp callbacks ----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._head_done:
            raise upstream_error("protocol")  # a second answer to one request

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101 or self._parser.should_upgrade():
            raise upstream_error("protocol")  # no upgrade was asked for
        if status < 200:
            self._raw_headers = []  # an interim answer: never passed on
            return
        headers = self.headers
        for name, value in self._raw_headers:
            headers.add(
                name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape")
            )
        length = headers.get("Content-Length")
        if length is not None:
            self.content_length = int(length)  # llhttp accepted exactly one, all digits
        coding = headers.getall("Transfer-Encoding", ())
        if coding and (len(coding) > 1 or coding[0].lower() != "chunked"):
            raise upstream_error("protocol")  # one framing only: chunked, a length, or the end
        self._framed = length is not None or bool(coding)
        self.status = status
        self._head_done = True
        if self._head:
            raise Interim

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if self._head_done:
            self._complete = True
            self._keep = self._keep and self._parser.should_keep_alive()

    # -- one exchange --------------------------------------------------------------------------

    async def exchange(
        self,
        method: str,
        head: bytes,
        body: bytes | AsyncIterator[bytes] | None,
        chunked: bool,
        deadline: float,
    ) -> UpstreamResponse:
        self._reset_exchange()
        self.uses += 1
        self._active = True
        self._head = method == "HEAD"
        self._deadline = deadline
        transport = self.transport
        if transport is None or self.closed:
            raise Stale
        if isinstance(body, bytes):
            transport.write(head + body if len(body) <= 16384 else head)
            if len(body) > 16384:
                transport.write(body)
        else:
            transport.write(head)
            if body is not None:
                self._sent = False
                self._sender = asyncio.create_task(self._send(body, chunked))
        await self._wait(lambda: self._head_done)
        return UpstreamResponse(self)

    def _sent_nothing_back(self) -> bool:
        return self._sender is None and not self._head_done

    async def _send(self, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        try:
            async for chunk in body:
                if self.closed:
                    break
                if not chunk:
                    continue
                if chunked:
                    transport.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    transport.write(chunk)
                if self._write_paused:
                    self._drain = self._loop.create_future()
                    await self._drain
            else:
                if chunked:
                    transport.write(b"0\r\n\r\n")
                self._sent = True
        except Exception as exc:
            self._fail(exc)  # the caller's body broke a limit: the forwarder knows the answer

    def complete_in_buffer(self) -> bool:
        """Return True when the whole answer is in and nothing has failed."""
        return self._complete and self._error is None

    def take_buffered(self) -> bytes:
        """Return every buffered body byte at once (the answer is complete: nothing to resume)."""
        chunks = self._chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return body

    async def read_chunk(self) -> bytes:
        if not self._chunks and not self._complete:
            await self._wait(lambda: bool(self._chunks) or self._complete)
        elif self._error is not None:
            raise self._error
        if not self._chunks:
            return b""
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._paused and self._buffered < _LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return chunk

    async def _wait(self, ready: Callable[[], bool]) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if ready():
                return
            if self.closed:
                raise upstream_error("reset")
            self._waiter = self._loop.create_future()
            self._wait_since = self._loop.time()
            self._arm()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def _arm(self) -> None:
        if self._timer is None:
            when = min(self._deadline, self._wait_since + self._client.read_timeout_s)
            self._timer = self._loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._waiter is None or self._error is not None:
            return
        now = self._loop.time()
        if now >= self._deadline or now - self._wait_since >= self._client.read_timeout_s:
            self._fail(UpstreamTimeout())
        else:
            self._arm()

    def _wake(self) -> None:
        self._wait_since = self._loop.time()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self.close(abort=True)
        self._wake()

    def finish(self) -> None:
        """End the exchange: back to the pool when everything is done and clean, else close."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._sender is not None and not self._sender.done():
            self._sender.cancel()
            self._sent = False
        # A connection whose reading is paused (an answer the caller did not take whole) would
        # go back to the pool deaf: the next request on it would get no answer. Closed instead.
        reusable = (
            self._complete
            and self._sent
            and self._error is None
            and not self.closed
            and self._keep
            and not self._paused
        )
        self._active = False
        if reusable:
            self._client.put_back(self)
        else:
            self.close()

    def close(self, *, abort: bool = False) -> None:
        """Close the connection: a TLS close_notify first, unless the peer broke the protocol."""
        self.closed = True
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()
        self._client.forget(self)
