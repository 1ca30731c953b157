"""Own the run lifecycle: resources, start, reload, drain, stop, and the serving loop.

The admin application's ``cleanup_ctx`` generators own the long-lived resources (token session
and provider, upstream session and forwarder) under the typed ``AppKey``s of ``admin.py``:
created in order at start-up, closed in reverse order, and only if their start-up finished.
``start`` builds both listeners on top of them; ``RunningProxy.close`` stops them in order
(stop accepting, let in-flight requests finish within ``listen.drain_timeout_s``, then cancel);
``serve`` is what ``ksz-proxy run`` (and each worker of ``listen.workers`` > 1) runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from proxy import __version__, forward, logs, oauth
from proxy._aiohttp import check_c_parser
from proxy.admin import (
    CLIENT_TOKENS,
    CONFIG,
    DRAIN,
    FORWARDER,
    LIVE,
    METRICS,
    RELOAD_ERRORS,
    TOKENS,
    make_admin_app,
)
from proxy.clients import Keyring, Reload, keyring_for, reload_keyring
from proxy.config import ClientConfig, Config, load_config
from proxy.credentials import Credentials
from proxy.drain import Drain
from proxy.egress import describe_destinations, ignored_variables
from proxy.errors import ConfigError, ProxyError
from proxy.forward import Forwarder
from proxy.handler import ProxyHandler, make_proxy_server
from proxy.reload import needs_new_provider, plan_reload, token_endpoint_changed
from proxy.tokens import TokenProvider

# The logger names stay those of the former proxy.app and proxy.cli (docs/operations.md, "Logs").
log = logging.getLogger("ksz_proxy.app")
run_log = logging.getLogger("ksz_proxy.cli")

# After the drain, what still runs gets this long to react to cancellation.
CANCEL_GRACE_S: Final = 1.0
LISTEN_BACKLOG: Final = 1024


# -- resources (admin application's cleanup_ctx) --------------------------------------------------


def _token_ctx(keyring: Keyring) -> Callable[[web.Application], AsyncIterator[None]]:
    async def token_ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        metrics = app[METRICS]

        def on_fetch(client: str) -> Callable[[str, float], None]:
            return lambda outcome, s: metrics.observe_token_fetch(client, outcome, s)

        async with oauth.make_session(config) as session:
            # One provider per client: its own assertion, cache, single flight and backoff.
            providers = {
                c.name: TokenProvider(
                    config, keyring[c.name], session, on_fetch=on_fetch(c.name), client=c
                )
                for c in config.clients
            }
            # Started by start() once both listeners are bound: a port that is taken must not
            # cost a token request.
            app[CLIENT_TOKENS] = dict(providers)  # what a reload (SIGHUP) updates
            app[TOKENS] = providers[config.client.name]
            try:
                yield
            finally:
                await asyncio.gather(*(provider.close() for provider in providers.values()))

    return token_ctx


async def _upstream_ctx(app: web.Application) -> AsyncIterator[None]:
    # upstream.client_certificate needs a single client (config.py): one pool, one identity.
    async with forward.make_session(app[CONFIG], app[TOKENS].credentials) as session:
        app[FORWARDER] = Forwarder(app[CONFIG], app[CLIENT_TOKENS].copy(), session)
        yield


# -- running -----------------------------------------------------------------------------------


@dataclass(slots=True)
class RunningProxy:
    """Both listeners, started; ``close`` stops them in order."""

    admin_runner: web.AppRunner
    proxy_runner: web.ServerRunner
    admin_app: web.Application
    drain: Drain
    handler: ProxyHandler
    proxy_url: str
    admin_url: str
    drain_s: float = 20.0
    # Resources a reload replaced, closed once the requests that may still use them are done.
    retiring: set[asyncio.Task[None]] = field(default_factory=set)
    # What reloads made (token provider and its session, upstream session) by id, with how to
    # close it: at the end, or by the reload that replaces it.
    owned: dict[int, list[Callable[[], Awaitable[Any]]]] = field(default_factory=dict)

    @property
    def tokens(self) -> TokenProvider:
        """Return the default client's token provider in use, holder of its credentials."""
        return self.client_tokens[self.config.client.name]

    @property
    def config(self) -> Config:
        """Return the configuration in use (the file as last loaded, restart-only keys kept)."""
        return self.admin_app[LIVE].config

    @property
    def client_tokens(self) -> dict[str, TokenProvider]:
        """Return every client's token provider by name, each holding its credentials."""
        return self.admin_app[CLIENT_TOKENS]

    async def close(self) -> None:
        """Turn readiness off, stop accepting, let in-flight requests finish, then close all.

        In-flight requests get ``drain_s`` in all; whatever still runs then is cancelled.
        """
        self.drain.draining = True
        for site in list(self.proxy_runner.sites):
            await site.stop()
        server = self.proxy_runner.server
        if server is not None:
            server.pre_shutdown()  # keep-alive connections close once their request is done
        if self.drain.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drain.idle.wait(), self.drain_s)
        left = list(self.drain.tasks)
        if left:
            log.warning(
                "drain time over; cancelling requests in flight", extra={"requests": len(left)}
            )
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=CANCEL_GRACE_S)
        await self.proxy_runner.cleanup()
        for task in list(self.retiring):
            task.cancel()  # its resources are closed on the way out
        await asyncio.gather(*self.retiring, return_exceptions=True)
        for closers in reversed(list(self.owned.values())):
            for close in closers:
                await close()
        await self.admin_runner.cleanup()


