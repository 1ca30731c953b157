"""Own the HTTP/1.1 connections to the upstream: a small client on asyncio protocols and llhttp.

Chosen over aiohttp's ``ClientSession`` by measurement (bench/RESULTS.md, "Upstream client"): the
same criteria met at a fraction of the CPU per request. What it does, and nothing more:

- the request goes out as given: ``<method> <target> HTTP/1.1``, ``Host`` (the upstream
  authority) and the caller's filtered headers in their order, byte-exact (UTF-8 with
  surrogateescape undoes the server side's decoding); nothing is added but the framing
  (``Content-Length`` as given, or ``Transfer-Encoding: chunked`` for a stream of unknown length);
  a CR, LF or NUL anywhere in the head is refused before anything is sent;
- the answer is parsed by llhttp (httptools) in its strict mode: TE with CL, two CL, NUL or
  other control bytes, HTTP/0.9, a body cut short, bytes after a complete answer (a body on 204,
  an appended second answer) and any 101 are ``UpstreamError(reason="protocol")`` or ``reset``,
  and such a connection is closed, never reused; 1xx interim answers are skipped (``Expect`` is
  never sent upstream: the server side answers the caller's ``100 Continue`` itself);
- nothing is followed or decoded: no redirects, no decompression, no cookies, no proxy variables;
- streaming both ways with backpressure: a request body is written as it comes (``drain`` when the
  socket buffer is full), an answer is read as the caller takes it (reading pauses above
  ``_HIGH_WATER`` buffered bytes);
- per-phase timeouts: ``connect`` (DNS, TCP, egress tunnel, TLS), ``read`` (silence while an
  answer byte is awaited) and ``total`` (from the request to the last body byte), each an
  ``UpstreamTimeout``; other faults are ``UpstreamError`` with reason dns, connect, tls, reset or
  protocol -- this module is the edge where those are translated for the upstream path;
- a LIFO pool of kept-alive connections per origin, ``max_connections`` in all, idle ones closed
  after ``idle_s``; DNS answers cached for ``dns_ttl_s``;
- the idle-close race: a reused connection that ends before any answer byte is resent once on a
  new connection, and only for a bodiless GET, HEAD or OPTIONS; nothing else is ever resent;
- an optional egress proxy per request (``egress=EgressProxy(...)``): the TLS connection runs
  through ``CONNECT host:port`` with an optional ``Proxy-Authorization`` value (a secret: never
  logged, never in an error); tunnels are pooled per (proxy, origin) like direct connections, and
  a proxy that opens no tunnel (unreachable, unknown to DNS, any answer but 200) is a
  ``ProxyTunnelError`` (reason ``proxy``) carrying its status.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Final

import httptools
from multidict import CIMultiDict

from proxy.errors import ProxyTunnelError, UpstreamError, UpstreamTimeout

_HIGH_WATER: Final = 256 * 1024  # answer bytes buffered before reading pauses
_LOW_WATER: Final = 64 * 1024
_RESENDABLE: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# aiohttp frames a bodiless request of these methods with "Content-Length: 0"; so do we.
_EMPTY_LENGTH_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


def _error(reason: str) -> UpstreamError:
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


@dataclass(frozen=True, slots=True)
class _Origin:
    """Where connections go, and the pool key: an origin, reached directly or through a proxy."""

    host: str
    port: int
    host_header: str
    base_path: str
    proxy: EgressProxy | None = None


class _Stale(Exception):
    """A reused connection ended before any answer byte: the request may be sent again."""


class _Interim(Exception):
    """HEAD's answer head is complete: the parser must stop before it looks for a body."""


