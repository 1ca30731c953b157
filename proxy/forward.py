"""Own one forwarded request: caller -> KSZ REST endpoint -> caller, streaming both ways.

The rules (the inbound policy in ``inbound.py`` has already accepted the request):

- the target is sent byte-exact: ``<route upstream><raw path and query>``, never rebuilt from a
  decoded path (``yarl.URL(..., encoded=True)``);
- the body is framed afresh with the same bytes: ``Content-Length`` when the caller sent one,
  chunked otherwise; bodies up to ``upstream.replay_max_bytes`` are buffered so that an upstream
  401 can be answered by one fresh token and one resend; larger bodies stream through with
  backpressure, bounded by ``listen.max_body_bytes`` (413) and ``listen.body_read_timeout_s`` (408);
- the answer streams back; one of known length up to ``CHUNK`` is read whole first and sent in
  one write together with its headers;
- redirects are never followed and nothing is decompressed, in either direction;
- transport faults become ``UpstreamError`` with a stable reason (dns, connect, tls, reset,
  protocol) or ``UpstreamTimeout``; a request is never retried after a transport fault.
"""

from __future__ import annotations

import asyncio
import io
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Mapping
from dataclasses import dataclass
from typing import Final

import aiohttp
from aiohttp import web
from yarl import URL

from proxy._aiohttp import disable_connection_retry
from proxy.config import Config, Route
from proxy.credentials import Credentials
from proxy.egress import EgressRoute, decide, proxy_failure
from proxy.errors import InternalError, RequestRejected, UpstreamError, UpstreamTimeout
from proxy.headers import downstream_response_headers, upstream_request_headers
from proxy.tls import client_context
from proxy.tokens import Token, TokenProvider

log = logging.getLogger("ksz_proxy.forward")

CHUNK: Final = 64 * 1024
_NO_BODY_STATUSES: Final = frozenset({204, 304})
# Headers aiohttp's client would add on its own; the caller's own values (or none) go upstream.
_SKIP_AUTO_HEADERS: Final = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


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


def make_session(config: Config, credentials: Credentials) -> aiohttp.ClientSession:
    """Return the upstream session: verified TLS, pooled, no proxy variables, no decompression."""
    upstream = config.upstream
    context = client_context(
        upstream.ca_file,
        client_credentials=credentials if upstream.client_certificate else None,
    )
    connector = aiohttp.TCPConnector(
        ssl=context, limit=upstream.max_connections, limit_per_host=0, ttl_dns_cache=60
    )
    session = aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
        raise_for_status=False,
        timeout=aiohttp.ClientTimeout(
            total=upstream.total_timeout_s,
            sock_connect=upstream.connect_timeout_s,
            sock_read=upstream.read_timeout_s,
        ),
    )
    # A resend after a reset connection would send a streamed body empty: see _aiohttp.py.
    disable_connection_retry(session)
    return session


class _BodyAborted(Exception):
    """The caller's body broke a limit while it streamed upstream."""


@dataclass(slots=True)
class _Body:
    """The caller's body: the buffered start and, when it is too large to buffer, the rest."""

    buffered: bytes
    rest: AsyncIterator[bytes] | None
    # Set when the streamed rest broke a limit; aiohttp wraps the generator's exception, so the
    # answer to give is kept here rather than read back from the wrapper.
    aborted: RequestRejected | None = None

    @property
    def replayable(self) -> bool:
        return self.rest is None


