"""Own the wiring: resources, the proxy listener, the admin listener, start and stop.

Two listeners, never mixed:

- the **proxy listener** (``[listen]``) is a low-level ``aiohttp.web.Server`` with one handler:
  no router and no middleware on the hot path, and the handler sees every request as sent --
  even ``OPTIONS *`` and absolute-form targets, which a router would answer on its own;
- the **admin listener** (``[admin]``) is an ``aiohttp.web.Application``. Its ``cleanup_ctx``
  generators own the long-lived resources (token session and provider, upstream session and
  forwarder) under typed ``AppKey``s: created in order at start-up, closed in reverse order, and
  only if their start-up finished. The admin paths exist only there, so nothing reachable through
  the proxy listener can touch them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import http_parser, web
from aiohttp.web_protocol import RequestHandler

from proxy import forward, logs, tokens
from proxy.config import Config, Route, load_config
from proxy.credentials import Credentials, check_algorithm, load_credentials
from proxy.errors import ConfigError, ProxyError, RequestRejected, UpstreamError
from proxy.forward import Exchange, Forwarder
from proxy.headers import new_trace_id, trace_id_for
from proxy.health import assess
from proxy.inbound import (
    ALLOW_HEADER,
    check_browser,
    check_fragment,
    check_host,
    check_method,
    check_path,
    check_proxy_key,
    check_upgrade,
    check_version,
    find_route,
    split_target,
)
from proxy.metrics import Metrics, scope_label
from proxy.problems import problem_reason, problem_response
from proxy.tokens import TokenProvider

log = logging.getLogger("ksz_proxy.app")
access_log = logging.getLogger("ksz_proxy.access")

# Request line and header limits of the proxy listener: oversized ones get 4xx from the parser.
MAX_LINE_BYTES: Final = 8190
MAX_FIELD_BYTES: Final = 8190
MAX_HEADERS: Final = 100
# After the drain, what still runs gets this long to react to cancellation.
CANCEL_GRACE_S: Final = 1.0
LISTEN_BACKLOG: Final = 1024


@dataclass(slots=True)
class State:
    """Mutable run-time state shared by both listeners."""

    in_flight: int = 0
    draining: bool = False
    started_at: float = field(default_factory=time.monotonic)
    proxy_port: int = 0
    # Replaced by a credential reload (SIGHUP); None means the ones the app started with.
    credentials: Credentials | None = None
    # Set whenever no request is in flight; the drain waits on it.
    idle: asyncio.Event = field(default_factory=asyncio.Event)
    # The handler tasks in flight, so that a drain that runs out can cancel them.
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def enter(self, task: asyncio.Task[Any] | None) -> None:
        """Count a request in."""
        self.in_flight += 1
        self.idle.clear()
        if task is not None:
            self.tasks.add(task)

    def leave(self, task: asyncio.Task[Any] | None) -> None:
        """Count a request out."""
        self.in_flight -= 1
        if task is not None:
            self.tasks.discard(task)
        if self.in_flight == 0:
            self.idle.set()

    def current_credentials(self, app: web.Application) -> Credentials:
        """Return the credentials in use now."""
        return self.credentials or app[CREDENTIALS]


CONFIG: Final = web.AppKey("config", Config)
CREDENTIALS: Final = web.AppKey("credentials", Credentials)
STATE: Final = web.AppKey("state", State)
TOKENS: Final = web.AppKey("tokens", TokenProvider)
FORWARDER: Final = web.AppKey("forwarder", Forwarder)
METRICS: Final = web.AppKey("metrics", Metrics)


class ParserError(ProxyError):
    """aiohttp's C HTTP parser is not in use; the pure-Python fallback is refused."""


def check_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS or no wheel)."""
    if http_parser.HttpRequestParser.__module__ != "aiohttp._http_parser":
        raise ParserError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or aiohttp was "
            "installed without its compiled extension); ksz-proxy refuses the Python fallback",
            reason="no_c_parser",
        )


# -- resources (admin application's cleanup_ctx) --------------------------------------------------


async def _token_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]

    def on_fetch(outcome: str, duration_s: float) -> None:
        metrics.token_requests.labels(outcome=outcome).inc()
        metrics.token_fetch.observe(duration_s)

    async with tokens.make_session(config) as session:
        provider = TokenProvider(config, app[CREDENTIALS], session, on_fetch=on_fetch)
        provider.start()
        app[TOKENS] = provider
        try:
            yield
        finally:
            await provider.close()


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    async with forward.make_session(app[CONFIG], app[CREDENTIALS]) as session:
        app[FORWARDER] = Forwarder(app[CONFIG], app[TOKENS], session)
        yield


# -- admin listener ----------------------------------------------------------------------------


async def _livez(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "UP"})


async def _readyz(request: web.Request) -> web.Response:
    app = request.app
    if app[STATE].draining:
        return not_ready("draining", "The proxy is shutting down.")
    provider = app[TOKENS]
    for scopes in app[CONFIG].scope_sets:
        if provider.peek(scopes) is None:
            return not_ready("no_token", "No usable token yet for every configured scope set.")
    return web.json_response({"status": "UP"})


def not_ready(reason: str, detail: str, *, instance: str = "/readyz") -> web.Response:
    """Return an admin path's 503 problem answer, asking to come back in a second."""
    error = RequestRejected(503, reason, detail, retry_after_s=1)
    return problem_response(error, instance=instance, trace_id="-")


