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
from collections.abc import AsyncIterator
from typing import Final

import httptools
from multidict import CIMultiDict

from proxy.errors import ProxyTunnelError, UpstreamError, UpstreamTimeout
from proxy.tls import ResumingContext

# One connection and its answer have their own module; these names stay importable from here.
from proxy.upstream_protocol import Connection, Interim, Origin, Stale, upstream_error
from proxy.upstream_protocol import EgressProxy as EgressProxy
from proxy.upstream_protocol import UpstreamResponse as UpstreamResponse

_RESENDABLE: Final = frozenset({"GET", "HEAD", "OPTIONS"})
# aiohttp frames a bodiless request of these methods with "Content-Length: 0"; so do we.
_EMPTY_LENGTH_METHODS: Final = frozenset({"POST", "PUT", "PATCH"})


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
        self._origins: dict[tuple[str, EgressProxy | None], Origin] = {}
        self._idle: dict[Origin, list[Connection]] = {}
        self._open: set[Connection] = set()
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
            except Stale:
                conn.finish()
                if fresh or not resendable:
                    raise upstream_error("reset") from None
            except BaseException:
                conn.finish()
                raise
        raise upstream_error("reset")  # not reached: the second round returns or raises

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

    def _origin(self, upstream: str, egress: EgressProxy | None) -> Origin:
        origin = self._origins.get((upstream, egress))
        if origin is None:
            origin = self._origins[upstream, egress] = _parse_origin(upstream, egress)
        return origin

    def _take_idle(self, origin: Origin) -> Connection | None:
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()  # LIFO: the warmest connection, the least likely to be closed
            if not conn.closed and time.monotonic() - conn.idle_since < self._idle_s:
                return conn
            conn.close()
        return None

    async def _acquire(self, origin: Origin, *, fresh: bool = False) -> Connection:
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
            except BaseException:
                # Woken, then cancelled before it ran: pass the free slot on, or the next
                # waiter sleeps beside an idle connection until its deadline.
                if waiter.done() and not waiter.cancelled():
                    self._wake_slot()
                raise
            finally:
                if waiter in self._slot_waiters:
                    self._slot_waiters.remove(waiter)
        self._connecting += 1
        made: Connection | None = None
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

    def put_back(self, conn: Connection) -> None:
        if self._closing:
            conn.close()
            return
        if conn.uses == 1 and isinstance(self._ssl, ResumingContext):
            _remember_session(self._ssl, conn)
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.key, []).append(conn)
        self._wake_slot()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self._idle_s, self._sweep)

    def forget(self, conn: Connection) -> None:
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

    async def _connect(self, origin: Origin) -> Connection:
        loop = asyncio.get_running_loop()
        conn = Connection(self, origin)
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
                    raise upstream_error("tls") from exc
                except OSError as exc:
                    last = exc
            raise upstream_error("connect") from last
        raw = await self._tunnel(loop, origin, origin.proxy)
        try:
            tls = await loop.start_tls(raw, conn, self._ssl, server_hostname=origin.host)
        except ssl.SSLError as exc:
            raw.abort()
            raise upstream_error("tls") from exc
        except OSError as exc:
            raw.abort()
            raise upstream_error("connect") from exc
        except BaseException:  # the connect timeout: no half-made tunnel is left open
            raw.abort()
            raise
        if tls is None:
            raw.abort()
            raise upstream_error("connect")
        conn.connection_made(tls)
        return conn

    async def _tunnel(
        self, loop: asyncio.AbstractEventLoop, origin: Origin, egress: EgressProxy
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
        self, transport: asyncio.Transport, tunnel: _Tunnel, origin: Origin, egress: EgressProxy
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
            raise upstream_error("dns") from exc
        addresses = [(str(info[4][0]), int(info[4][1])) for info in infos]
        if not addresses:
            raise upstream_error("dns")
        self._dns[(host, port)] = (now + self._dns_ttl_s, addresses)
        return addresses


def _remember_session(context: ResumingContext, conn: Connection) -> None:
    """Keep a new connection's TLS session, by then holding the server's ticket."""
    transport = conn.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    session = ssl_object.session if isinstance(ssl_object, ssl.SSLObject) else None
    if session is not None:
        context.remember(conn.key.host, session)


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
        raise Interim

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answer.done():
            self.answer.set_result(0)  # closed before a whole answer


def _parse_origin(upstream: str, proxy: EgressProxy | None = None) -> Origin:
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
    return Origin(
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
    origin: Origin,
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
