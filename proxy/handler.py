"""Own the proxy listener: one handler for every request, and aiohttp's connection handler.

The proxy listener (``[listen]``) is a low-level ``aiohttp.web.Server`` with one handler: no
router and no middleware on the hot path, and the handler sees every request as sent -- even
``OPTIONS *`` and absolute-form targets, which a router would answer on its own. The admin paths
do not exist here, so nothing reachable through the proxy listener can touch them.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Any, Final, TypeVar

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from proxy import logs
from proxy._aiohttp import (
    CustomHandlerServer,
    Http11Response,
    answer_started,
    chunked_request_since,
    forget_interim_output,
    requests_queued,
    requests_queued_since,
    server_of,
)
from proxy.admission import Admission
from proxy.config import Config, Route
from proxy.drain import Drain
from proxy.errors import InternalError, ProxyError, RequestRejected, UpstreamError
from proxy.forward import Exchange, Forwarder
from proxy.framing import ChunkFramingGuard, check_transfer_encoding, closes_connection
from proxy.headers import new_trace_id, trace_id_for
from proxy.inbound import (
    ALLOW_HEADER,
    check_browser,
    check_fragment,
    check_header_bytes,
    check_host,
    check_method,
    check_path,
    check_proxy_key,
    check_upgrade,
    check_version,
    find_route,
    split_target,
)
from proxy.metrics import Metrics
from proxy.problems import problem_response

# The logger names stay those of the former proxy.app (docs/operations.md, "Logs").
log = logging.getLogger("ksz_proxy.app")
access_log = logging.getLogger("ksz_proxy.access")

# Request line and header limits of the proxy listener: oversized ones get 4xx from the parser.
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 100
# Host values and raw paths already accepted (with their route), remembered so that the checks
# of the next request with the same ones are one lookup: callers repeat a handful of each. Both
# are bounded (emptied when full) and emptied by a reload.
_REMEMBERED: Final = 256
_V = TypeVar("_V")


class ProxyHandler:
    """Handle one request on the proxy listener: inbound policy, then forward."""

    def __init__(
        self,
        config: Config,
        *,
        forwarder: Forwarder,
        metrics: Metrics,
        drain: Drain,
        port: int,
    ) -> None:
        self._metrics = metrics
        self._drain = drain
        # The bound port, for the Host check; start() sets it once the listener is bound.
        self.port = port
        self._admission = Admission(
            max_receiving=config.listen.max_receiving, max_in_flight=config.listen.max_in_flight
        )
        self.use(config, forwarder)

    @property
    def forwarder(self) -> Forwarder:
        """Return the forwarder new requests get."""
        return self._forwarder

    def use(self, config: Config, forwarder: Forwarder) -> None:
        """Serve new requests with ``config`` and ``forwarder``; in-flight ones keep theirs.

        One synchronous call: no request sees half of it. A request reads the inbound settings
        before its first ``await`` and holds on to the forwarder it started with.
        """
        self._config = config
        self._forwarder = forwarder
        # The caps change with a reload; the counts of requests already admitted stay.
        self._admission.max_receiving = config.listen.max_receiving
        self._admission.max_in_flight = config.listen.max_in_flight
        self._max_body = config.listen.max_body_bytes
        # How long a caller may leave the answer unread (see _ProxyRequestHandler.pause_writing).
        self.caller_write_timeout_s = config.upstream.read_timeout_s
        self._hosts_ok: dict[str, bool] = {}
        self._routes_of: dict[str, Route] = {}
        secret = config.listen.shared_secret
        self._proxy_key = secret.reveal().encode() if secret is not None else None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        drain = self._drain
        trace_id = trace_id_for(request.headers)
        exchange = Exchange()
        route_prefix = "unrouted"
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        reason: str | None = None  # the problem's reason, when the proxy answered itself
        forwarder = self._forwarder  # this request's, even if a reload swaps it meanwhile
        max_body = self._max_body
        task = request.task
        drain.enter(task)
        try:
            # Decided first: a refused chunked request must close its connection too.
            exchange.close = closes_connection(request.headers)
            route = self._accept(request)
            route_prefix = route.prefix
            await self._continue(request, max_body)
            body = None
            if request.body_exists:
                with self._admission.receiving_body():
                    body = await forwarder.receive(request)
            with self._admission.forwarding():
                response = await forwarder.forward(request, route, trace_id, exchange, body)
            return response
        except ProxyError as exc:
            if isinstance(exc, UpstreamError):
                exchange.upstream_error = exc.reason
            reason = exc.code
            response = self._problem(request, exc, trace_id, close=exchange.close)
            if not exchange.bytes_out and isinstance(response.body, bytes):
                exchange.bytes_out = len(response.body)  # the problem body the caller got
            return response
        finally:
            drain.leave(task)
            duration_s = time.perf_counter() - started
            # 499 (nginx's convention): the caller went away before the answer was complete.
            if exchange.caller_gone:
                status = 499
            elif response is not None:
                status = response.status
            else:
                status = exchange.status_sent or 499
            self._metrics.observe_request(route_prefix, request.method, status, duration_s)
            if exchange.upstream_error is not None:
                self._metrics.count_upstream_error(route_prefix, exchange.upstream_error)
            if exchange.retried:
                self._metrics.count_retry(route_prefix)
            if exchange.token_reflected:
                self._metrics.count_token_reflected(route_prefix, exchange.token_reflected)
            if access_log.isEnabledFor(logging.INFO):
                self._log_access(
                    request, trace_id, route_prefix, status, duration_s, exchange, reason
                )

    @staticmethod
    def _log_access(
        request: web.BaseRequest,
        trace_id: str,
        route_prefix: str,
        status: int,
        duration_s: float,
        exchange: Exchange,
        reason: str | None,
    ) -> None:
        logs.write_request(
            access_log,
            trace_id=trace_id,
            method=request.method,
            route=route_prefix,
            path=request.raw_path.partition("?")[0],
            status=status,
            upstream_status=exchange.upstream_status,
            duration_s=round(duration_s, 6),
            bytes_in=exchange.bytes_in,
            bytes_out=exchange.bytes_out,
            retried=exchange.retried,
            reason=reason,
        )

    def _accept(self, request: web.BaseRequest) -> Route:
        """Apply the inbound policy and return the route; raise RequestRejected otherwise."""
        check_method(request.method)
        if request.raw_path == "*":
            raise RequestRejected(
                "OPTIONS * is not forwarded.", status=405, reason="method_not_allowed"
            )
        check_version(request.version)
        check_transfer_encoding(request.headers, request.version)
        check_header_bytes(request.raw_headers)
        check_fragment(request.raw_path)
        raw_path, _query = split_target(request.raw_path)
        headers = request.headers
        if len(headers.getall("Host", ())) > 1:
            raise RequestRejected(
                "Exactly one Host header is required.", status=400, reason="bad_host"
            )
        host = headers.get("Host", "")  # missing and empty: both refused by check_host
        if host not in self._hosts_ok:
            check_host(host, self._config.listen, self.port)
            _remember(self._hosts_ok, host, True)
        check_browser(headers)
        check_proxy_key(headers, self._proxy_key)
        check_upgrade(headers)
        route = self._routes_of.get(raw_path)
        if route is None:
            check_path(raw_path)
            route = find_route(self._config.routes, raw_path)
            _remember(self._routes_of, raw_path, route)
        return route

    async def _continue(self, request: web.BaseRequest, max_body: int) -> None:
        """Answer ``Expect: 100-continue`` only once the request is known to be acceptable."""
        expect = request.headers.get("Expect")
        if expect is None:
            return
        if expect.strip().lower() != "100-continue":
            raise RequestRejected(
                "Only Expect: 100-continue is supported.", status=400, reason="bad_expect"
            )
        length = request.content_length
        if length is not None and length > max_body:
            raise RequestRejected(
                "The request body exceeds the size limit.", status=413, reason="payload_too_large"
            )
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            forget_interim_output(request.writer)

    def _problem(
        self, request: web.BaseRequest, error: ProxyError, trace_id: str, *, close: bool
    ) -> web.Response:
        # A body left unread would be parsed as the next request: close instead. The same for a
        # refused method: after CONNECT the C parser takes every later byte as tunnel data, not
        # as body, whatever Content-Length says, and would parse it as the next request.
        unread = close or (request.body_exists and not request.content.at_eof())
        extra = {"Allow": ALLOW_HEADER} if error.status == 405 else None
        if error.status >= 500 or error.status in (408, 413):
            log.warning(
                "request failed",
                extra={
                    "trace_id": trace_id,
                    "status": error.status,
                    "reason": error.code,
                },
            )
        return problem_response(
            error,
            instance=request.raw_path.partition("?")[0],
            trace_id=trace_id,
            close=unread or error.status in (400, 405, 408, 413),
            extra_headers=extra,
            response_class=Http11Response,
        )


def _remember(accepted: dict[str, _V], key: str, value: _V) -> None:
    """Remember what ``key`` was accepted as; a full memory is emptied first (``_REMEMBERED``)."""
    if len(accepted) >= _REMEMBERED:
        accepted.clear()
    accepted[key] = value


class _ProxyRequestHandler(RequestHandler):
    """The proxy listener's connection handler, with fixed answers for what it refuses itself.

    aiohttp answers unparsable requests with a plain-text body that quotes the offending line
    and logs it with a traceback: either may carry a caller's credential. Here both are fixed.
    Every read from the socket also passes the chunk framing guard (``framing.py``).

    **A caller that stops reading** holds its in-flight slot and its upstream connection for as
    long as it likes, since ``upstream.total_timeout_s`` does not run while the proxy writes to
    the caller. So when the socket's send buffer fills up (the transport pauses writing: more
    than its high-water mark, 64 KiB, waits unsent), a timer of ``upstream.read_timeout_s``
    starts; it stops when the caller has taken enough for writing to resume (the buffer is down
    to its low-water mark). When it fires the connection is cut: the request ends as 499 and
    frees its slot. The timer is armed only while writing is paused, so a request whose answer
    goes out at once costs nothing for it.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._framing = ChunkFramingGuard()
        self._write_stall: asyncio.TimerHandle | None = None

    def pause_writing(self) -> None:
        super().pause_writing()
        server = server_of(self)
        if self._write_stall is None and isinstance(server, ProxyServer):
            # The transport itself, not self.transport when the timer fires: a keep-alive close
            # in between (aiohttp's force_close) sets that to None while the socket still waits
            # for the caller to read before it closes.
            self._write_stall = asyncio.get_running_loop().call_later(
                server.proxy_handler.caller_write_timeout_s, self._caller_stalled, self.transport
            )

    def resume_writing(self) -> None:
        super().resume_writing()
        self._stop_stall_timer()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_stall_timer()
        super().connection_lost(exc)

    def _stop_stall_timer(self) -> None:
        if self._write_stall is not None:
            self._write_stall.cancel()
            self._write_stall = None

    def _caller_stalled(self, transport: asyncio.Transport | None) -> None:
        self._write_stall = None
        log.info("the caller stopped reading the answer; its connection is cut")
        if transport is not None:
            # connection_lost follows: aiohttp cancels the request's handler (handler_cancellation),
            # which ends it as 499 and frees its slot; a connection already closing is let go.
            transport.abort()

    def data_received(self, data: bytes) -> None:
        # aiohttp's C parser skips chunk extensions and trailers without any limit; the guard
        # compares the bytes read with the heads and body data they gave.
        queued = requests_queued(self)
        super().data_received(data)
        guard = self._framing
        if not guard.watching and not chunked_request_since(self, queued):
            return  # the common case: no chunked body in sight
        if not guard.received(len(data), list(requests_queued_since(self, queued))):
            self.close()  # the handler answers 400; read nothing more on this connection

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        del message  # may quote the request; never used
        if answer_started(request):
            raise ConnectionError("the answer has started; the connection is cut")
        name = type(exc).__name__ if exc is not None else None
        error: ProxyError
        if status >= 500:
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
            # The frames without the exception's message, which may quote request data.
            log.error(
                "unexpected error in the request handler", extra={"error": name, "frames": frames}
            )
            error = InternalError("The proxy failed to handle the request.")
        elif name == "InvalidURLError":
            # Raw bytes outside ASCII in the target (llhttp refuses them): say how to send them.
            log.info("malformed request refused", extra={"error": name, "status": 400})
            status = 400
            error = RequestRejected(
                "The request target holds characters that must be percent-encoded (RFC 3986): "
                "send non-ASCII characters as UTF-8 bytes in %XX form, e.g. é as %C3%A9.",
                status=400,
                reason="bad_target",
            )
        else:
            log.info("malformed request refused", extra={"error": name, "status": status})
            if status not in (400, 413, 414, 431):
                status = 400
            error = RequestRejected(
                "The request is not valid HTTP/1.1.", status=status, reason="bad_request"
            )
        server = server_of(self)
        if isinstance(server, ProxyServer):
            server.metrics.observe_request("unrouted", "OTHER", status, 0.0)
        return problem_response(
            error,
            instance="-",
            trace_id=new_trace_id(),
            close=True,
            response_class=Http11Response,
        )


def make_proxy_server(
    handler: ProxyHandler, *, metrics: Metrics, keepalive_timeout_s: float
) -> ProxyServer:
    """Return the proxy listener's server for ``handler``, with its parser limits."""
    return ProxyServer(
        handler,
        metrics=metrics,
        handler_cancellation=True,
        keepalive_timeout=keepalive_timeout_s,
        max_line_size=MAX_LINE_BYTES,
        max_field_size=MAX_FIELD_BYTES,
        max_headers=MAX_HEADERS,
        auto_decompress=False,
        access_log=None,
        # After a refused body (413, 408) close at once instead of draining it for 10 s.
        lingering_time=0,
    )


class ProxyServer(CustomHandlerServer):
    """The proxy listener's low-level server; its connections use ``_ProxyRequestHandler``."""

    connection_class = _ProxyRequestHandler

    def __init__(self, handler: ProxyHandler, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics
        self.proxy_handler = handler