class UpstreamResponse:
    """One answer: status, reason, headers, and its body read as the caller wants it."""

    __slots__ = ("_conn", "content_length", "headers", "reason", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = conn.status
        self.reason = conn.reason
        self.headers = conn.headers
        self.content_length = conn.content_length

    async def read_chunk(self) -> bytes:
        """Return the next body bytes, ``b""`` at the end of the body."""
        if self._conn is None:
            raise _error("reset")  # released: the connection may serve another request now
        return await self._conn.read_chunk()

    async def read(self) -> bytes:
        """Return the whole body (for answers known to be small)."""
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Give the connection back when the answer was read whole; otherwise close it."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: one exchange at a time, strict parsing, timeouts."""

    def __init__(self, client: UpstreamClient, key: _Origin) -> None:
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
            self._fail(_error("protocol"))
            return
        self._any_byte = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if not isinstance(exc.__context__, _Interim):
                self._fail(exc.__context__ or _error("protocol"))
                return
            # HEAD: the head is the whole answer; the parser cannot go on, nor the connection.
            self._complete = True
            self._keep = False
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._fail(_error("protocol"))
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
                self._fail(_Stale())
            else:
                self._fail(_error("reset"))
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
            raise _error("protocol")  # a second answer to one request

    def on_status(self, status: bytes) -> None:
        self.reason = status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status == 101 or self._parser.should_upgrade():
            raise _error("protocol")  # no upgrade was asked for
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
            raise _error("protocol")  # one framing only: chunked, a length, or the end
        self._framed = length is not None or bool(coding)
        self.status = status
        self._head_done = True
        if self._head:
            raise _Interim

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
            raise _Stale
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

    async def read_chunk(self) -> bytes:
        await self._wait(lambda: bool(self._chunks) or self._complete)
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
                raise _error("reset")
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
        reusable = (
            self._complete and self._sent and self._error is None and not self.closed and self._keep
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


class UpstreamClient:
    """Send requests to upstream origins over pooled, verified TLS connections."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext,
        max_connections: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        total_timeout_s: float,
        idle_s: float = 15.0,
        dns_ttl_s: float = 60.0,
    ) -> None:
        self._ssl = ssl_context
        self._limit = max_connections
        self._connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._total_timeout_s = total_timeout_s
        self._idle_s = idle_s
        self._dns_ttl_s = dns_ttl_s
        self._origins: dict[tuple[str, EgressProxy | None], _Origin] = {}
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._connecting = 0
        self._slot_waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._dns: dict[tuple[str, int], tuple[float, list[tuple[str, int]]]] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closing = False

    async def request(
        self,
        method: str,
        upstream: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes | AsyncIterator[bytes] | None = None,
        length: int | None = None,
        *,
        egress: EgressProxy | None = None,
    ) -> UpstreamResponse:
        """Send ``method <upstream path><target>`` and return the answer once its head is in.

        ``headers`` must carry ``Content-Length`` when ``length`` is given; a body stream without
        a length goes out chunked. With ``egress`` the connection is a tunnel through that proxy.
        """
        origin = self._origin(upstream, egress)
        chunked = body is not None and not isinstance(body, bytes) and length is None
        head = _head(method, origin, target, headers, chunked, body is None)
        deadline = asyncio.get_running_loop().time() + self._total_timeout_s
        resendable = body is None and method in _RESENDABLE
        for fresh in (False, True):
            conn = None if fresh else self._take_idle(origin)
            if conn is None:
                try:
                    async with asyncio.timeout_at(deadline):
                        conn = await self._acquire(origin, fresh=fresh)
                except TimeoutError:
                    raise UpstreamTimeout() from None
            try:
                return await conn.exchange(method, head, body, chunked, deadline)
            except _Stale:
                conn.finish()
                if fresh or not resendable:
                    raise _error("reset") from None
            except BaseException:
                conn.finish()
                raise
        raise _error("reset")  # not reached: the second round returns or raises

    async def __aenter__(self) -> UpstreamClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close every connection; return once their transports are gone."""
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._open):
            conn.close(abort=True)  # nothing is in flight any more: no TLS goodbye needed
        self._idle.clear()
        # The transports release their sockets on the next turns of the loop.
        for _ in range(3):
            await asyncio.sleep(0)

    # -- the pool ------------------------------------------------------------------------------

    def _origin(self, upstream: str, egress: EgressProxy | None) -> _Origin:
        origin = self._origins.get((upstream, egress))
        if origin is None:
            origin = self._origins[upstream, egress] = _parse_origin(upstream, egress)
        return origin

    def _take_idle(self, origin: _Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, the least likely to be closed
            if not conn.closed and time.monotonic() - conn.idle_since < self._idle_s:
                return conn
            conn.close()
        return None

    async def _acquire(self, origin: _Origin, *, fresh: bool = False) -> _Connection:
        while True:
            conn = None if fresh else self._take_idle(origin)
            if conn is not None:
                return conn
            if len(self._open) + self._connecting < self._limit or self._evict_one():
                break
            waiter = asyncio.get_running_loop().create_future()
            self._slot_waiters.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
        self._connecting += 1
        made: _Connection | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                made = await self._connect(origin)
        except TimeoutError:
            raise UpstreamTimeout() from None
        finally:
            self._connecting -= 1
            if made is not None:
                self._open.add(made)
            self._wake_slot()
        return made

    def _evict_one(self) -> bool:
        for conns in self._idle.values():
            if conns:
                conns.pop(0).close()  # the oldest idle connection of any origin
                return True
        return False

    def _wake_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def put_back(self, conn: _Connection) -> None:
        if self._closing:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake_slot()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    def forget(self, conn: _Connection) -> None:
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        self._wake_slot()

    def _sweep(self) -> None:
        self._sweeper = None
        limit = time.monotonic() - self._idle_s
        for conns in self._idle.values():
            while conns and conns[0].idle_since <= limit:
                conns.pop(0).close()
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    # -- connecting ----------------------------------------------------------------------------

    async def _connect(self, origin: _Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        conn = _Connection(self, origin)
        if origin.proxy is None:
            addresses = await self._resolve(origin.host, origin.port)
            last: OSError | None = None
            for host, port in addresses:
                try:
                    await loop.create_connection(
                        lambda: conn, host, port, ssl=self._ssl, server_hostname=origin.host
                    )
                    return conn
                except ssl.SSLError as exc:
                    raise _error("tls") from exc
                except OSError as exc:
                    last = exc
            raise _error("connect") from last
        raw = await self._tunnel(loop, origin, origin.proxy)
        try:
            tls = await loop.start_tls(raw, conn, self._ssl, server_hostname=origin.host)
        except ssl.SSLError as exc:
            raw.abort()
            raise _error("tls") from exc
        except OSError as exc:
            raw.abort()
            raise _error("connect") from exc
        except BaseException:  # the connect timeout: no half-made tunnel is left open
            raw.abort()
            raise
        if tls is None:
            raw.abort()
            raise _error("connect")
        conn.connection_made(tls)
        return conn

    async def _tunnel(
        self, loop: asyncio.AbstractEventLoop, origin: _Origin, egress: EgressProxy
    ) -> asyncio.Transport:
        try:
            addresses = await self._resolve(egress.host, egress.port)
        except UpstreamError as exc:
            # Through a proxy only the proxy's own name is resolved here.
            raise ProxyTunnelError(
                "The egress proxy's host name does not resolve.", proxy_status=None
            ) from exc
        tunnel = _Tunnel()
        try:
            transport, _ = await loop.create_connection(lambda: tunnel, *addresses[0])
        except OSError as exc:
            raise ProxyTunnelError("The egress proxy is unreachable.", proxy_status=None) from exc
        try:
            return await self._open_tunnel(transport, tunnel, origin, egress)
        except BaseException:
            transport.abort()
            raise

    async def _open_tunnel(
        self, transport: asyncio.Transport, tunnel: _Tunnel, origin: _Origin, egress: EgressProxy
    ) -> asyncio.Transport:
        authority = _authority(origin.host, origin.port, always_port=True)
        lines = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"]
        if egress.authorization is not None:
            lines.append(f"Proxy-Authorization: {egress.authorization}\r\n")
        text = "".join(lines)
        n = len(lines) + 1
        if text.count("\n") != n or text.count("\r") != n or "\0" in text:
            raise ProxyTunnelError("The egress proxy settings are not usable.", proxy_status=None)
        transport.write(text.encode("utf-8") + b"\r\n")
        status = await tunnel.answer
        if status == 0:
            raise ProxyTunnelError(
                "The egress proxy closed the connection without an answer.", proxy_status=None
            )
        if status != 200:
            raise ProxyTunnelError(
                f"The egress proxy refused the tunnel (status {status}).", proxy_status=status
            )
        return transport

    async def _resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        now = time.monotonic()
        cached = self._dns.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
        except (socket.gaierror, UnicodeError) as exc:
            raise _error("dns") from exc
        addresses = [(str(info[4][0]), int(info[4][1])) for info in infos]
        if not addresses:
            raise _error("dns")
        self._dns[(host, port)] = (now + self._dns_ttl_s, addresses)
        return addresses


class _Tunnel(asyncio.Protocol):
    """The egress proxy's answer to CONNECT: its status, once the head is complete."""

    def __init__(self) -> None:
        self.answer: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._status = 0

    def data_received(self, data: bytes) -> None:
        if self.answer.done():
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            pass  # on_headers_complete stops the parser on purpose
        except httptools.HttpParserError:
            self.answer.set_result(0)
            return
        if self._status and not self.answer.done():
            self.answer.set_result(self._status)

    def on_headers_complete(self) -> None:
        self._status = self._parser.get_status_code()
        # Bytes after the head belong to the tunnel; a 200 with a body would be a broken proxy.
        raise _Interim

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_result(0)  # closed before a whole answer


def _parse_origin(upstream: str, proxy: EgressProxy | None = None) -> _Origin:
    scheme, sep, rest = upstream.partition("://")
    if scheme.lower() != "https" or not sep:
        raise ValueError("upstream origins are https URLs")
    authority, slash, path = rest.partition("/")
    base_path = (slash + path).rstrip("/")
    if authority.startswith("["):
        host, _, port_text = authority[1:].partition("]")
        port_text = port_text.removeprefix(":")
    else:
        host, _, port_text = authority.partition(":")
    port = int(port_text) if port_text else 443
    return _Origin(
        host=host,
        port=port,
        host_header=_authority(host.lower(), port, always_port=False),
        base_path=base_path,
        proxy=proxy,
    )


def _authority(host: str, port: int, *, always_port: bool) -> str:
    name = f"[{host}]" if ":" in host else host
    return f"{name}:{port}" if always_port or port != 443 else name


def _head(
    method: str,
    origin: _Origin,
    target: str,
    headers: CIMultiDict[str],
    chunked: bool,
    bodiless: bool,
) -> bytes:
    request_line = f"{method} {origin.base_path}{target} HTTP/1.1"
    lines = [f"{request_line}\r\nHost: {origin.host_header}\r\n"]
    lines.extend(f"{name}: {value}\r\n" for name, value in headers.items())
    if chunked:
        lines.append("Transfer-Encoding: chunked\r\n")
    elif bodiless and method in _EMPTY_LENGTH_METHODS and "Content-Length" not in headers:
        lines.append("Content-Length: 0\r\n")
    text = "".join(lines)
    # One line per entry: a CR, LF or NUL inside a name, a value or the target would split it.
    n = len(lines) + 1  # the first entry holds the request line and Host
    if (
        text.count("\n") != n
        or text.count("\r") != n
        or "\0" in text
        or request_line.count(" ") != 2
    ):
        raise UpstreamError("The request cannot be sent as it is.", reason="protocol")
    return text.encode("utf-8", "surrogateescape") + b"\r\n"
