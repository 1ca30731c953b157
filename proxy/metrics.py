"""Own the Prometheus metrics: names, labels and bounded label values (names are a contract).

Every label value comes from a closed set -- a configured route prefix or ``unrouted``, a method
from ``METHODS`` or ``OTHER``, a three-digit status, a reason code, a configured scope set, a
configured client name -- so no request can create new series, and no path, query string or
secret is ever a label.

The per-request series (``kszproxy_requests``, ``kszproxy_request_duration_seconds``,
``kszproxy_upstream_errors``, ``kszproxy_upstream_retries``, ``kszproxy_token_reflected``) are
plain Python numbers, counted by ``observe_request`` and the ``count_*`` methods and turned into
metric families only when ``/metrics`` is scraped (``_Counter``, ``_Histogram``): a request costs
a few dict look-ups and additions instead of prometheus-client's locks and child objects. They
render exactly as prometheus-client's ``Counter`` and ``Histogram`` did (names, HELP, TYPE, label
order, ``le`` bounds, ``_created``); ``tests/test_metrics_render.py`` compares the two.

No locks: every count and every scrape runs on the event loop thread. The proxy listener's
handler counts; the admin listener that renders ``/metrics`` is served by the same loop
(``server.py`` starts both runners in one loop, and ``admin.py``'s handler renders inline, not in
an executor). With ``listen.workers`` > 1 each worker is a process of its own, and the supervisor
merges the workers' texts (``admin.merge_metrics``).
The other series change rarely (token requests, reloads, scrape-time gauges) and stay
prometheus-client objects.
"""

from __future__ import annotations

import contextlib
import os
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from proxy import __version__

# Also importable from here, where the runtime wiring reads it.
from proxy.scopes import scope_label as scope_label

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TOKEN_OUTCOMES: Final = ("success", "rejected", "error")
RELOAD_OUTCOMES: Final = ("success", "failure")
# Every reason an UpstreamError carries (upstream_protocol._DETAILS, UpstreamTimeout,
# ProxyTunnelError): kszproxy_upstream_errors_total has each of them at 0 for every route.
UPSTREAM_REASONS: Final = ("dns", "connect", "tls", "reset", "timeout", "protocol", "proxy")
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
# prometheus-client's own switch for the ``_created`` series, read the way it reads it (once, at
# import), so that the series counted here follow it like the library's own do.
_CREATED: Final = os.environ.get("PROMETHEUS_DISABLE_CREATED_SERIES", "False").lower() not in (
    "true",
    "1",
    "t",
)


class _Counter(Collector):
    """A counter family whose series are plain floats, rendered when scraped.

    ``series`` maps the label values (in ``labelnames`` order) to ``[value, created]``.
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self.series: dict[tuple[str, ...], list[float]] = {}

    def cell(self, *values: str) -> list[float]:
        """Return the ``[value, created]`` cell of one series, created at 0 when new."""
        cell = self.series.get(values)
        if cell is None:
            cell = self.series[values] = [0.0, time.time()]
        return cell

    def describe(self) -> Iterable[Metric]:
        """Return the family without samples: the registry checks its names once."""
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterator[Metric]:
        """Yield the family with one ``_total`` (and ``_created``) sample per series."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, (value, created) in self.series.items():
            family.add_metric(values, value, created=created if _CREATED else None)
        yield family


class _HistogramSeries:
    """One histogram series: the count per bucket (not cumulative; the last is +Inf), the sum."""

    __slots__ = ("buckets", "created", "sum")

    def __init__(self, size: int) -> None:
        self.buckets = [0] * size
        self.sum = 0.0
        self.created = time.time()


