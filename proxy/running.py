"""Own a running proxy: ``RunningProxy`` (both listeners; ``close`` drains then stops them) and
the whole-configuration reload that switches it to a new file (``reload_config``, SIGHUP).

What a reload may change is decided in ``proxy.reload`` (pure); here it is carried out: new
requests use the new configuration, in-flight ones finish on the old, and what was replaced is
closed once they are done. ``proxy.server`` starts a ``RunningProxy`` and re-exports these names.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from aiohttp import web

from proxy import forward, logs, oauth
from proxy.admin import (
    CLIENT_TOKENS,
    LIVE,
    METRICS,
    RELOAD_ERRORS,
)
from proxy.clients import Reload, reload_keyring
from proxy.config import ClientConfig, Config, load_config
from proxy.credentials import Credentials
from proxy.drain import Drain
from proxy.errors import ConfigError, ProxyError
from proxy.forward import Forwarder
from proxy.handler import ProxyHandler
from proxy.reload import needs_new_provider, plan_reload, token_endpoint_changed
from proxy.tokens import TokenProvider

# The logger name stays that of the former proxy.app (docs/operations.md, "Logs").
log = logging.getLogger("ksz_proxy.app")

# After the drain, what still runs gets this long to react to cancellation.
CANCEL_GRACE_S: Final = 1.0


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
    try:
        _reload(running, dataclasses.replace(config, clients=keys.clients), keys)
    except ConfigError as exc:  # raised before anything was switched
        _failed(running, exc.detail)
        log.error(
            "configuration reload failed; keeping the running configuration",
            extra={"error": exc.detail, "key": exc.detail.partition(":")[0]},
        )
        return False
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
    providers = app[CLIENT_TOKENS]
    endpoint_changed = token_endpoint_changed(changed)
    running_clients = old.clients_by_name
    # First build everything that can fail (sessions, TLS contexts), then switch: a failure
    # here leaves the running configuration as it was, nothing half-applied.
    fresh: dict[str, TokenProvider] = {}
    session = running.handler.forwarder.session
    new_session = None
    key = "oauth.ca_file"
    try:
        for client in config.clients:
            provider = providers.get(client.name)
            if (
                provider is None
                or endpoint_changed
                or needs_new_provider(running_clients[client.name], client)
            ):
                # Another identity or token endpoint: the old tokens are no use any more.
                fresh[client.name] = _new_provider(
                    running, config, client, keys.keyring[client.name]
                )
        # The mutual-TLS certificate is part of the session: renew it with the credentials.
        key = "upstream.ca_file"
        if config.upstream.client_certificate or any(k.startswith(_UPSTREAM_KEYS) for k in changed):
            new_session = forward.make_session(config, keys.keyring[config.client.name])
    except (ssl.SSLError, OSError, ValueError) as exc:
        for provider in fresh.values():
            for close in running.owned.pop(id(provider), []):
                _close_later(running, close)
        raise ConfigError(
            f"{key}: TLS material could not be loaded ({type(exc).__name__})"
        ) from None
    metrics.use_clients(config.clients_by_name, config.token_keys)
    retired: list[Closer] = []
    for client in config.clients:
        provider = providers.get(client.name)
        if client.name in fresh:
            if provider is not None:
                retired += running.owned.pop(id(provider), [provider.close])
            providers[client.name] = fresh[client.name]
        elif provider is not None:
            # The same identity: its cached tokens keep serving while ones signed anew arrive.
            provider.use(config, client)
            if client.name in keys.changed:
                provider.replace_credentials(keys.keyring[client.name])
    for name in [name for name in providers if name not in config.clients_by_name]:
        gone = providers.pop(name)
        retired += running.owned.pop(id(gone), [gone.close])
    for provider in providers.values():
        provider.start()
    if new_session is not None:
        retired += running.owned.pop(id(session), [session.close])
        session = new_session
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


def _close_later(running: RunningProxy, close: Closer) -> None:
    """Close a resource a refused reload built, off the signal handler."""
    task = asyncio.create_task(_retire(running.drain, [close], 0.0))
    running.retiring.add(task)
    task.add_done_callback(running.retiring.discard)


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
