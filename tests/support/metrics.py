"""Scrape /metrics and parse the Prometheus text into samples."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.support.chain import Chain

Labels = frozenset[tuple[str, str]]


async def admin_get(chain: Chain, path: str) -> tuple[int, dict[str, str], bytes]:
    """GET an admin path; return status, headers and body."""
    async with chain.session.get(chain.proxy.admin_url + path) as response:
        return response.status, dict(response.headers), await response.read()


async def scrape(chain: Chain) -> str:
    """Return the /metrics text."""
    status, headers, body = await admin_get(chain, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    return body.decode()


def samples(text: str) -> dict[tuple[str, Labels], float]:
    """Parse Prometheus text into {(sample name, labels): value}."""
    result: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return result


def value(parsed: dict[tuple[str, Labels], float], name: str, **labels: str) -> float:
    """Return one sample's value (KeyError names the missing series)."""
    return parsed[(name, frozenset(labels.items()))]


def series_count(text: str) -> int:
    """Count sample lines, the way a scraper stores them."""
    return sum(1 for line in text.splitlines() if line and not line.startswith("#"))