async def _health(request: web.Request) -> web.Response:
    app = request.app
    verdict = assess(
        scope_sets=app[CONFIG].scope_sets,
        tokens=app[TOKENS].status(),
        certificate_not_after=app[STATE].current_credentials(app).not_after,
        draining=app[STATE].draining,
    )
    return web.json_response(
        {"status": verdict.status, "details": verdict.details},
        status=verdict.http_status,
        headers={"Cache-Control": "no-store"},
    )


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    provider = app[TOKENS]
    # Gauges that describe state are read at scrape time, off the request path.
    for status in provider.status():
        metrics.token_expiry.labels(scopes=scope_label(status.scopes)).set(
            status.expires_at_wall or 0
        )
    if provider.clock_skew_s is not None:
        metrics.clock_skew.set(provider.clock_skew_s)
    metrics.in_flight.set(app[STATE].in_flight)
    metrics.certificate_expiry.set(app[STATE].current_credentials(app).not_after.timestamp())
    return web.Response(
        body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def make_admin_app(config: Config, credentials: Credentials, state: State) -> web.Application:
    """Return the admin application; its start-up creates every long-lived resource."""
    app = web.Application(handler_args={"auto_decompress": False})
    app[CONFIG] = config
    app[CREDENTIALS] = credentials
    app[STATE] = state
    app[METRICS] = Metrics((r.prefix for r in config.routes), config.scope_sets)
    app.cleanup_ctx.append(_token_ctx)
    app.cleanup_ctx.append(_upstream_ctx)
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


# -- proxy listener ----------------------------------------------------------------------------


class ProxyHandler:
    """Handle one request on the proxy listener: inbound policy, then forward."""

    def __init__(self, admin: web.Application) -> None:
        self._admin = admin
        config = admin[CONFIG]
        self._config = config
        self._state = admin[STATE]
        self._metrics = admin[METRICS]
        self._max_in_flight = config.listen.max_in_flight
        self._max_body = config.listen.max_body_bytes
        secret = config.listen.shared_secret
        self._proxy_key = secret.reveal().encode() if secret is not None else None

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        state = self._state
        trace_id = trace_id_for(request.headers)
        exchange = Exchange()
        route_prefix = "unrouted"
        started = time.perf_counter()
        response: web.StreamResponse | None = None
        task = request.task
        state.enter(task)
        try:
            if state.in_flight > self._max_in_flight:
                raise RequestRejected(
                    503, "overloaded", "Too many requests in flight.", retry_after_s=1
                )
            route = self._accept(request)
            route_prefix = route.prefix
            await self._continue(request)
            response = await self._admin[FORWARDER].forward(request, route, trace_id, exchange)
            return response
        except ProxyError as exc:
            if isinstance(exc, UpstreamError):
                exchange.upstream_error = exc.reason
            response = self._problem(request, exc, trace_id)
            return response
        finally:
            state.leave(task)
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
                self._metrics.upstream_errors.labels(
                    route=route_prefix, reason=exchange.upstream_error
                ).inc()
            if exchange.retried:
                self._metrics.retries.labels(route=route_prefix).inc()
            if access_log.isEnabledFor(logging.INFO):
                self._log_access(request, trace_id, route_prefix, status, duration_s, exchange)

    @staticmethod
    def _log_access(
        request: web.BaseRequest,
        trace_id: str,
        route_prefix: str,
        status: int,
        duration_s: float,
        exchange: Exchange,
    ) -> None:
        fields: dict[str, object] = {
            "trace_id": trace_id,
            "method": request.method,
            "route": route_prefix,
            "path": request.raw_path.partition("?")[0],
            "status": status,
            "upstream_status": exchange.upstream_status,
            "duration_s": round(duration_s, 6),
            "bytes_in": exchange.bytes_in,
            "bytes_out": exchange.bytes_out,
            "retried": exchange.retried,
        }
        logs.write_access(access_log, fields)

    def _accept(self, request: web.BaseRequest) -> Route:
        """Apply the inbound policy and return the route; raise RequestRejected otherwise."""
        check_method(request.method)
        if request.raw_path == "*":
            raise RequestRejected(405, "method_not_allowed", "OPTIONS * is not forwarded.")
        check_version(request.version)
        check_fragment(request.raw_path)
        raw_path, _query = split_target(request.raw_path)
        headers = request.headers
        if len(headers.getall("Host", ())) > 1:
            raise RequestRejected(400, "bad_host", "Exactly one Host header is required.")
        check_host(headers.get("Host"), self._config.listen, self._state.proxy_port)
        check_browser(headers)
        check_proxy_key(headers, self._proxy_key)
        check_upgrade(headers)
        check_path(raw_path)
        return find_route(self._config.routes, raw_path)

    async def _continue(self, request: web.BaseRequest) -> None:
        """Answer ``Expect: 100-continue`` only once the request is known to be acceptable."""
        expect = request.headers.get("Expect")
        if expect is None:
            return
        if expect.strip().lower() != "100-continue":
            raise RequestRejected(400, "bad_expect", "Only Expect: 100-continue is supported.")
        length = request.content_length
        if length is not None and length > self._max_body:
            raise RequestRejected(
                413, "payload_too_large", "The request body exceeds the size limit."
            )
        if request.version >= aiohttp.HttpVersion11:
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0

    def _problem(self, request: web.BaseRequest, error: ProxyError, trace_id: str) -> web.Response:
        # A body left unread would be parsed as the next request: close instead.
        unread = request.body_exists and not request.content.at_eof()
        extra = {"Allow": ALLOW_HEADER} if error.status == 405 else None
        if error.status >= 500 or error.status in (408, 413):
            log.warning(
                "request failed",
                extra={
                    "trace_id": trace_id,
                    "status": error.status,
                    "reason": problem_reason(error),
                },
            )
        return problem_response(
            error,
            instance=request.raw_path.partition("?")[0],
            trace_id=trace_id,
            close=unread or error.status in (400, 408, 413),
            extra_headers=extra,
        )


class _ProxyRequestHandler(RequestHandler):
    """The proxy listener's connection handler, with fixed answers for what it refuses itself.

    aiohttp answers unparsable requests with a plain-text body that quotes the offending line
    and logs it with a traceback: either may carry a caller's credential. Here both are fixed.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        del message  # may quote the request; never used
        if request.writer.output_size > 0:
            raise ConnectionError("the answer has started; the connection is cut")
        name = type(exc).__name__ if exc is not None else None
        if status >= 500:
            frames = "".join(traceback.format_tb(exc.__traceback__)) if exc else ""
            # The frames without the exception's message, which may quote request data.
            log.error(
                "unexpected error in the request handler", extra={"error": name, "frames": frames}
            )
            error = RequestRejected(500, "internal", "The proxy failed to handle the request.")
        else:
            log.info("malformed request refused", extra={"error": name, "status": status})
            if status not in (400, 413, 414, 431):
                status = 400
        manager = self._manager
        if isinstance(manager, _ProxyServer):
            manager.metrics.observe_request("unrouted", "OTHER", status, 0.0)
            error = RequestRejected(status, "bad_request", "The request is not valid HTTP/1.1.")
        return problem_response(error, instance="-", trace_id=new_trace_id(), close=True)


class _ProxyServer(web.Server):
    """A low-level server whose connections use ``_ProxyRequestHandler``."""

    def __init__(self, handler: ProxyHandler, *, metrics: Metrics, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.metrics = metrics

    def __call__(self) -> RequestHandler:
        return _ProxyRequestHandler(self, loop=self._loop, **self._kwargs)


# -- running -----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunningProxy:
    """Both listeners, started; ``close`` stops them in order."""

    admin_runner: web.AppRunner
    proxy_runner: web.ServerRunner
    admin_app: web.Application
    state: State
    proxy_url: str
    admin_url: str
    drain_s: float = 20.0

    async def close(self) -> None:
        """Turn readiness off, stop accepting, let in-flight requests finish, then close all.

        In-flight requests get ``drain_s`` in all; whatever still runs then is cancelled.
        """
        self.state.draining = True
        for site in list(self.proxy_runner.sites):
            await site.stop()
        server = self.proxy_runner.server
        if server is not None:
            server.pre_shutdown()  # keep-alive connections close once their request is done
        if self.state.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.state.idle.wait(), self.drain_s)
        left = list(self.state.tasks)
        if left:
            log.warning(
                "drain time over; cancelling requests in flight", extra={"requests": len(left)}
            )
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CANCEL_GRACE_S)
        await self.proxy_runner.cleanup()
        await self.admin_runner.cleanup()


async def start(
    config: Config,
    credentials: Credentials,
    *,
    drain_s: float = 20.0,
    admin_socket: Path | None = None,
) -> RunningProxy:
    """Create the resources and start both listeners; return once they accept connections.

    With ``admin_socket`` (a worker of ``listen.workers`` > 1) the admin application listens on
    that Unix socket instead of ``admin.port``, and the proxy port is bound with SO_REUSEPORT.
    """
    check_c_parser()
    state = State()
    admin_app = make_admin_app(config, credentials, state)
    admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await admin_runner.setup()
    try:
        if admin_socket is None:
            admin_site = web.TCPSite(admin_runner, config.admin.host, config.admin.port)
            await _listen(admin_site, "admin", config.admin.host, config.admin.port)
        else:
            await web.UnixSite(admin_runner, str(admin_socket)).start()
        server = _ProxyServer(
            ProxyHandler(admin_app),
            metrics=admin_app[METRICS],
            handler_cancellation=True,
            keepalive_timeout=config.listen.keepalive_timeout_s,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
            auto_decompress=False,
            access_log=None,
            # After a refused body (413, 408) close at once instead of draining it for 10 s.
            lingering_time=0,
        )
        proxy_runner = web.ServerRunner(
            server, handle_signals=False, shutdown_timeout=CANCEL_GRACE_S
        )
        await proxy_runner.setup()
        # A deeper accept queue than aiohttp's 128: bursts of new connections are not dropped.
        proxy_site = web.TCPSite(
            proxy_runner,
            config.listen.host,
            config.listen.port,
            backlog=LISTEN_BACKLOG,
            reuse_port=admin_socket is not None,
        )
        await _listen(proxy_site, "listen", config.listen.host, config.listen.port)
    except BaseException:
        await admin_runner.cleanup()
        raise
    state.proxy_port = bound_port(proxy_runner)
    if not config.listen.is_loopback:
        log.warning(
            "the proxy listener is bound to a non-loopback address: anyone who can reach it "
            "acts with the partner's authority at KSZ",
            extra={"host": config.listen.host},
        )
    return RunningProxy(
        drain_s=drain_s,
        admin_runner=admin_runner,
        proxy_runner=proxy_runner,
        admin_app=admin_app,
        state=state,
        proxy_url=f"http://{authority(config.listen.host, state.proxy_port)}",
        admin_url=f"http://{authority(config.admin.host, bound_port(admin_runner))}"
        if admin_socket is None
        else f"unix:{admin_socket}",
    )


def reload_credentials(running: RunningProxy, environ: dict[str, str] | None = None) -> bool:
    """Re-read the keystore, key, certificate and password; on success, fetch fresh tokens.

    Invalid new material changes nothing: the old credentials keep serving and an error is
    logged. Only the credentials are reloaded; other configuration changes need a restart.
    """
    app = running.admin_app
    old = app[CONFIG]
    if old.source is None:
        log.error("credential reload skipped: the configuration was not read from a file")
        return False
    try:
        config = load_config(old.source, environ if environ is not None else dict(os.environ))
        credentials = load_credentials(config.client)
        check_algorithm(credentials, old.oauth.algorithm)
    except ProxyError as exc:
        log.error(
            "credential reload failed; keeping the current credentials", extra={"error": exc.detail}
        )
        return False
    app[TOKENS].replace_credentials(credentials)
    running.state.credentials = credentials
    log.info(
        "credentials reloaded",
        extra={
            "subject": credentials.subject,
            "serial": credentials.serial,
            "not_after": credentials.not_after.isoformat(),
        },
    )
    return True


async def _listen(site: web.TCPSite, key: str, host: str, port: int) -> None:
    try:
        await site.start()
    except OSError as exc:
        raise ConfigError(
            f"{key}.port: cannot listen on {authority(host, port)} ({exc.strerror or exc})"
        ) from None


def bound_port(runner: web.BaseRunner) -> int:
    """Return the TCP port ``runner`` listens on (0 when it has none)."""
    for address in runner.addresses:
        if isinstance(address, tuple):
            return int(address[1])
    return 0


def authority(host: str, port: int) -> str:
    """Return ``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
