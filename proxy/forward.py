"""Own one forwarded request: caller -> KSZ REST endpoint -> caller, streaming both ways.

The rules (the inbound policy in ``inbound.py`` has already accepted the request):

- the target is sent byte-exact: ``<route upstream path><raw path and query>``, never rebuilt
  from a decoded path (the upstream client writes it as given: ``upstream_client.py``);
- the body is framed afresh with the same bytes: ``Content-Length`` when the caller sent one,
  chunked otherwise; bodies up to ``upstream.replay_max_bytes`` are buffered so that an upstream
  401 can be answered by one fresh token and one resend; larger bodies stream through with
  backpressure, bounded by ``listen.max_body_bytes`` (413) and ``listen.body_read_timeout_s`` (408);
- ``receive`` reads that buffered start (all of a small body, the first ``replay_max_bytes`` of a
  large one) before ``forward`` fetches a token or opens an upstream connection, so a caller still
  sending its body holds no upstream slot (the handler counts the two phases apart);
- the answer streams back; one of known length up to ``CHUNK`` is read whole first and sent in
  one write together with its headers; a HEAD answer keeps the upstream ``Content-Length``;
- an upstream ``101`` or other upgrade (nobody asked for one: the inbound policy refuses them)
  is a 502 ``protocol`` fault and that connection is closed, never reused; other 1xx answers are
  skipped, never passed on as final (both in the upstream client);
- a header of the answer carrying the token the request went with is removed and counted;
- an upstream that answers before it has the whole body gets its answer relayed; the rest of the
  body is not sent and that connection is closed, never reused;
- redirects are never followed and nothing is decompressed, in either direction;
- transport faults become ``UpstreamError`` with a stable reason (dns, connect, tls, reset,
  protocol) or ``UpstreamTimeout`` (named by the upstream client); a route's egress decision
  (``egress.decide``) chooses direct or a ``CONNECT`` tunnel through its forward proxy, whose
  failures are reason ``proxy`` with a fixed text naming the keys to check; a request is never
  retried after a transport fault (the one exception, a bodiless GET/HEAD/OPTIONS meeting a
  kept-alive connection that closed before any answer byte, is the client's own).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Final

from aiohttp import web

from proxy.config import Config, Route
from proxy.credentials import Credentials
from proxy.egress import EgressRoute, decide, tunnel_failure
from proxy.errors import (
    InternalError,
    ProxyTunnelError,
    RequestRejected,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.headers import downstream_response_headers, remove_token, upstream_request_headers
from proxy.tls import client_context
from proxy.tokens import Token, TokenProvider
from proxy.upstream_client import EgressProxy, UpstreamClient, UpstreamResponse

log = logging.getLogger("ksz_proxy.forward")

CHUNK: Final = 64 * 1024
_NO_BODY_STATUSES: Final = frozenset({204, 304})


@dataclass(slots=True)
class Exchange:
    """What happened to one forwarded request, for the access log and the metrics."""

    upstream_status: int | None = None
    # The status sent to the caller once the answer's headers are out.
    status_sent: int | None = None
    # The transport failure's reason code, also when it struck in the middle of the answer.
    upstream_error: str | None = None
    # The caller closed its connection before the answer was complete.
    caller_gone: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    retried: bool = False
    # Answer headers removed because they carried the token.
    token_reflected: int = 0
    # The caller's connection closes after the answer (framing.closes_connection).
    close: bool = False


def make_session(config: Config, credentials: Credentials) -> UpstreamClient:
    """Return the upstream client: verified TLS, pooled, no proxy variables, no decompression.

    Used as ``async with``; it closes its connections on the way out.
    """
    upstream = config.upstream
    context = client_context(
        upstream.ca_file,
        client_credentials=credentials if upstream.client_certificate else None,
        resume_sessions=True,
    )
    return UpstreamClient(
        ssl_context=context,
        max_connections=upstream.max_connections,
        connect_timeout_s=upstream.connect_timeout_s,
        read_timeout_s=upstream.read_timeout_s,
        total_timeout_s=upstream.total_timeout_s,
    )


class _BodyAborted(Exception):
    """The caller's body broke a limit while it streamed upstream."""


