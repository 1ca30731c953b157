"""The admin listener end to end: /livez, /readyz, /health, /metrics, after real traffic.

Every metric is read back through a real Prometheus text parser after requests that went through
the proxy to the fakes, including token failures and 401 recoveries; the label-bound test sends
10,000 random requests and checks that the number of series stays put.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import pytest

from proxy import __version__
from proxy.health import CERTIFICATE_WARN_DAYS, assess
from proxy.sandbox.authserver import Fault
from proxy.tokens import TokenStatus
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO, OTHER
from tests.support.fakes import AuthServerHandle
from tests.support.metrics import admin_get, samples, scrape, series_count, value
from tests.support.wait import until

DEMO_SCOPES: Final = frozenset({"scope:demo:consult"})
OTHER_SCOPES: Final = frozenset({"scope:cbss:api:demo:consult"})
ADMIN_PATHS: Final = ("/metrics", "/health", "/livez", "/readyz")


# -- helpers -------------------------------------------------------------------------------------


def latest_token(chain: Chain, scopes: frozenset[str] = DEMO_SCOPES) -> str:
    """Return the token the server issued last for ``scopes``."""
    return [t.value for t in chain.auth.server.issued.values() if t.scopes == scopes][-1]


async def health_of(chain: Chain) -> tuple[int, dict[str, Any]]:
    status, _headers, body = await admin_get(chain, "/health")
    return status, dict(json.loads(body))


# -- /livez and /readyz --------------------------------------------------------------------------


async def test_livez_is_up_before_any_token_and_calls_nothing_remote(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    authserver.server.inject(Fault(kind="delay", delay_s=1.0), times=2)
    chain = await make_chain(ready=False)
    await asyncio.sleep(0.1)  # the two start-up token requests are parked in the delay
    before = authserver.server.token_requests
    for _ in range(20):
        status, _headers, body = await admin_get(chain, "/livez")
        assert status == 200
        assert json.loads(body) == {"status": "UP"}
    assert authserver.server.token_requests == before == 2
    assert chain.upstream.count == 0


async def test_readiness_waits_for_the_first_token(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    authserver.server.inject(Fault(kind="delay", delay_s=0.5), times=2)
    chain = await make_chain(ready=False)
    status, headers, body = await admin_get(chain, "/readyz")
    assert status == 503
    assert headers["Content-Type"].startswith("application/problem+json")
    assert int(headers["Retry-After"]) >= 1
    problem = json.loads(body)
    assert problem["reason"] == "no_token"
    assert problem["status"] == 503
    status, health = await health_of(chain)
    assert status == 503
    assert health["status"] == "DOWN"
    assert {t["usable"] for t in health["details"]["tokens"].values()} == {False}
    await chain.wait_ready()
    status, _headers, body = await admin_get(chain, "/readyz")
    assert status == 200
    assert json.loads(body) == {"status": "UP"}


async def test_rejected_client_is_never_ready_and_health_is_down(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    authserver.server.clients.clear()
    chain = await make_chain(ready=False)

    async def refused() -> bool:
        _status, health = await health_of(chain)
        return all(t["lastRefresh"] == "rejected" for t in health["details"]["tokens"].values())

    await until(refused)
    status, _headers, body = await admin_get(chain, "/readyz")
    assert status == 503
    assert json.loads(body)["reason"] == "no_token"
    status, health = await health_of(chain)
    assert status == 503
    assert health["status"] == "DOWN"
    for details in health["details"]["tokens"].values():
        assert details["usable"] is False
        assert details["lastError"] == "rejected"
        assert details["consecutiveFailures"] >= 1
        assert details["expiresAt"] is None


async def test_readyz_turns_503_while_draining(chain: Chain) -> None:
    stalled = asyncio.create_task(_get_status(chain, DEMO + "/stall?seconds=1"))
    await until(_seen(chain, 1))
    closing = asyncio.create_task(chain.proxy.close())
    try:
        await asyncio.sleep(0.05)
        status, _headers, body = await admin_get(chain, "/readyz")
        assert status == 503
        assert json.loads(body)["reason"] == "draining"
        _status, health = await health_of(chain)
        assert health["details"]["draining"] is True
        async with asyncio.timeout(5):
            assert await stalled == 200
    finally:
        async with asyncio.timeout(5):
            await closing


async def _get_status(chain: Chain, path: str) -> int:
    async with chain.request("GET", path) as response:
        await response.read()
        return int(response.status)


def _seen(chain: Chain, count: int) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return chain.upstream.count >= count

    return check


# -- /health -------------------------------------------------------------------------------------


async def test_health_up_details_name_expiry_outcome_certificate_and_draining(
    chain: Chain,
) -> None:
    status, headers, body = await admin_get(chain, "/health")
    assert status == 200
    assert headers["Cache-Control"] == "no-store"
    health = json.loads(body)
    assert health["status"] == "UP"
    details = health["details"]
    assert set(details) == {"tokens", "certificate", "clients", "draining", "egress", "config"}
    assert set(details["egress"].values()) == {"direct (no egress proxy)"}
    assert details["config"]["lastReload"] is None  # no SIGHUP yet
    assert details["config"]["failingKey"] is None
    assert set(details["tokens"]) == {"scope:demo:consult", "scope:cbss:api:demo:consult"}
    now = datetime.now(UTC)
    for token in details["tokens"].values():
        assert token["usable"] is True
        assert token["lastRefresh"] == "success"
        assert token["lastError"] is None
        assert token["consecutiveFailures"] == 0
        expires = datetime.fromisoformat(token["expiresAt"])
        assert now + timedelta(minutes=55) < expires < now + timedelta(minutes=65)
        assert datetime.fromisoformat(token["lastRefreshAt"]) <= now + timedelta(seconds=1)
    not_after = chain.proxy.tokens.credentials.not_after
    assert datetime.fromisoformat(details["certificate"]["notAfter"]) == not_after.replace(
        microsecond=0
    )
    assert details["certificate"]["daysLeft"] == (not_after - now).days
    assert details["draining"] is False
    for token in chain.auth.server.issued:
        assert token not in body.decode()


async def test_health_is_degraded_while_refresh_fails_and_recovers(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    # Refresh at 10 % of a 10 s lifetime: the refresh is due 1 s after start-up.
    authserver.server.expires_in = 10
    chain = await make_chain(oauth={"refresh_ratio": 0.1})
    authserver.server.inject(Fault(kind="status", status=503), times=500)

    async def degraded() -> bool:
        return bool((await health_of(chain))[1]["status"] == "DEGRADED")

    await until(degraded)
    status, health = await health_of(chain)
    assert status == 200
    failing = [t for t in health["details"]["tokens"].values() if t["consecutiveFailures"]]
    assert failing
    for token in failing:
        assert token["usable"] is True
        assert token["lastRefresh"] == "error"
        assert token["lastError"] == "unavailable"
    ready, _headers, _body = await admin_get(chain, "/readyz")
    assert ready == 200
    authserver.server.clear_faults()

    async def up() -> bool:
        return bool((await health_of(chain))[1]["status"] == "UP")

    await until(up)


def _status(
    scopes: frozenset[str], *, usable: bool = True, failures: int = 0, outcome: str = "success"
) -> TokenStatus:
    return TokenStatus(
        scopes=scopes,
        usable=usable,
        expires_at_wall=1_900_000_000.0 if usable else None,
        last_outcome=outcome,
        last_reason=None if outcome == "success" else "unavailable",
        last_attempt_wall=1_800_000_000.0,
        consecutive_failures=failures,
    )


@pytest.mark.parametrize(
    ("tokens", "days", "verdict", "http_status"),
    [
        ([_status(DEMO_SCOPES), _status(OTHER_SCOPES)], 365, "UP", 200),
        ([_status(DEMO_SCOPES), _status(OTHER_SCOPES, failures=2, outcome="error")], 365,
         "DEGRADED", 200),
        ([_status(DEMO_SCOPES), _status(OTHER_SCOPES)], CERTIFICATE_WARN_DAYS - 1, "DEGRADED",
         200),
        ([_status(DEMO_SCOPES), _status(OTHER_SCOPES)], CERTIFICATE_WARN_DAYS + 1, "UP", 200),
        ([_status(DEMO_SCOPES, usable=False, failures=1, outcome="rejected")], 365, "DOWN", 503),
        ([_status(DEMO_SCOPES)], 365, "DOWN", 503),  # OTHER_SCOPES has no entry at all
        ([_status(DEMO_SCOPES), _status(OTHER_SCOPES)], 5, "DEGRADED", 200),
    ],
)  # fmt: skip
def test_assess_verdicts(
    tokens: list[TokenStatus], days: int, verdict: str, http_status: int
) -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    health = assess(
        scope_sets=(DEMO_SCOPES, OTHER_SCOPES),
        tokens=tokens,
        certificate_not_after=now + timedelta(days=days, hours=1),
        draining=False,
        now=now,
    )
    assert (health.status, health.http_status) == (verdict, http_status)
    assert health.details["certificate"]["daysLeft"] == days
    assert set(health.details["tokens"]) == {"scope:demo:consult", "scope:cbss:api:demo:consult"}
    json.dumps(health.details)  # renders as JSON as it is


def test_assess_names_the_default_scope_set() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    health = assess(
        scope_sets=(frozenset(),),
        tokens=[_status(frozenset())],
        certificate_not_after=now + timedelta(days=100),
        draining=True,
        now=now,
    )
    assert set(health.details["tokens"]) == {"default"}
    assert health.details["draining"] is True
    assert health.details["tokens"]["default"]["expiresAt"] == "2030-03-17T17:46:40+00:00"


# -- the proxy listener never serves admin paths -----------------------------------------------


@pytest.mark.parametrize("path", [*ADMIN_PATHS, "/metrics?x=1", "/health/"])
async def test_admin_paths_are_not_reachable_through_the_proxy(chain: Chain, path: str) -> None:
    for method in ("GET", "HEAD"):
        async with chain.request(method, path) as response:
            body = await response.read()
            assert response.status == 404, (method, path)
            assert response.content_type == "application/problem+json"
            if method == "GET":
                assert json.loads(body)["reason"] == "no_route"
    assert chain.upstream.count == 0


# -- /metrics ------------------------------------------------------------------------------------


async def test_every_metric_with_its_labels_after_real_traffic(
    chain: Chain, authserver: AuthServerHandle
) -> None:
    server = authserver.server
    async with chain.request("GET", DEMO + "/a") as response:
        assert response.status == 200
    async with chain.request("GET", OTHER + "/b?q=1") as response:
        assert response.status == 200
    async with chain.request("GET", "/nowhere") as response:
        assert response.status == 404
    async with chain.request("GET", DEMO + "/reset") as response:
        assert response.status == 502
    # An upstream 401 recovered by one fresh token and one resend.
    chain.upstream.reject_token(latest_token(chain))
    async with chain.request("POST", DEMO + "/p", data=b"payload") as response:
        assert response.status == 200
    # The token endpoint fails (503), then refuses the client (invalid_client), then recovers.
    server.inject(Fault(kind="status", status=503))
    server.inject(Fault(kind="response", status=401, body={"error": "invalid_client"}), times=1)
    chain.upstream.reject_token(latest_token(chain))
    async with chain.request("GET", DEMO + "/c") as response:
        assert response.status == 503
    await chain.wait_ready()
    stalled = asyncio.create_task(_get_status(chain, DEMO + "/stall?seconds=0.5"))
    await until(_seen(chain, chain.upstream.count + 1))
    during = samples(await scrape(chain))
    assert await stalled == 200
    after = samples(await scrape(chain))

    assert value(during, "kszproxy_in_flight_requests") == 1
    assert value(after, "kszproxy_in_flight_requests") == 0
    assert value(after, "kszproxy_requests_total", route=DEMO, method="GET", status="200") == 2
    assert value(after, "kszproxy_requests_total", route=OTHER, method="GET", status="200") == 1
    assert value(after, "kszproxy_requests_total", route=DEMO, method="POST", status="200") == 1
    assert value(after, "kszproxy_requests_total", route=DEMO, method="GET", status="502") == 1
    assert value(after, "kszproxy_requests_total", route=DEMO, method="GET", status="503") == 1
    assert (
        value(after, "kszproxy_requests_total", route="unrouted", method="GET", status="404") == 1
    )
    for route, count in ((DEMO, 5), (OTHER, 1), ("unrouted", 1)):
        assert value(after, "kszproxy_request_duration_seconds_count", route=route) == count
        assert (
            value(after, "kszproxy_request_duration_seconds_bucket", route=route, le="+Inf")
            == count
        )
        assert value(after, "kszproxy_request_duration_seconds_sum", route=route) > 0
    assert value(after, "kszproxy_upstream_errors_total", route=DEMO, reason="reset") == 1
    assert value(after, "kszproxy_upstream_retries_total", route=DEMO) == 1

    outcomes = {
        o: value(after, "kszproxy_token_requests_total", client="default", outcome=o)
        for o in ("success", "rejected", "error")
    }
    assert outcomes["error"] == 1
    assert outcomes["rejected"] == 1
    assert outcomes["success"] == server.token_requests - 2
    fetches = value(after, "kszproxy_token_fetch_duration_seconds_count", client="default")
    assert fetches == server.token_requests
    assert value(after, "kszproxy_token_fetch_duration_seconds_sum", client="default") > 0

    issued = {
        "scope:demo:consult": server_expiry(chain, DEMO_SCOPES),
        "scope:cbss:api:demo:consult": server_expiry(chain, OTHER_SCOPES),
    }
    expiry_series = [k for k in after if k[0] == "kszproxy_token_expiry_timestamp_seconds"]
    assert len(expiry_series) == 2
    for scope, expected in issued.items():
        got = value(
            after, "kszproxy_token_expiry_timestamp_seconds", client="default", scopes=scope
        )
        assert abs(got - expected) < 5
    not_after = chain.proxy.tokens.credentials.not_after
    certificate_expiry = value(
        after, "kszproxy_certificate_expiry_timestamp_seconds", client="default"
    )
    assert certificate_expiry == not_after.timestamp()
    assert abs(value(after, "kszproxy_clock_skew_seconds")) < 5
    assert value(after, "kszproxy_build_info", version=__version__) == 1
    # A registry of its own: no process or Python collectors, nothing but ours.
    assert {name for name, _labels in after} == {
        name for name, _labels in after if name.startswith("kszproxy_")
    }


def server_expiry(chain: Chain, scopes: frozenset[str]) -> float:
    """Return when the latest token the server issued for ``scopes`` expires."""
    return [t.expires_at for t in chain.auth.server.issued.values() if t.scopes == scopes][-1]


async def test_token_expiry_series_exist_before_any_token(
    make_chain: ChainFactory, authserver: AuthServerHandle
) -> None:
    authserver.server.clients.clear()
    chain = await make_chain(ready=False)
    parsed = samples(await scrape(chain))
    for scope in ("scope:demo:consult", "scope:cbss:api:demo:consult"):
        assert (
            value(parsed, "kszproxy_token_expiry_timestamp_seconds", client="default", scopes=scope)
            == 0
        )


# -- bounded label sets ------------------------------------------------------------------------

ALLOWED_METHODS: Final = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
# Methods aiohttp's parser knows but the proxy refuses (405, method label OTHER).
REFUSED_METHODS: Final = (
    "TRACE", "PROPFIND", "PROPPATCH", "MKCOL", "PURGE", "LINK", "UNLINK", "COPY", "MOVE", "LOCK",
    "UNLOCK", "SEARCH", "REPORT", "MERGE", "NOTIFY", "ACL", "BIND", "QUERY", "SOURCE",
    "MKCALENDAR", "SUBSCRIBE", "CHECKOUT",
)  # fmt: skip
KINDS: Final = ("demo", "other", "unrouted", "traversal")


@dataclass(frozen=True, slots=True)
class Probe:
    method: str
    target: str
    expected: int
    words: tuple[str, ...]  # the random text in the target, which must never become a label

    @property
    def handled(self) -> bool:
        """Return True: every request is counted, parser refusals as unrouted/OTHER/400."""
        return True


def make_probe(rng: random.Random, kind: str, method: str) -> Probe:
    """Return a random request of ``kind`` whose answer status is known in advance."""

    def word(prefix: str) -> str:
        return prefix + "".join(rng.choices("0123456789abcdef", k=11))

    segments = [word("s") for _ in range(rng.randint(1, 3))]
    params = [word("q") for _ in range(rng.randint(0, 3))]
    pairs = [f"{p}={rng.choice(['1', '%20x', 'a+b', ''])}" for p in params]
    query = "?" + "&".join(pairs) if pairs else ""
    path = "/".join(segments)
    if kind == "demo":
        target, expected = f"{DEMO}/{path}{query}", 200
    elif kind == "other":
        target, expected = f"{OTHER}/{path}{query}", 200
    elif kind == "unrouted":
        target, expected = f"/{rng.choice(['', 'REST/'])}{path}{query}", 404
    else:
        target, expected = f"{DEMO}/{segments[0]}/../{path}{query}", 400
    if method in REFUSED_METHODS:
        expected = 405
    elif method not in ALLOWED_METHODS:
        expected = 400  # aiohttp's parser refuses a method it does not know
    return Probe(method=method, target=target, expected=expected, words=(*segments, *params))


def random_method(rng: random.Random) -> str:
    """Return a usual method mostly, sometimes a refused one, rarely an unknown token."""
    roll = rng.random()
    if roll < 0.8:
        return rng.choice(ALLOWED_METHODS)
    if roll < 0.97:
        return rng.choice(REFUSED_METHODS)
    return "X" + "".join(rng.choices("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", k=rng.randint(2, 8)))


async def send(chain: Chain, probe: Probe) -> None:
    data = b"x" if probe.method in ("POST", "PUT", "PATCH") else None
    async with chain.request(probe.method, probe.target, data=data) as response:
        await response.read()
        assert response.status == probe.expected, probe


@pytest.mark.slow
async def test_random_traffic_leaves_the_number_of_series_unchanged(chain: Chain) -> None:
    rng = random.Random(39)
    # Warm-up: one request per (kind, method class) combination the random traffic uses.
    warmup = [
        make_probe(rng, kind, method)
        for kind in KINDS
        for method in (*ALLOWED_METHODS, "TRACE", "XUNKNOWN")
    ]
    for probe in warmup:
        await send(chain, probe)
    before = await scrape(chain)

    probes = [make_probe(rng, rng.choice(KINDS), random_method(rng)) for _ in range(10_000)]
    for start in range(0, len(probes), 100):
        await asyncio.gather(*(send(chain, p) for p in probes[start : start + 100]))
    after = await scrape(chain)

    assert series_count(after) == series_count(before)
    assert set(samples(after)) == set(samples(before))
    counted = [v for (name, _), v in samples(after).items() if name == "kszproxy_requests_total"]
    requests = sum(counted)
    assert requests == sum(p.handled for p in (*warmup, *probes))
    refused = {"route": "unrouted", "method": "OTHER", "status": "405"}
    assert value(samples(after), "kszproxy_requests_total", **refused) > 0
    for probe in probes:
        for word in probe.words:
            assert word not in after
        if probe.method not in ALLOWED_METHODS:
            assert probe.method not in after
