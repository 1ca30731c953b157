"""The per-request series render exactly as prometheus-client's own objects rendered them.

``proxy/metrics.py`` counts requests, durations, upstream errors, retries and reflected tokens in
plain Python numbers and builds the metric families only at scrape time. The reference here is
the way it was done before: prometheus-client ``Counter`` and ``Histogram`` objects fed through
``.labels()``. Both get the same observations; ``/metrics`` must read the same, line by line,
except for the ``_created`` values (the time a series was created, which differs by microseconds).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Final

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import merge_metrics
from proxy.metrics import METHODS, UPSTREAM_REASONS, Metrics
from tests.support.metrics import samples, value

DEMO: Final = "/REST/demo/v1"
DAAS: Final = "/REST/daas/v1"
ROUTES: Final = (DEMO, DAAS, "/REST/other/v2")
KEYS: Final = [("default", frozenset({"scope:demo:consult"}))]
BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# The families whose series proxy/metrics.py now counts itself, in the order they are listed.
PLAIN: Final = (
    "kszproxy_requests",
    "kszproxy_request_duration_seconds",
    "kszproxy_upstream_errors",
    "kszproxy_upstream_retries",
    "kszproxy_token_reflected",
)
# Every family /metrics lists, in order, as prometheus-client's objects listed them.
TYPES: Final = [
    "kszproxy_requests_total counter",
    "kszproxy_requests_created gauge",
    "kszproxy_request_duration_seconds histogram",
    "kszproxy_request_duration_seconds_created gauge",
    "kszproxy_upstream_errors_total counter",
    "kszproxy_upstream_errors_created gauge",
    "kszproxy_in_flight_requests gauge",
    "kszproxy_token_requests_total counter",
    "kszproxy_token_requests_created gauge",
    "kszproxy_token_fetch_duration_seconds histogram",
    "kszproxy_token_fetch_duration_seconds_created gauge",
    "kszproxy_token_expiry_timestamp_seconds gauge",
    "kszproxy_upstream_retries_total counter",
    "kszproxy_upstream_retries_created gauge",
    "kszproxy_token_reflected_total counter",
    "kszproxy_token_reflected_created gauge",
    "kszproxy_certificate_expiry_timestamp_seconds gauge",
    "kszproxy_clock_skew_seconds gauge",
    "kszproxy_build_info gauge",
    "kszproxy_config_reloads_total counter",
    "kszproxy_config_reloads_created gauge",
    "kszproxy_config_last_reload_success_timestamp_seconds gauge",
]


class Reference:
    """The five families as prometheus-client objects, counted the way the proxy used to."""

    def __init__(self, routes: tuple[str, ...]) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "kszproxy_requests",
            "Requests answered on the proxy listener.",
            ["route", "method", "status"],
            registry=r,
        )
        self.duration = Histogram(
            "kszproxy_request_duration_seconds",
            "Time from request to complete answer, as the caller sees it.",
            ["route"],
            buckets=BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kszproxy_upstream_errors",
            "Upstream transport failures by reason (dns, connect, tls, reset, timeout, protocol, "
            "proxy).",
            ["route", "reason"],
            registry=r,
        )
        self.retries = Counter(
            "kszproxy_upstream_retries",
            "Requests resent once with a fresh token after an upstream 401.",
            ["route"],
            registry=r,
        )
        self.token_reflected = Counter(
            "kszproxy_token_reflected",
            "Answer headers removed because they carried the access token back to the caller.",
            ["route"],
            registry=r,
        )
        self.set_routes(routes)

    def set_routes(self, routes: tuple[str, ...]) -> None:
        for route in sorted(frozenset(routes) | {"unrouted"}):  # the order Metrics makes them in
            self.duration.labels(route=route)
            if route == "unrouted":
                continue
            self.retries.labels(route=route)
            self.token_reflected.labels(route=route)
            for reason in UPSTREAM_REASONS:
                self.upstream_errors.labels(route=route, reason=reason)

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        method = method if method in METHODS else "OTHER"
        label = str(status) if 100 <= status <= 599 else "other"
        self.requests.labels(route=route, method=method, status=label).inc()
        self.duration.labels(route=route).observe(duration_s)

    def render(self) -> str:
        return generate_latest(self.registry).decode()


@dataclass(frozen=True, slots=True)
class Request:
    route: str
    method: str
    status: int
    duration_s: float


@dataclass(frozen=True, slots=True)
class Event:
    kind: str  # "error", "retry", "reflected"
    route: str
    detail: str = ""
    count: int = 1


@dataclass(frozen=True, slots=True)
class Reload:
    routes: tuple[str, ...]


Step = Request | Event | Reload

route_labels = st.sampled_from([*ROUTES, "unrouted", "/REST/gone/v1"])
durations = st.one_of(
    st.sampled_from([0.0, *BUCKETS, -0.0, -1.0, 1e-9, 60.000001, 1e9, math.inf, -math.inf]),
    st.floats(min_value=0, max_value=120, allow_nan=False),
    st.floats(allow_nan=False),  # perf_counter differences are never NaN
)
steps: st.SearchStrategy[Step] = st.one_of(
    st.builds(
        Request,
        route_labels,
        st.sampled_from([*sorted(METHODS), "PROPFIND", "get", "BREW", ""]),
        st.one_of(
            st.sampled_from([0, 99, 100, 101, 200, 204, 304, 404, 499, 502, 599, 600, 999]),
            st.integers(min_value=-1000, max_value=1000),
        ),
        durations,
    ),
    st.builds(
        Event,
        st.just("error"),
        route_labels,
        st.sampled_from(["dns", "connect", "tls", "reset", "timeout", "protocol", "proxy"]),
    ),
    st.builds(Event, st.just("retry"), route_labels),
    st.builds(Event, st.just("reflected"), route_labels, st.just(""), st.integers(1, 5)),
    st.builds(Reload, st.lists(st.sampled_from(ROUTES), unique=True).map(tuple)),
)


def play(steps: list[Step], metrics: Metrics, reference: Reference) -> None:
    """Apply every step to both: the proxy's way, and prometheus-client's objects."""
    for step in steps:
        if isinstance(step, Request):
            metrics.observe_request(step.route, step.method, step.status, step.duration_s)
            reference.observe_request(step.route, step.method, step.status, step.duration_s)
        elif isinstance(step, Reload):
            metrics.set_routes(step.routes)
            reference.set_routes(step.routes)
        elif step.kind == "error":
            metrics.count_upstream_error(step.route, step.detail)
            reference.upstream_errors.labels(route=step.route, reason=step.detail).inc()
        elif step.kind == "retry":
            metrics.count_retry(step.route)
            reference.retries.labels(route=step.route).inc()
        else:
            metrics.count_token_reflected(step.route, step.count)
            reference.token_reflected.labels(route=step.route).inc(step.count)


def families(text: str) -> dict[str, list[str]]:
    """Split an exposition into its blocks by family (HELP, TYPE, samples), in order."""
    blocks: dict[str, list[str]] = {}
    block: list[str] = []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            block = blocks.setdefault(line.split(" ", 3)[2], [])
        block.append(line)
    return blocks


def plain_part(text: str) -> list[str]:
    """Return the lines of the five plain families' blocks (and their ``_created`` blocks)."""
    names = {name + suffix for name in PLAIN for suffix in ("", "_total", "_created")}
    return [line for name, block in families(text).items() if name in names for line in block]