async def start(
    config: Config,
    credentials: Credentials | Keyring,
    *,
    drain_s: float = 20.0,
    admin_socket: Path | None = None,
) -> RunningProxy:
    """Create the resources and start both listeners; return once they accept connections.

    ``credentials`` are every client's by name (one ``Credentials`` serves the only client).

    With ``admin_socket`` (a worker of ``listen.workers`` > 1) the admin application listens on
    that Unix socket instead of ``admin.port``, and the proxy port is bound with SO_REUSEPORT.
    """
    check_c_parser()
    drain = Drain()
    admin_app = make_admin_app(config, drain)
    admin_app.cleanup_ctx.append(_token_ctx(keyring_for(config, credentials)))
    admin_app.cleanup_ctx.append(_upstream_ctx)
    admin_runner = web.AppRunner(admin_app, access_log=None, handle_signals=False)
    await admin_runner.setup()
    try:
        if admin_socket is None:
            admin_site = web.TCPSite(admin_runner, config.admin.host, config.admin.port)
            await listen(admin_site, "admin", config.admin.host, config.admin.port)
        else:
            await web.UnixSite(admin_runner, str(admin_socket)).start()
        handler = ProxyHandler(
            config,
            forwarder=admin_app[FORWARDER],
            metrics=admin_app[METRICS],
            drain=admin_app[DRAIN],
            port=config.listen.port,
        )
        server = make_proxy_server(
            handler,
            metrics=admin_app[METRICS],
            keepalive_timeout_s=config.listen.keepalive_timeout_s,
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
        await listen(proxy_site, "listen", config.listen.host, config.listen.port)
    except BaseException:
        await admin_runner.cleanup()
        raise
    # listen.port may be 0 (any free port): the Host check needs the one bound.
    handler.port = bound_port(proxy_runner)
    for provider in admin_app[CLIENT_TOKENS].values():
        provider.start()
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
        drain=drain,
        handler=handler,
        proxy_url=f"http://{authority(config.listen.host, handler.port)}",
        admin_url=f"http://{authority(config.admin.host, bound_port(admin_runner))}"
        if admin_socket is None
        else f"unix:{admin_socket}",
    )


def reload_config(running: RunningProxy, environ: Mapping[str, str] | None = None) -> bool:
    """Read the whole configuration file again and serve new requests with it (SIGHUP).

    See ``proxy.reload`` for what may change; the work is in ``_reload``. A file that does not
    load changes nothing: the running configuration keeps serving, the failure is counted,
    logged and shown in ``/health``. A file that loads takes effect, except for a running client
    whose new key material does not load: that client keeps running as it is (its settings and
    credentials), which is counted as a failure too, logged and shown in ``/health`` (its
    ``reloadError``) while the other clients and the rest of the file take effect. A client new
    in the file whose material does not load refuses the whole file (it has nothing to keep).
    Returns whether the whole file took effect.
    """
    app = running.admin_app
    live = app[LIVE]
    source = live.config.source
    try:
        if source is None:
            raise ConfigError("config: not read from a file; nothing to reload")
        config = load_config(source, environ if environ is not None else os.environ)
        current = {name: provider.credentials for name, provider in app[CLIENT_TOKENS].items()}
        keys = reload_keyring(live.config, config, current)
    except ProxyError as exc:
        _failed(running, exc.detail)
        log.error(
            "configuration reload failed; keeping the running configuration",
            extra={"error": exc.detail, "key": exc.detail.partition(":")[0]},
        )
        return False
    for name, error in keys.failures.items():
        log.error(
            "configuration reload failed; keeping the running configuration of this client",
            extra={"client": name, "error": error, "key": error.partition(":")[0]},
        )
    _reload(running, dataclasses.replace(config, clients=keys.clients), keys)
    return keys.ok


