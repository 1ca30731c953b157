"""Own what a SIGHUP reload may change: the keys that differ, and those that need a restart.

A reload reads the whole file again. Everything a new request uses (routes, scopes, upstream,
timeouts, limits, the shared secret, the log level, the credentials) takes effect for the next
request; the sockets and processes cannot change under a running proxy, so the keys naming them
keep their running value and are reported as needing a restart. Pure functions::

    plan = plan_reload(running_config, new_config)
    plan.changed        # ("routes", "upstream.read_timeout_s", "listen.port")
    plan.needs_restart  # ("listen.port",)
    plan.config         # new_config with listen.port as it runs now
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from proxy.config import Config

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
# Not configuration: where the file was read from.
_IGNORED: Final = frozenset({"source"})


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


def _diff(old: Any, new: Any, where: str) -> list[str]:
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