class Forwarder:
    """Forward requests for the proxy listener; one instance per application."""

    def __init__(
        self,
        config: Config,
        tokens: TokenProvider | Mapping[str, TokenProvider],
        session: aiohttp.ClientSession,
    ) -> None:
        self._config = config
        # Each client's provider by name: a route only ever gets its own client's tokens
        # (SECURITY.md 49). One provider alone serves the only client.
        self._tokens = {tokens.client.name: tokens} if isinstance(tokens, TokenProvider) else tokens
        self._session = session
        self._max_body = config.listen.max_body_bytes
        self._replay_max = config.upstream.replay_max_bytes
        self._body_timeout_s = config.listen.body_read_timeout_s
        # The egress decision per route, made once: the hot path only looks it up.
        self._egress = {route.prefix: route_egress(config, route) for route in config.routes}

    @property
    def session(self) -> aiohttp.ClientSession:
        """Return the upstream session (a reload that keeps it hands it to the next Forwarder)."""
        return self._session

    async def forward(
        self, request: web.BaseRequest, route: Route, trace_id: str, exchange: Exchange
    ) -> web.StreamResponse:
        """Send ``request`` to the route's upstream and stream the answer back."""
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise _too_large()
        tokens = self._tokens[route.client]
        token = _own(await tokens.get(route.scopes), route)
        body = await self._read_start(request, declared)
        exchange.bytes_in = len(body.buffered)
        url = URL(route.upstream + request.raw_path, encoded=True)
        egress = self._egress.get(route.prefix)
        if egress is None:  # a route made after start-up (tests); decided once, then kept
            egress = self._egress[route.prefix] = route_egress(self._config, route)

        upstream = await self._send(request, url, token, body, declared, trace_id, exchange, egress)
        if upstream.status == 401:
            # The token was refused: never use it again. Resend once, and only a buffered body.
            tokens.invalidate(token)
            if body.replayable:
                upstream.release()
                token = _own(await tokens.get(route.scopes), route)
                exchange.retried = True
                upstream = await self._send(
                    request, url, token, body, declared, trace_id, exchange, egress
                )
        exchange.upstream_status = upstream.status
        return await self._relay(request, upstream, exchange)

    async def _read_start(self, request: web.BaseRequest, declared: int | None) -> _Body:
        """Buffer a replayable body; otherwise keep the first bytes and a stream of the rest."""
        if not request.body_exists:
            return _Body(buffered=b"", rest=None)
        deadline = asyncio.get_running_loop().time() + self._body_timeout_s
        if declared is not None and declared > self._replay_max:
            body = _Body(buffered=b"", rest=None)
            body.rest = self._stream_rest(request, body, 0, deadline)
            return body
        limit = self._replay_max if declared is None else declared
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
        url: URL,
        token: Token,
        body: _Body,
        declared: int | None,
        trace_id: str,
        exchange: Exchange,
        egress: EgressRoute,
    ) -> aiohttp.ClientResponse:
        data: bytes | io.BytesIO | AsyncIterator[bytes] | None
        if not request.body_exists:
            data, length = None, None
        elif body.rest is None:
            # aiohttp writes a bytes body in one go and warns above 1 MiB (an error where
            # warnings are errors); a BytesIO is written in chunks, and is made afresh per send.
            data, length = io.BytesIO(body.buffered), len(body.buffered)
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
            return await self._session.request(
                request.method,
                url,
                headers=headers,
                data=data,
                allow_redirects=False,
                **egress.request_options(),
            )
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError, OSError, _BodyAborted) as exc:
            if body.aborted is not None:
                raise body.aborted from None
            raise translate(exc, egress) from None

    async def _relay(
        self, request: web.BaseRequest, upstream: aiohttp.ClientResponse, exchange: Exchange
    ) -> web.StreamResponse:
        """Stream the upstream answer to the caller; on a fault mid-body, cut the connection."""
        response: web.StreamResponse | None = None
        try:
            no_body = request.method == "HEAD" or upstream.status in _NO_BODY_STATUSES
            length = upstream.content_length
            if length is not None and length <= CHUNK and not no_body:
                # A small answer of known length is read whole and sent with its headers in one
                # write: one send system call per request instead of two (headers, then body).
                # Nothing has reached the caller before the body is complete, so a fault while
                # reading it is answered like any upstream fault rather than by a cut.
                whole = await upstream.content.read()
                response = web.Response(
                    status=upstream.status,
                    reason=upstream.reason,
                    headers=downstream_response_headers(upstream.headers),
                    body=whole,
                )
                await _to_caller(response.prepare(request))
                exchange.status_sent = upstream.status
                exchange.bytes_out = len(whole)
                await _to_caller(response.write_eof())
                return response
            response = web.StreamResponse(
                status=upstream.status,
                reason=upstream.reason,
                headers=downstream_response_headers(upstream.headers),
            )
            if length is not None and not no_body:
                response.content_length = length
            await _to_caller(response.prepare(request))
            exchange.status_sent = upstream.status
            if not no_body:
                async for chunk in upstream.content.iter_chunked(CHUNK):
                    exchange.bytes_out += len(chunk)
                    await _to_caller(response.write(chunk))
            await _to_caller(response.write_eof())
            return response
        except _CallerGone:
            # The caller went away mid-answer: not an upstream fault, and nothing to answer.
            exchange.caller_gone = True
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
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
            upstream.release()


class _CallerGone(Exception):
    """Writing to the caller failed: it closed or reset its connection."""


async def _to_caller(write: Awaitable[object]) -> None:
    """Await a write to the caller; its connection errors become ``_CallerGone``."""
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


def route_egress(config: Config, route: Route) -> EgressRoute:
    """Return how ``route``'s upstream is reached (directly or through a forward proxy)."""
    return decide(config.egress, route.proxy, route.upstream, key=route.proxy_key)


def translate(exc: BaseException, egress: EgressRoute | None = None) -> UpstreamError:
    """Translate a transport fault into an ``UpstreamError``; the only such edge upstream."""
    failure = proxy_failure(egress, exc) if egress is not None else None
    if failure is not None:
        # A fixed text: the caller learns which keys to check, not the proxy's address.
        if failure.reason == "proxy_auth":
            return UpstreamError(
                "The forward proxy refused the credentials (HTTP 407): check "
                "egress.proxy_user and egress.proxy_password_file.",
                reason="proxy",
            )
        if failure.status is not None:
            return UpstreamError(
                f"The forward proxy refused the tunnel (HTTP {failure.status}).", reason="proxy"
            )
        return UpstreamError("The forward proxy is unreachable.", reason="proxy")
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout()
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return UpstreamError("The upstream host name does not resolve.", reason="dns")
    if isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        return UpstreamError("The TLS handshake with the upstream failed.", reason="tls")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError("The upstream refused or dropped the connection.", reason="connect")
    if isinstance(
        exc,
        aiohttp.ServerDisconnectedError
        | aiohttp.ClientOSError
        | aiohttp.ClientPayloadError
        | ConnectionError,
    ):
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
