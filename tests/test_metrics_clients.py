"""Metrics with several clients: the client label comes from the configuration only."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from proxy.config import load_config
from proxy.errors import ConfigError
from proxy.metrics import Metrics
from proxy.onboarding.token import token_client
from tests.support.metrics import samples, value

CONSULT: Final = frozenset({"scope:demo:consult"})
DAAS: Final = frozenset({"scope:daas:consult"})


def test_token_series_exist_per_client_before_any_request() -> None:
    metrics = Metrics(
        ["/REST/demo/v1", "/REST/daas/v1"],
        [("default", CONSULT), ("daas", DAAS)],
        ["default", "daas"],
    )
    parsed = samples(metrics.render().decode())
    for client in ("default", "daas"):
        for outcome in ("success", "rejected", "error"):
            labels = {"client": client, "outcome": outcome}
            assert value(parsed, "kszproxy_token_requests_total", **labels) == 0
        assert value(parsed, "kszproxy_token_fetch_duration_seconds_count", client=client) == 0
    assert (
        value(
            parsed,
            "kszproxy_token_expiry_timestamp_seconds",
            client="daas",
            scopes=next(iter(DAAS)),
        )
        == 0
    )
    metrics.observe_token_fetch("daas", "rejected", 0.2)
    parsed = samples(metrics.render().decode())
    assert value(parsed, "kszproxy_token_requests_total", client="daas", outcome="rejected") == 1
    assert value(parsed, "kszproxy_token_requests_total", client="default", outcome="rejected") == 0


def test_an_unknown_client_never_becomes_a_label() -> None:
    metrics = Metrics(["/REST/demo/v1"], [("default", CONSULT)])
    before = metrics.render()
    with pytest.raises(ValueError, match="not a configured client"):
        metrics.observe_token_fetch("somebody-else", "success", 0.1)
    assert metrics.render() == before


def test_token_needs_a_client_when_none_is_the_default(tmp_path: Path) -> None:
    path = tmp_path / "ksz-proxy.toml"
    path.write_text(
        'environment = "acpt"\n'
        '[[clients]]\nname = "a"\nid = "a:client"\npkcs12 = "a.p12"\n'
        '[[clients]]\nname = "b"\nid = "b:client"\npkcs12 = "b.p12"\n'
        '[[routes]]\nprefix = "/REST/a/v1"\nclient = "a"\n'
    )
    config = load_config(path, {})
    assert token_client(config, "b").id == "b:client"
    with pytest.raises(
        ConfigError,
        match='--client: required: there are several clients and none is named "default"',
    ):
        token_client(config, None)
    with pytest.raises(ConfigError, match='--client: no client is named "c" \\(known: a, b\\)'):
        token_client(config, "c")
