"""The health verdict over several clients: every client counted, each certificate on its own."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Final

from proxy.health import CERTIFICATE_WARN_DAYS, ClientState, assess_clients
from proxy.tokens import TokenStatus

NOW: Final = datetime(2030, 1, 1, tzinfo=UTC)
CONSULT: Final = frozenset({"scope:demo:consult"})
DAAS: Final = frozenset({"scope:daas:consult"})


def status(scopes: frozenset[str], *, usable: bool = True, failures: int = 0) -> TokenStatus:
    return TokenStatus(
        scopes=scopes,
        usable=usable,
        expires_at_wall=1_900_000_000.0 if usable else None,
        last_outcome="success" if not failures else "rejected",
        last_reason=None if not failures else "rejected",
        last_attempt_wall=1_800_000_000.0,
        consecutive_failures=failures,
    )


def client(
    name: str,
    scopes: frozenset[str],
    *,
    usable: bool = True,
    failures: int = 0,
    days: int = 365,
    reload_error: str | None = None,
) -> ClientState:
    return ClientState(
        name=name,
        client_id=f"other:{name}:client:confidential",
        scope_sets=(scopes,),
        tokens=(status(scopes, usable=usable, failures=failures),),
        certificate_not_after=NOW + timedelta(days=days, hours=1),
        reload_error=reload_error,
    )


def test_every_client_is_in_the_details() -> None:
    health = assess_clients(
        [client("default", CONSULT), client("daas", DAAS)], draining=False, now=NOW
    )
    assert (health.status, health.http_status) == ("UP", 200)
    clients = health.details["clients"]
    assert list(clients) == ["default", "daas"]
    assert clients["daas"]["clientId"] == "other:daas:client:confidential"
    assert list(clients["daas"]["tokens"]) == ["scope:daas:consult"]
    assert clients["daas"]["certificate"]["daysLeft"] == 365
    assert clients["daas"]["reloadError"] is None
    # The keys from before several clients: the first client's.
    assert health.details["tokens"] == clients["default"]["tokens"]
    assert health.details["certificate"] == clients["default"]["certificate"]
    json.dumps(health.details)


def test_one_clients_missing_token_is_down_and_says_which() -> None:
    health = assess_clients(
        [client("default", CONSULT), client("daas", DAAS, usable=False, failures=3)],
        draining=False,
        now=NOW,
    )
    assert (health.status, health.http_status) == ("DOWN", 503)
    daas = health.details["clients"]["daas"]["tokens"]["scope:daas:consult"]
    assert (daas["usable"], daas["consecutiveFailures"]) == (False, 3)
    assert health.details["clients"]["default"]["tokens"]["scope:demo:consult"]["usable"]


def test_each_certificate_counts_on_its_own() -> None:
    soon = CERTIFICATE_WARN_DAYS - 1
    health = assess_clients(
        [client("default", CONSULT), client("daas", DAAS, days=soon)], draining=False, now=NOW
    )
    assert health.status == "DEGRADED"
    assert health.details["clients"]["daas"]["certificate"]["daysLeft"] == soon
    assert health.details["certificate"]["daysLeft"] == 365  # the default client's is fine


def test_a_failed_reload_of_one_client_is_shown_and_changes_no_status() -> None:
    error = "clients[0].pkcs12: wrong password for /etc/ksz-proxy/daas.p12"
    health = assess_clients(
        [client("default", CONSULT), client("daas", DAAS, reload_error=error)],
        draining=False,
        now=NOW,
    )
    # The old credentials keep serving (SECURITY.md 51): shown, not a state of its own.
    assert health.status == "UP"
    assert health.details["clients"]["daas"]["reloadError"] == error