def masked(lines: list[str], since: float, until: float) -> list[str]:
    """Replace each ``_created`` value by ``T``, having checked it is a time in the run."""
    result: list[str] = []
    for line in lines:
        if not line.startswith("#") and "_created" in line.split("{", 1)[0]:
            series, created = line.rsplit(" ", 1)
            assert since <= float(created) <= until, line
            line = f"{series} T"
        result.append(line)
    return result


def assert_same(steps: list[Step], initial: tuple[str, ...] = (DEMO, DAAS)) -> None:
    since = time.time()
    metrics = Metrics(initial, KEYS)
    reference = Reference(initial)
    play(steps, metrics, reference)
    ours, theirs = metrics.render().decode(), reference.render()
    until = time.time()
    assert masked(plain_part(ours), since, until) == masked(theirs.splitlines(), since, until)
    # Every family where it was; a ``_created`` block appears once its family has a series.
    listed = [line[len("# TYPE ") :] for line in ours.splitlines() if line.startswith("# TYPE ")]
    assert listed == [t for t in TYPES if t in listed]
    kinds = {step.kind if isinstance(step, Event) else type(step).__name__ for step in steps}
    if {"Request", "error", "retry", "reflected"} <= kinds:
        assert listed == TYPES


@settings(max_examples=300, deadline=None)
@given(st.lists(steps, max_size=60))
def test_render_matches_prometheus_client_objects(steps: list[Step]) -> None:
    assert_same(steps)


