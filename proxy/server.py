"""Own the run lifecycle: resources, start, reload, drain, stop, and the serving loop.

The admin application's ``cleanup_ctx`` generators own the long-lived resources (token session
and provider, upstream session and forwarder) under the typed ``AppKey``s of ``admin.py``:
created in order at start-up, closed in reverse order, and only if their start-up finished.
``start`` builds both listeners on top of them; ``RunningProxy.close`` stops them in order
(stop accepting, let in-flight requests finish within ``listen.drain_timeout_s``, then cancel);
``serve`` is what ``ksz-proxy run`` (and each worker of ``listen.workers`` > 1) runs.
``RunningProxy`` and the reload (``reload_config``) live in ``proxy.running``, re-exported here.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from proxy import __version__, forward, oauth
from proxy._aiohttp import check_c_parser
from proxy.admin import (
    CLIENT_TOKENS,
    CONFIG,
    DRAIN,
    FORWARDER,
    METRICS,
    TOKENS,
    make_admin_app,
)
from proxy.clients import Keyring, keyring_for
from proxy.config import Config
from proxy.credentials import Credentials
from proxy.drain import Drain
from proxy.egress import describe_destinations, ignored_variables
from proxy.errors import ConfigError
from proxy.forward import Forwarder
from proxy.handler import ProxyHandler, make_proxy_server

# A running proxy and its reload have their own module; these names stay importable from here.
from proxy.running import CANCEL_GRACE_S as CANCEL_GRACE_S
from proxy.running import RunningProxy as RunningProxy
from proxy.running import reload_config as reload_config
from proxy.tokens import TokenProvider

# The logger names stay those of the former proxy.app and proxy.cli (docs/operations.md, "Logs").
log = logging.getLogger("ksz_proxy.app")
run_log = logging.getLogger("ksz_proxy.cli")

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
        # Removing the handler would give SIGHUP back its default action, which ends the
        # process mid-drain (a logrotate hook, a `systemctl reload` at the wrong moment).
        loop.add_signal_handler(signal.SIGHUP, _reload_ignored, who)
        if watching is not None:
            watching.cancel()
        await running.close()
    run_log.info("ksz-proxy stopped" if worker is None else "worker stopped", extra=who)
    return 0


def _reload_ignored(who: dict[str, object]) -> None:
    run_log.warning("reload ignored: the proxy is stopping", extra=who)


async def watch_supervisor(setup: WorkerSetup, stop: asyncio.Event) -> None:
    """Set ``stop`` once the supervisor is gone (this worker was re-parented)."""
    while not stop.is_set():
        if os.getppid() != setup.supervisor_pid:
            run_log.error("supervisor gone; stopping", extra={"worker": setup.index})
            stop.set()
            return
        await asyncio.sleep(1.0)