# Keys whose change needs a new upstream session.
_UPSTREAM_KEYS: Final = ("upstream.",)
Closer = Callable[[], Awaitable[Any]]


def _reload(running: RunningProxy, new: Config, keys: Reload) -> None:
    """Switch to ``new`` in one step: new requests use it, in-flight ones finish on the old."""
    app = running.admin_app
    live = app[LIVE]
    metrics = app[METRICS]
    old = live.config
    plan = plan_reload(old, new)
    config, changed = plan.config, plan.changed
    metrics.use_clients(config.clients_by_name, config.token_keys)
    retired: list[Closer] = []
    providers = app[CLIENT_TOKENS]
    endpoint_changed = token_endpoint_changed(changed)
    running_clients = old.clients_by_name
    for client in config.clients:
        provider = providers.get(client.name)
        credentials = keys.keyring[client.name]
        if (
            provider is None
            or endpoint_changed
            or needs_new_provider(running_clients[client.name], client)
        ):
            # Another identity or token endpoint: the old tokens are no use any more.
            if provider is not None:
                retired += running.owned.pop(id(provider), [provider.close])
            providers[client.name] = _new_provider(running, config, client, credentials)
        else:
            # The same identity: its cached tokens keep serving while ones signed anew arrive.
            provider.use(config, client)
            if client.name in keys.changed:
                provider.replace_credentials(credentials)
    for name in [name for name in providers if name not in config.clients_by_name]:
        gone = providers.pop(name)
        retired += running.owned.pop(id(gone), [gone.close])
    for provider in providers.values():
        provider.start()
    session = running.handler.forwarder.session
    # The mutual-TLS certificate is part of the session: renew it with the credentials.
    if config.upstream.client_certificate or any(k.startswith(_UPSTREAM_KEYS) for k in changed):
        retired += running.owned.pop(id(session), [session.close])
        session = forward.make_session(config, keys.keyring[config.client.name])
        running.owned[id(session)] = [session.close]
    running.handler.use(config, Forwarder(config, dict(providers), session))
    live.config = config
    app[RELOAD_ERRORS].clear()
    app[RELOAD_ERRORS].update(keys.failures)
    running.drain_s = config.listen.drain_timeout_s
    metrics.set_routes(r.prefix for r in config.routes)
    logs.use_config_level(config.log.level)
    if keys.failures:
        first = next(iter(keys.failures.values()))
        _failed(running, first)
    else:
        metrics.config_reloads.labels(outcome="success").inc()
        metrics.config_last_reload_success.set_to_current_time()
        live.reloads.succeeded()
    if retired:
        # A request started before the switch may still use them: at most the old total timeout.
        limit_s = old.upstream.total_timeout_s + CANCEL_GRACE_S
        task = asyncio.create_task(_retire(running.drain, retired, limit_s))
        running.retiring.add(task)
        task.add_done_callback(running.retiring.discard)
    for name in sorted(keys.changed, key=list(config.clients_by_name).index):
        credentials = keys.keyring[name]
        log.info(
            "credentials reloaded",
            extra={
                "client": name,
                "subject": credentials.subject,
                "serial": credentials.serial,
                "not_after": credentials.not_after.isoformat(),
            },
        )
    log.info(
        "configuration reloaded",
        extra={
            "changed": " ".join(changed) or "nothing",
            "routes": len(config.routes),
            "clients": " ".join(c.name for c in config.clients),
            "clients_kept": " ".join(keys.failures) or "none",
        },
    )
    if plan.needs_restart:
        log.warning(
            "configuration reload: these keys need a restart; their running values are kept",
            extra={"needs_restart": " ".join(plan.needs_restart)},
        )


def _failed(running: RunningProxy, detail: str) -> None:
    """Count and show a reload that did not (wholly) take effect; ``detail`` names the key."""
    running.admin_app[METRICS].config_reloads.labels(outcome="failure").inc()
    running.admin_app[LIVE].reloads.failed(detail)


