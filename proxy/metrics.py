"""Own the Prometheus metrics: names, labels and bounded label values (names are a contract).

Every label value comes from a closed set -- a configured route prefix or ``unrouted``, a method
from ``METHODS`` or ``OTHER``, a three-digit status, a reason code, a configured scope set, a
configured client name -- so no request can create new series, and no path, query string or
secret is ever a label.
Children are cached per label tuple to keep ``.labels()`` off the hot path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

from proxy import __version__

# Also importable from here, where the runtime wiring reads it.
from proxy.scopes import scope_label as scope_label

METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
TOKEN_OUTCOMES: Final = ("success", "rejected", "error")
RELOAD_OUTCOMES: Final = ("success", "failure")
_LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


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
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "kszproxy_upstream_errors",
            "Upstream transport failures by reason (dns, connect, tls, reset, timeout, protocol, "
            "proxy).",
            ["route", "reason"],
            registry=r,
        )
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
        for route in self._routes:
            self.duration.labels(route=route)
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._duration_children: dict[str, Histogram] = {}

    def observe_token_fetch(self, client: str, outcome: str, duration_s: float) -> None:
        """Count one token request of a configured client, and its duration."""
        if client not in self._clients:
            raise ValueError("not a configured client")  # a label set stays closed
        self.token_requests.labels(client=client, outcome=outcome).inc()
        self.token_fetch.labels(client=client).observe(duration_s)

    def set_routes(self, routes: Iterable[str]) -> None:
        """Label requests by these route prefixes from now on (a reload changed the routes)."""
        self._routes = frozenset(routes) | {"unrouted"}
        for route in self._routes:
            self.duration.labels(route=route)

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
        method = method if method in METHODS else "OTHER"
        key = (route, method, status)
        child = self._request_children.get(key)
        if child is None:
            # The upstream chooses the status; anything outside HTTP's range shares one label.
            label = str(status) if 100 <= status <= 599 else "other"
            child = self.requests.labels(route=route, method=method, status=label)
            self._request_children[key] = child
        child.inc()
        histogram = self._duration_children.get(route)
        if histogram is None:
            histogram = self._duration_children[route] = self.duration.labels(route=route)
        histogram.observe(duration_s)

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
