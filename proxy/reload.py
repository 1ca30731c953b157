"""Own what a SIGHUP reload may change: the keys that differ, and those that need a restart.

A reload reads the whole file again. Everything a new request uses (routes, scopes, upstream,
timeouts, limits, the shared secret, the log level, the clients and their credentials) takes
effect for the next request; the sockets and processes cannot change under a running proxy, so
the keys naming them keep their running value and are reported as needing a restart. Pure
functions::

    plan = plan_reload(running_config, new_config)
    plan.changed        # ("routes", "upstream.read_timeout_s", "listen.port", "clients[0].id")
    plan.needs_restart  # ("listen.port",)
    plan.config         # new_config with listen.port as it runs now

Clients are compared by name (``client.id``, ``clients[0].pkcs12``; a client added or removed is
its table, ``clients[1]``). Which clients need a new token provider is ``needs_new_provider``'s
answer; the others keep theirs (and their cached tokens) and only take new credentials.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from proxy.config import ClientConfig, Config

# Bound once at start: the listening sockets, the worker processes, the HTTP server's settings.
RESTART_ONLY: Final = frozenset(
    {
        "listen.host",
        "listen.port",
        "listen.workers",
        "listen.keepalive_timeout_s",
        "admin.host",
        "admin.port",
    }
)
# Not configuration: where the file was read from, where a client's table is in it.
_IGNORED: Final = frozenset({"source", "where"})
# What a client's assertions are signed as: a change needs a new provider (tokens of another
# identity). Key material (pkcs12, private_key, certificate, password) is reloaded in place.
SIGNING_KEYS: Final = ("id", "algorithm", "key_id", "audience", "assertion_lifetime_s")
# Every provider's token endpoint and how it is reached; oauth.scopes only chooses route scopes.
_TOKEN_SECTIONS: Final = ("oauth.", "egress.")


@dataclass(frozen=True, slots=True, kw_only=True)
class ReloadPlan:
    """What a reload changes: the keys that differ, those kept until a restart, the result."""

    changed: tuple[str, ...]
    needs_restart: tuple[str, ...]
    config: Config


def plan_reload(running: Config, new: Config) -> ReloadPlan:
    """Return the configuration to switch to: ``new``, but restart-only keys as they run now."""
    changed = tuple(changed_keys(running, new))
    restart = tuple(key for key in changed if key in RESTART_ONLY)
    config = new
    for key in restart:
        section, _, name = key.partition(".")
        table = dataclasses.replace(
            getattr(config, section), **{name: getattr(getattr(running, section), name)}
        )
        config = dataclasses.replace(config, **{section: table})
    return ReloadPlan(changed=changed, needs_restart=restart, config=config)


def changed_keys(old: Config, new: Config) -> list[str]:
    """Return the dotted key paths whose values differ (``routes`` as a whole)."""
    return list(_diff(old, new, ""))


def token_endpoint_changed(changed: tuple[str, ...] | list[str]) -> bool:
    """Return True when ``changed`` keys change how every client gets its tokens."""
    return any(k.startswith(_TOKEN_SECTIONS) and k != "oauth.scopes" for k in changed)


def needs_new_provider(running: ClientConfig, new: ClientConfig) -> bool:
    """Return True when ``new`` signs as another identity than ``running`` (same name)."""
    return any(getattr(running, key) != getattr(new, key) for key in SIGNING_KEYS)


def _diff(old: Any, new: Any, where: str) -> list[str]:
    if where == "clients":
        return _diff_clients(old, new)
    if not (dataclasses.is_dataclass(old) and dataclasses.is_dataclass(new)):
        return [] if old == new else [where]
    if type(old) is not type(new):
        return [where]
    keys: list[str] = []
    for item in dataclasses.fields(old):
        if item.name in _IGNORED:
            continue
        path = f"{where}.{item.name}" if where else item.name
        keys += _diff(getattr(old, item.name), getattr(new, item.name), path)
    return keys


def _diff_clients(old: tuple[ClientConfig, ...], new: tuple[ClientConfig, ...]) -> list[str]:
    """Compare clients by name: the keys of each, or the table of one added or removed."""
    before = {client.name: client for client in old}
    after = {client.name: client for client in new}
    keys = [client.where for client in old if client.name not in after]
    for client in new:
        if client.name in before:
            keys += _diff(before[client.name], client, client.where)
        else:
            keys.append(client.where)
    return keys


@dataclass(slots=True)
class ReloadStatus:
    """The outcome of the last reload, for ``/health`` (which stays UP: the old config serves)."""

    loaded_at: float = field(default_factory=time.time)
    last_outcome: str | None = None
    last_at: float | None = None
    last_error: str | None = None

    def succeeded(self) -> None:
        """Record a reload that took effect."""
        self.loaded_at = self.last_at = time.time()
        self.last_outcome = "success"
        self.last_error = None

    def failed(self, detail: str) -> None:
        """Record a refused reload; ``detail`` starts with the key path and holds no secret."""
        self.last_at = time.time()
        self.last_outcome = "failure"
        self.last_error = detail

    def details(self) -> dict[str, Any]:
        """Return the ``config`` detail of ``/health``."""
        key = self.last_error.partition(":")[0] if self.last_error else None
        return {
            "loadedAt": _iso(self.loaded_at),
            "lastReload": self.last_outcome,
            "lastReloadAt": _iso(self.last_at) if self.last_at is not None else None,
            "lastReloadError": self.last_error,
            "failingKey": key,
        }


def _iso(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat(timespec="seconds")