def _new_provider(
    running: RunningProxy, config: Config, client: ClientConfig, credentials: Credentials
) -> TokenProvider:
    metrics = running.admin_app[METRICS]

    def on_fetch(outcome: str, duration_s: float) -> None:
        metrics.observe_token_fetch(client.name, outcome, duration_s)

    session = oauth.make_session(config)
    provider = TokenProvider(config, credentials, session, on_fetch=on_fetch, client=client)
    running.owned[id(provider)] = [provider.close, session.close]
    return provider


async def _retire(drain: Drain, closers: list[Closer], limit_s: float) -> None:
    """Close what a reload replaced once no request is in flight (or ``limit_s`` has passed)."""
    try:
        if drain.in_flight:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(drain.idle.wait(), limit_s)
    finally:
        for close in closers:
            await close()


async def listen(site: web.TCPSite, key: str, host: str, port: int) -> None:
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


# -- serving -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSetup:
    """What a worker needs to know about its place: index, admin socket, supervisor."""

    index: int
    admin_socket: Path
    supervisor_pid: int


def summary(config: Config, credentials: Credentials | Keyring, proxy_url: str) -> dict[str, Any]:
    """Return the fields of the start-up line: what runs, against what, with which certificate.

    The client and certificate fields are the default (first) client's; ``clients`` names all.
    """
    credentials = keyring_for(config, credentials)[config.client.name]
    return {
        "version": __version__,
        "proxy": proxy_url,
        "environment": config.environment,
        "channel": config.channel,
        "token_url": config.oauth.token_url or config.oauth.discovery_url,
        "upstream_url": config.upstream.url,
        "routes": " ".join(r.prefix for r in config.routes),
        # One plain string: log fields are plain values (proxy.logs).
        "egress": "; ".join(f"{k} -> {v}" for k, v in describe_destinations(config).items()),
        "client_id": config.client.id,
        "clients": " ".join(f"{c.name}={c.id}" for c in config.clients),
        "certificate_subject": credentials.subject,
        "certificate_not_after": credentials.not_after.isoformat(),
        "certificate_days_left": credentials.days_left(),
    }


def warn_ignored_proxy_variables(config: Config) -> None:
    """Say so when proxy variables are set but not used: a classic cause of confusion."""
    ignored = ignored_variables(os.environ)
    if ignored and config.egress.mode != "environment":
        run_log.warning(
            "proxy environment variables are set and ignored (set egress.from_environment = "
            "true to use HTTPS_PROXY / NO_PROXY)",
            extra={"variables": " ".join(ignored)},
        )


async def serve(
    config: Config, credentials: Credentials | Keyring, *, worker: WorkerSetup | None = None
) -> int:
    """Run the proxy until SIGTERM or SIGINT, then drain and stop; SIGHUP reloads credentials.

    Returns the exit code (0). As a worker of ``listen.workers`` > 1, also stop once the
    supervisor is gone.
    """
    drain_s = config.listen.drain_timeout_s
    running = await start(
        config,
        credentials,
        drain_s=drain_s,
        admin_socket=worker.admin_socket if worker is not None else None,
    )
    # What start-up built (modules, keys, configuration) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise pause the loop for over 10 ms each.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    watching: asyncio.Task[None] | None = None
    # With listen.workers, every line of a worker's own says which worker it is.
    who: dict[str, object] = {} if worker is None else {"worker": worker.index}
    if worker is None or worker.index == 0:
        warn_ignored_proxy_variables(config)  # once, not once per worker
    if worker is None:
        fields = summary(config, credentials, running.proxy_url)
        run_log.info("ksz-proxy started", extra={**fields, "admin": running.admin_url})
    else:
        run_log.info("worker started", extra={**who, "pid": os.getpid()})
        watching = asyncio.create_task(watch_supervisor(worker, stop))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_config, running)
    try:
        await stop.wait()
        run_log.info(
            "stopping: draining in-flight requests", extra={"drain_s": running.drain_s, **who}
        )
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watching is not None:
            watching.cancel()
        await running.close()
    run_log.info("ksz-proxy stopped" if worker is None else "worker stopped", extra=who)
    return 0


async def watch_supervisor(setup: WorkerSetup, stop: asyncio.Event) -> None:
    """Set ``stop`` once the supervisor is gone (this worker was re-parented)."""
    while not stop.is_set():
        if os.getppid() != setup.supervisor_pid:
            run_log.error("supervisor gone; stopping", extra={"worker": setup.index})
            stop.set()
            return
        await asyncio.sleep(1.0)