@dataclass(slots=True)
class _Body:
    """The caller's body: the buffered start and, when it is too large to buffer, the rest."""

    buffered: bytes
    rest: AsyncIterator[bytes] | None
    # Set when the streamed rest broke a limit: the answer to give the caller.
    aborted: RequestRejected | None = None

    @property
    def replayable(self) -> bool:
        return self.rest is None


# A bodiless request's body, shared: only a streamed rest is ever changed (``aborted``).
_NO_BODY: Final = _Body(buffered=b"", rest=None)


class Forwarder:
    """Forward requests for the proxy listener; one instance per application."""

    def __init__(
        self,
        config: Config,
        tokens: TokenProvider | Mapping[str, TokenProvider],
        session: UpstreamClient,
    ) -> None:
        self._config = config
        # Each client's provider by name: a route only ever gets its own client's tokens
        # (SECURITY.md 49). One provider alone serves the only client.
        self._tokens = {tokens.client.name: tokens} if isinstance(tokens, TokenProvider) else tokens
        self._client = session
        self._max_body = config.listen.max_body_bytes
        self._replay_max = config.upstream.replay_max_bytes
        self._body_timeout_s = config.listen.body_read_timeout_s
        # The egress decision per route, made once: the hot path only looks it up.
        self._egress = {
            route.prefix: _Egress.of(route_egress(config, route)) for route in config.routes
        }

    @property
    def session(self) -> UpstreamClient:
        """Return the upstream client (a reload that keeps it hands it to the next Forwarder)."""
        return self._client

    async def receive(self, request: web.BaseRequest) -> _Body:
        """Read the start of the caller's body: all of it when it is replayable."""
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise _too_large()
        return await self._read_start(request, declared)

    async def forward(
        self,
        request: web.BaseRequest,
        route: Route,
        trace_id: str,
        exchange: Exchange,
        body: _Body | None = None,
    ) -> web.StreamResponse:
        """Send ``request`` to the route's upstream and stream the answer back."""
        if body is None:
            body = await self.receive(request) if request.body_exists else _NO_BODY
        declared = request.content_length
        tokens = self._tokens[route.client]
        token = _own(await tokens.get(route.scopes), route)
        exchange.bytes_in = len(body.buffered)
        egress = self._egress.get(route.prefix)
        if egress is None:  # a route made after start-up (tests); decided once, then kept
            egress = self._egress[route.prefix] = _Egress.of(route_egress(self._config, route))

        upstream = await self._send(
            request, route.upstream, token, body, declared, trace_id, exchange, egress
        )
        if upstream.status == 401:
            # The token was refused: never use it again. Resend once, and only a buffered body.
            tokens.invalidate(token)
            if body.replayable:
                upstream.release()
                token = _own(await tokens.get(route.scopes), route)
                exchange.retried = True
                upstream = await self._send(
                    request, route.upstream, token, body, declared, trace_id, exchange, egress
                )
        exchange.upstream_status = upstream.status
        return await self._relay(request, upstream, exchange, token, body)

    async def _read_start(self, request: web.BaseRequest, declared: int | None) -> _Body:
        """Buffer a replayable body; otherwise keep the first bytes and a stream of the rest."""
        if not request.body_exists:
            return _NO_BODY
        deadline = asyncio.get_running_loop().time() + self._body_timeout_s
        # A large body is also read up to replay_max_bytes here, before any upstream slot is
        # held: a caller that sends a byte and stalls never gets that far.
        limit = self._replay_max if declared is None else min(declared, self._replay_max)
        buffered = await self._read_some(request, limit + 1, deadline)
        if len(buffered) > self._max_body:
            raise _too_large()
        body = _Body(buffered=buffered, rest=None)
        if len(buffered) > limit or not request.content.at_eof():
            body.rest = self._stream_rest(request, body, len(buffered), deadline)
        return body

    async def _read_some(self, request: web.BaseRequest, size: int, deadline: float) -> bytes:
        parts: list[bytes] = []
        got = 0
        try:
            async with asyncio.timeout_at(deadline):
                while got < size:
                    chunk = await request.content.read(min(CHUNK, size - got))
                    if not chunk:
                        break
                    parts.append(chunk)
                    got += len(chunk)
        except TimeoutError:
            raise _too_slow() from None
        return b"".join(parts)

    async def _stream_rest(
        self, request: web.BaseRequest, body: _Body, already: int, deadline: float
    ) -> AsyncIterator[bytes]:
        sent = already
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await request.content.readany()
            except TimeoutError:
                body.aborted = _too_slow()
                raise _BodyAborted from None
            except RequestRejected as exc:  # the body's framing broke a limit (framing.py)
                body.aborted = exc
                raise _BodyAborted from None
            if not chunk:
                return
            sent += len(chunk)
            if sent > self._max_body:
                body.aborted = _too_large()
                raise _BodyAborted
            yield chunk

    async def _send(
        self,
        request: web.BaseRequest,
        upstream: str,
        token: Token,
        body: _Body,
        declared: int | None,
        trace_id: str,
        exchange: Exchange,
        egress: _Egress,
    ) -> UpstreamResponse:
        data: bytes | AsyncIterator[bytes] | None
        if not request.body_exists:
            data, length = None, None
        elif body.rest is None:
            data, length = body.buffered, len(body.buffered)
        else:
            # The same framing the caller used: its Content-Length, or chunked when it had none.
            data, length = _counted(_chain(body.buffered, body.rest), exchange), declared
        headers = upstream_request_headers(
            request.headers,
            authorization=token.authorization,
            trace_id=trace_id,
            content_length=length,
        )
        try:
            return await self._client.request(
                request.method,
                upstream,
                request.raw_path,
                headers,
                data,
                length,
                egress=egress.proxy,
            )
        except (UpstreamError, TimeoutError, ssl.SSLError, OSError, _BodyAborted) as exc:
            if body.aborted is not None:
                raise body.aborted from None
            raise translate(exc, egress) from None

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: UpstreamResponse,
        exchange: Exchange,
        token: Token,
        body: _Body,
    ) -> web.StreamResponse:
        """Stream the upstream answer to the caller; on a fault mid-body, cut the connection."""
        response: web.StreamResponse | None = None
        headers = downstream_response_headers(upstream.headers)
        exchange.token_reflected = remove_token(headers, token.value)
        try:
            no_body = request.method == "HEAD" or upstream.status in _NO_BODY_STATUSES
            length = upstream.content_length
            if length is not None and length <= CHUNK and not no_body:
                # A small answer of known length is read whole and sent with its headers in one
                # write: one send system call per request instead of two (headers, then body).
                # Nothing has reached the caller before the body is complete, so a fault while
                # reading it is answered like any upstream fault rather than by a cut.
                whole = await upstream.read()
                response = web.Response(
                    status=upstream.status, reason=upstream.reason, headers=headers, body=whole
                )
                if exchange.close:
                    response.force_close()
                await _to_caller(response.prepare(request))
                exchange.status_sent = upstream.status
                exchange.bytes_out = len(whole)
                await _to_caller(response.write_eof())
                return response
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            if exchange.close:
                response.force_close()
            if length is not None and upstream.status != 204:
                # HEAD and 304 keep the length the full answer would have (RFC 9110 8.6).
                response.content_length = length
            await _to_caller(response.prepare(request))
            exchange.status_sent = upstream.status
            if not no_body:
                while chunk := await upstream.read_chunk():
                    exchange.bytes_out += len(chunk)
                    await _to_caller(response.write(chunk))
            await _to_caller(response.write_eof())
            return response
        except asyncio.CancelledError:
            # aiohttp cancels the handler when the caller's connection is lost: whether that
            # shows first as a failed write or as this cancellation is a matter of timing.
            exchange.caller_gone = True
            raise
        except _CallerGone:
            # The caller went away mid-answer: not an upstream fault, and nothing to answer.
            exchange.caller_gone = True
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        except (UpstreamError, TimeoutError, OSError, _BodyAborted) as exc:
            error = translate(exc)
            exchange.upstream_error = error.reason
            if response is not None and response.prepared:
                # Headers are gone already: a clean end would pass a truncated body for whole.
                log.warning(
                    "upstream failed while streaming the answer; caller connection cut",
                    extra={"reason": error.code},
                )
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError from None
            raise error from None
        finally:
            # An upstream that answered before it had the whole body gets no more of it, and
            # a connection left mid-body is closed, never reused (UpstreamResponse.release).
            upstream.release()


