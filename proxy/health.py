"""Own the health verdict of the admin listener (Belgif ``/health`` shape), as a pure function.

- ``UP`` (200): every configured scope set holds a usable token and its last refresh worked;
- ``DEGRADED`` (200): tokens are still usable but a refresh failed, or the signing certificate
  expires within ``CERTIFICATE_WARN_DAYS``;
- ``DOWN`` (503): some configured scope set has no usable token.

Details never carry a token: only expiry times, outcomes, reason codes and certificate dates.
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


def assess(
    *,
    scope_sets: Iterable[frozenset[str]],
    tokens: Iterable[TokenStatus],
    certificate_not_after: datetime,
    draining: bool,
    now: datetime | None = None,
) -> Health:
    """Return the health verdict from the token states and the certificate."""
    now = now or datetime.now(UTC)
    by_scopes = {t.scopes: t for t in tokens}
    token_details: dict[str, Any] = {}
    down = degraded = False
    for scopes in scope_sets:
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
    days_left = (certificate_not_after - now).days
    degraded |= days_left < CERTIFICATE_WARN_DAYS
    details: dict[str, Any] = {
        "tokens": token_details,
        "certificate": {
            "notAfter": certificate_not_after.isoformat(timespec="seconds"),
            "daysLeft": days_left,
        },
        "draining": draining,
    }
    if down:
        return Health(status="DOWN", http_status=503, details=details)
    if degraded:
        return Health(status="DEGRADED", http_status=200, details=details)
    return Health(status="UP", http_status=200, details=details)