def test_render_matches_on_a_fixed_varied_corpus() -> None:
    corpus: list[Step] = [
        Request(DEMO, "GET", 200, 0.0042),
        Request(DEMO, "GET", 200, 0.001),  # on a bound: that bucket, as le means
        Request(DEMO, "get", 200, 0.0010000001),
        Request(DAAS, "POST", 201, 0.3),
        Request(DAAS, "BREW", 999, 61.0),  # OTHER, "other", +Inf only
        Request(DAAS, "PATCH", 42, 60.0),  # "other" too: the same series as 999
        Request("unrouted", "OTHER", 400, 0.0),
        Request("unrouted", "OPTIONS", 431, 0.0),
        Event("error", DEMO, "reset"),
        Event("error", DEMO, "timeout"),
        Event("error", DEMO, "reset"),
        Event("retry", DAAS),
        Event("reflected", DEMO, count=2),
        Event("reflected", DEMO, count=1),
        Reload((DAAS, "/REST/other/v2")),  # demo's series stay; other's appears at 0
        Request("/REST/other/v2", "DELETE", 204, 2.5),
        Request(DEMO, "HEAD", 200, 0.02),  # a request that began before the reload
        *(Request(DEMO, "GET", 502, n / 1000) for n in range(200)),
    ]
    assert_same(corpus)


def test_every_route_has_its_histogram_at_zero_before_any_request() -> None:
    metrics = Metrics([DEMO], KEYS)
    parsed = samples(metrics.render().decode())
    for route in (DEMO, "unrouted"):
        name = "kszproxy_request_duration_seconds"
        assert value(parsed, f"{name}_count", route=route) == 0
        assert value(parsed, f"{name}_bucket", route=route, le="+Inf") == 0
    assert not any(name == "kszproxy_requests_total" for name, _ in parsed)
    metrics.set_routes([DEMO, DAAS])  # a reload adds a route: its series exists at once
    parsed = samples(metrics.render().decode())
    assert value(parsed, "kszproxy_request_duration_seconds_count", route=DAAS) == 0


def test_merged_worker_metrics_keep_every_series() -> None:
    one, two = Metrics([DEMO], KEYS), Metrics([DEMO], KEYS)
    one.observe_request(DEMO, "GET", 200, 0.004)
    two.observe_request(DEMO, "GET", 200, 0.2)
    two.observe_request(DEMO, "GET", 200, 0.3)
    two.count_upstream_error(DEMO, "reset")
    merged = merge_metrics([(0, one.render().decode()), (1, two.render().decode())])
    assert {f.name for f in text_string_to_metric_families(merged)} >= set(PLAIN)
    parsed = samples(merged)
    labels = {"route": DEMO, "method": "GET", "status": "200"}
    assert value(parsed, "kszproxy_requests_total", worker="0", **labels) == 1
    assert value(parsed, "kszproxy_requests_total", worker="1", **labels) == 2
    duration = "kszproxy_request_duration_seconds"
    assert value(parsed, f"{duration}_bucket", worker="1", route=DEMO, le="0.25") == 1
    assert value(parsed, f"{duration}_sum", worker="1", route=DEMO) == 0.5
    assert value(parsed, "kszproxy_upstream_errors_total", worker="1", route=DEMO, reason="reset")
    assert ("kszproxy_upstream_errors_total", frozenset({("worker", "0")})) not in parsed


def test_created_series_follow_prometheus_client_switch() -> None:
    """With PROMETHEUS_DISABLE_CREATED_SERIES, no family has ``_created`` series, ours neither."""
    script = (
        "from proxy.metrics import Metrics\n"
        f"m = Metrics([{DEMO!r}], [])\n"
        f"m.observe_request({DEMO!r}, 'GET', 200, 0.1)\n"
        f"m.count_retry({DEMO!r})\n"
        "m.config_reloads.labels(outcome='success').inc()\n"
        "print(m.render().decode(), end='')\n"
    )
    for setting, created in (("true", False), ("false", True)):
        environ = {**os.environ, "PROMETHEUS_DISABLE_CREATED_SERIES": setting}
        text = subprocess.run(  # noqa: S603  # our own interpreter, a fixed script
            [sys.executable, "-c", script], env=environ, capture_output=True, text=True, check=True
        ).stdout
        for family in (
            "kszproxy_requests",
            "kszproxy_request_duration_seconds",
            "kszproxy_upstream_retries",
            "kszproxy_config_reloads",  # a prometheus-client Counter still
        ):
            assert (f"\n{family}_created{{" in text) is created, (family, setting)
        assert ("_created" in text) is created