class _CallerGone(Exception):
    """Writing to the caller failed: it closed or reset its connection."""


async def _to_caller(write: Awaitable[object]) -> None:
    """Await a write to the caller; its connection errors become ``_CallerGone``.

    A caller that takes nothing of the answer for ``upstream.read_timeout_s`` has its connection
    cut by the connection handler (``handler._ProxyRequestHandler.pause_writing``), so such a
    write ends too, as a connection error.
    """
    try:
        await write
    except (ConnectionError, OSError) as exc:
        raise _CallerGone from exc


async def _chain(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in rest:
        yield chunk


async def _counted(body: AsyncIterator[bytes], exchange: Exchange) -> AsyncIterator[bytes]:
    exchange.bytes_in = 0
    async for chunk in body:
        exchange.bytes_in += len(chunk)
        yield chunk


@dataclass(frozen=True, slots=True)
class _Egress:
    """A route's egress decision and, when it names a proxy, the upstream client's tunnel."""

    route: EgressRoute
    proxy: EgressProxy | None

    @classmethod
    def of(cls, route: EgressRoute) -> _Egress:
        server = route.proxy
        if server is None:
            return cls(route=route, proxy=None)
        # Revealed into the CONNECT request only; EgressProxy's repr leaves it out.
        authorization = server.authorization.reveal() if server.authorization else None
        return cls(route=route, proxy=EgressProxy(server.host, server.port, authorization))


def route_egress(config: Config, route: Route) -> EgressRoute:
    """Return how ``route``'s upstream is reached (directly or through a forward proxy)."""
    return decide(config.egress, route.proxy, route.upstream, key=route.proxy_key)


def translate(exc: BaseException, egress: _Egress | None = None) -> UpstreamError:
    """Return ``exc`` as an ``UpstreamError``: the client's own, or one for a stray fault.

    The upstream client (the edge for transport faults) names them already; a forward proxy's
    refusal is given the fixed text that names the keys to check, never the proxy's address.
    """
    if isinstance(exc, ProxyTunnelError) and egress is not None:
        failure = tunnel_failure(egress.route, exc.proxy_status)
        if failure.reason == "proxy_auth":
            return ProxyTunnelError(
                "The forward proxy refused the credentials (HTTP 407): check "
                "egress.proxy_user and egress.proxy_password_file.",
                proxy_status=failure.status,
            )
        if failure.status is not None:
            return ProxyTunnelError(
                f"The forward proxy refused the tunnel (HTTP {failure.status}).",
                proxy_status=failure.status,
            )
        return ProxyTunnelError("The forward proxy is unreachable.", proxy_status=None)
    if isinstance(exc, UpstreamError):
        return exc
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout()
    if isinstance(exc, ssl.SSLError):
        return UpstreamError("The TLS handshake with the upstream failed.", reason="tls")
    if isinstance(exc, ConnectionError | OSError | _BodyAborted):
        return UpstreamError("The upstream connection was reset.", reason="reset")
    return UpstreamError("The upstream answer could not be read.", reason="protocol")


def _too_large() -> RequestRejected:
    return RequestRejected(
        "The request body exceeds the size limit.", status=413, reason="payload_too_large"
    )


def _too_slow() -> RequestRejected:
    return RequestRejected(
        "The request body did not arrive in time.", status=408, reason="body_timeout"
    )


def _own(token: Token, route: Route) -> Token:
    """Return ``token`` when it is the route's client's; never send another's (SECURITY.md 49)."""
    if token.client != route.client:
        # Cannot happen while each route reads its own client's provider; fail closed anyway.
        raise InternalError("The token is not this route's client's.")
    return token
