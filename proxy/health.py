"""Own the health verdict of the admin listener (Belgif ``/health`` shape), as a pure function.

- ``UP`` (200): every client's configured scope sets hold a usable token and their last refresh
  worked;
- ``DEGRADED`` (200): tokens are still usable but a refresh failed, or a signing certificate
  expires within ``CERTIFICATE_WARN_DAYS`` (each client's certificate counts on its own);
- ``DOWN`` (503): some client's configured scope set has no usable token.

``details.clients`` has one entry per client (tokens, certificate, and the error of its last
credential reload, which changed nothing that serves and so leaves the status as it is);
``details.tokens`` and ``details.certificate`` repeat the first client's, as before several
clients existed. Details never carry a token: only expiry times, outcomes, reason codes and
certificate dates.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from proxy.scopes import scope_label
from proxy.tokens import TokenStatus

CERTIFICATE_WARN_DAYS: Final = 30


@dataclass(frozen=True, slots=True, kw_only=True)
class Health:
    """The verdict and its details, ready to be rendered as JSON."""

    status: str
    http_status: int
    details: dict[str, Any]


def _iso(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientState:
    """What health may know about one client: its token states, certificate, last reload."""

    name: str
    client_id: str
    scope_sets: tuple[frozenset[str], ...]
    tokens: tuple[TokenStatus, ...]
    certificate_not_after: datetime
    reload_error: str | None = None  # why its last credential reload failed (no secret)


def assess(
    *,
    scope_sets: Iterable[frozenset[str]],
    tokens: Iterable[TokenStatus],
    certificate_not_after: datetime,
    draining: bool,
    now: datetime | None = None,
) -> Health:
    """Return the health verdict of a single client from its token states and certificate."""
    client = ClientState(
        name="default",
        client_id="",
        scope_sets=tuple(scope_sets),
        tokens=tuple(tokens),
        certificate_not_after=certificate_not_after,
    )
    return assess_clients([client], draining=draining, now=now)


def assess_clients(
    clients: Iterable[ClientState], *, draining: bool, now: datetime | None = None
) -> Health:
    """Return the health verdict over every client (the first one also fills the old keys)."""
    now = now or datetime.now(UTC)
    per_client: dict[str, Any] = {}
    down = degraded = False
    for client in clients:
        tokens, certificate, client_down, client_degraded = _client_details(client, now)
        down |= client_down
        degraded |= client_degraded
        per_client[client.name] = {
            "clientId": client.client_id,
            "tokens": tokens,
            "certificate": certificate,
            "reloadError": client.reload_error,
        }
    first = next(iter(per_client.values()))
    details: dict[str, Any] = {
        "tokens": first["tokens"],
        "certificate": first["certificate"],
        "clients": per_client,
        "draining": draining,
    }
    if down:
        return Health(status="DOWN", http_status=503, details=details)
    if degraded:
        return Health(status="DEGRADED", http_status=200, details=details)
    return Health(status="UP", http_status=200, details=details)


def _client_details(
    client: ClientState, now: datetime
) -> tuple[dict[str, Any], dict[str, Any], bool, bool]:
    """Return one client's token and certificate details, and whether it is down or degraded."""
    by_scopes = {t.scopes: t for t in client.tokens}
    token_details: dict[str, Any] = {}
    down = degraded = False
    for scopes in client.scope_sets:
        state = by_scopes.get(scopes)
        usable = state is not None and state.usable
        failing = state is not None and state.consecutive_failures > 0
        down |= not usable
        degraded |= failing
        token_details[scope_label(scopes)] = {
            "usable": usable,
            "expiresAt": _iso(state.expires_at_wall) if state else None,
            "lastRefresh": state.last_outcome if state else None,
            "lastRefreshAt": _iso(state.last_attempt_wall) if state else None,
            "lastError": state.last_reason if state else None,
            "consecutiveFailures": state.consecutive_failures if state else 0,
        }
    days_left = (client.certificate_not_after - now).days
    degraded |= days_left < CERTIFICATE_WARN_DAYS
    certificate = {
        "notAfter": client.certificate_not_after.isoformat(timespec="seconds"),
        "daysLeft": days_left,
    }
    return token_details, certificate, down, degraded