class _Histogram(Collector):
    """A histogram family with one label, whose series are plain numbers, rendered when scraped.

    Observe ``amount`` in ``series``: ``buckets[bisect_left(bounds, amount)] += 1`` and ``sum +=
    amount`` -- the bucket prometheus-client's ``Histogram.observe`` picks (the first bound
    ``amount`` does not exceed) for every amount but NaN, which no duration is.
    """

    def __init__(
        self, name: str, documentation: str, labelname: str, bounds: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelname = labelname
        self.bounds = tuple(bounds)
        # The ``le`` values exactly as prometheus-client writes them (it has no type hints).
        self._le: list[str] = [
            floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in (*self.bounds, float("inf"))
        ]
        self.series: dict[str, _HistogramSeries] = {}

    def get(self, value: str) -> _HistogramSeries:
        """Return the series of one label value, created empty when new."""
        series = self.series.get(value)
        if series is None:
            series = self.series[value] = _HistogramSeries(len(self._le))
        return series

    def describe(self) -> Iterable[Metric]:
        """Return the family without samples: the registry checks its names once."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])]

    def collect(self) -> Iterator[Metric]:
        """Yield the family: cumulative buckets, ``_count``, ``_sum`` (and ``_created``)."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=[self.labelname])
        for value, series in self.series.items():
            cumulative: list[tuple[str, float]] = []
            total = 0.0
            for le, count in zip(self._le, series.buckets, strict=True):
                total += count
                cumulative.append((le, total))
            family.add_metric([value], cumulative, series.sum)
            if _CREATED:
                labels = {self.labelname: value}
                family.samples.append(Sample(f"{self.name}_created", labels, series.created))
        yield family


class Metrics:
    """All ksz-proxy metrics in one registry of their own."""

    def __init__(
        self,
        routes: Iterable[str],
        token_keys: Iterable[tuple[str, frozenset[str]]],
        clients: Iterable[str] = ("default",),
    ) -> None:
        """``token_keys`` are the (client name, scope set) pairs the routes need."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._routes = frozenset(routes) | {"unrouted"}
        # Registered in this order, as the families have always been listed.
        self.requests = _Counter(
            "kszproxy_requests",
            "Requests answered on the proxy listener.",
            ["route", "method", "status"],
        )
        r.register(self.requests)
        self.duration = _Histogram(
            "kszproxy_request_duration_seconds",
            "Time from request to complete answer, as the caller sees it.",
            "route",
            _LATENCY_BUCKETS,
        )
        r.register(self.duration)
        self.upstream_errors = _Counter(
            "kszproxy_upstream_errors",
            "Upstream transport failures by reason (dns, connect, tls, reset, timeout, protocol, "
            "proxy).",
            ["route", "reason"],
        )
        r.register(self.upstream_errors)
        self.in_flight = Gauge(
            "kszproxy_in_flight_requests", "Requests being handled now.", registry=r
        )
        self.token_requests = Counter(
            "kszproxy_token_requests",
            "Token endpoint requests by client and outcome (success, rejected, error).",
            ["client", "outcome"],
            registry=r,
        )
        self.token_fetch = Histogram(
            "kszproxy_token_fetch_duration_seconds",
            "Time one token request took, by client.",
            ["client"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.token_expiry = Gauge(
            "kszproxy_token_expiry_timestamp_seconds",
            "When the cached token of each client and configured scope set expires "
            "(Unix time; 0 = none).",
            ["client", "scopes"],
            registry=r,
        )
        self.retries = _Counter(
            "kszproxy_upstream_retries",
            "Requests resent once with a fresh token after an upstream 401.",
            ["route"],
        )
        r.register(self.retries)
        self.token_reflected = _Counter(
            "kszproxy_token_reflected",
            "Answer headers removed because they carried the access token back to the caller.",
            ["route"],
        )
        r.register(self.token_reflected)
        self.certificate_expiry = Gauge(
            "kszproxy_certificate_expiry_timestamp_seconds",
            "notAfter of each client's signing certificate (Unix time).",
            ["client"],
            registry=r,
        )
        self.clock_skew = Gauge(
            "kszproxy_clock_skew_seconds",
            "Token endpoint Date header minus local time, at the last token request.",
            registry=r,
        )
        self.build_info = Gauge(
            "kszproxy_build_info", "Always 1; the version is a label.", ["version"], registry=r
        )
        self.build_info.labels(version=__version__).set(1)
        self.config_reloads = Counter(
            "kszproxy_config_reloads",
            "Configuration reloads (SIGHUP) by outcome: success, or failure (the old one stays).",
            ["outcome"],
            registry=r,
        )
        self.config_last_reload_success = Gauge(
            "kszproxy_config_last_reload_success_timestamp_seconds",
            "When the configuration in use was loaded (Unix time): start-up or the last reload.",
            registry=r,
        )
        self.config_last_reload_success.set_to_current_time()
        for outcome in RELOAD_OUTCOMES:
            self.config_reloads.labels(outcome=outcome)
        self._clients: frozenset[str] = frozenset()
        self._current: frozenset[str] = frozenset()
        self.use_clients(clients, token_keys)
        self._zero_series()
        # (route, method label, status) -> (its kszproxy_requests cell, its route's histogram).
        self._request_cells: dict[tuple[str, str, int], tuple[list[float], _HistogramSeries]] = {}

    def observe_token_fetch(self, client: str, outcome: str, duration_s: float) -> None:
        """Count one token request of a configured client, and its duration."""
        if client not in self._clients:
            raise ValueError("not a configured client")  # a label set stays closed
        self.token_requests.labels(client=client, outcome=outcome).inc()
        self.token_fetch.labels(client=client).observe(duration_s)

    def set_routes(self, routes: Iterable[str]) -> None:
        """Label requests by these route prefixes from now on (a reload changed the routes)."""
        self._routes = frozenset(routes) | {"unrouted"}
        self._zero_series()

    def _zero_series(self) -> None:
        """Make every route's series exist at 0 before anything is counted.

        Prometheus' ``increase()`` and ``rate()`` miss a series that first appears at 1: without
        these, the first upstream error, retry or reflected token on a route would never show
        in ``KszProxyUpstreamErrors`` or fire ``KszProxyTokenReflected``.
        """
        for route in sorted(self._routes):
            self.duration.get(route)
            if route == "unrouted":
                continue  # refused before any upstream: none of these can happen to it
            self.retries.cell(route)
            self.token_reflected.cell(route)
            for reason in UPSTREAM_REASONS:
                self.upstream_errors.cell(route, reason)

    def use_clients(
        self, clients: Iterable[str], token_keys: Iterable[tuple[str, frozenset[str]]]
    ) -> None:
        """Label token series by these clients from now on (at start, or a reload changed them).

        New clients and (client, scope set) pairs get their series (expiry 0 until a token is
        held). The expiry gauges of a client that is gone are removed, so no alert fires on a
        certificate nobody uses any more; its counters keep what they counted, and a request
        that started before the reload may still count a token request of it.
        """
        names = frozenset(clients)
        token_keys = tuple(token_keys)
        for gone in self._current - names:
            with contextlib.suppress(KeyError):
                self.certificate_expiry.remove(gone)
        # A token expiry series whose client or scope set no route uses any more goes too: no
        # "no usable token" alert for a scope set that is no longer asked for.
        wanted = {(client, scope_label(scopes)) for client, scopes in token_keys}
        for name, label in _label_pairs(self.token_expiry):
            if (name, label) not in wanted:
                self.token_expiry.remove(name, label)
        for client in names - self._clients:
            for outcome in TOKEN_OUTCOMES:
                self.token_requests.labels(client=client, outcome=outcome)
            self.token_fetch.labels(client=client)
        self._clients |= names  # every client ever configured: still a closed set
        self._current = names
        for client, scopes in token_keys:
            self.token_expiry.labels(client=client, scopes=scope_label(scopes))

    def route_label(self, prefix: str) -> str:
        """Return ``prefix`` when it is a configured route, else ``unrouted``."""
        return prefix if prefix in self._routes else "unrouted"

    def observe_request(self, route: str, method: str, status: int, duration_s: float) -> None:
        """Count one answered request and its duration."""
        key = (route, method if method in METHODS else "OTHER", status)
        cells = self._request_cells.get(key)
        if cells is None:
            # The upstream chooses the status; anything outside HTTP's range shares one label.
            label = str(status) if 100 <= status <= 599 else "other"
            cells = (self.requests.cell(route, key[1], label), self.duration.get(route))
            self._request_cells[key] = cells
        count, histogram = cells
        count[0] += 1
        histogram.buckets[bisect_left(_LATENCY_BUCKETS, duration_s)] += 1
        histogram.sum += duration_s

    def count_upstream_error(self, route: str, reason: str) -> None:
        """Count one upstream transport failure of a request, by its reason code."""
        self.upstream_errors.cell(route, reason)[0] += 1

    def count_retry(self, route: str) -> None:
        """Count one request resent with a fresh token after an upstream 401."""
        self.retries.cell(route)[0] += 1

    def count_token_reflected(self, route: str, headers: int) -> None:
        """Count answer headers removed because they carried the access token."""
        self.token_reflected.cell(route)[0] += headers

    def render(self) -> bytes:
        """Return the registry in the Prometheus text format."""
        return generate_latest(self.registry)


def _label_pairs(gauge: Gauge) -> list[tuple[str, str]]:
    """Return the (client, scopes) label values of ``gauge``'s series."""
    return [
        (sample.labels["client"], sample.labels["scopes"])
        for family in gauge.collect()
        for sample in family.samples
    ]
