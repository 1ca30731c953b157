"""SIGHUP reload, the pure part: which keys changed, which need a restart, what runs next."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from proxy.config import Config, parse_config
from proxy.reload import RESTART_ONLY, changed_keys, plan_reload


def config(tmp_path: Path, **tables: dict[str, Any] | list[dict[str, Any]]) -> Config:
    data: dict[str, Any] = {
        "environment": "acpt",
        "client": {"id": "c", "pkcs12": str(tmp_path / "x.p12")},
        "routes": [{"prefix": "/REST/a/v1", "scopes": ["s:a"]}],
    }
    for name, value in tables.items():
        if isinstance(value, dict) and isinstance(data.get(name), dict):
            data[name] = {**data[name], **value}
        else:
            data[name] = value
    return parse_config(data, {}, base_dir=tmp_path)


def test_the_same_file_changes_nothing(tmp_path: Path) -> None:
    plan = plan_reload(config(tmp_path), config(tmp_path))
    assert plan.changed == plan.needs_restart == ()


def test_request_settings_change_and_sockets_stay(tmp_path: Path) -> None:
    running = config(tmp_path, listen={"port": 8080, "max_in_flight": 10})
    new = config(
        tmp_path,
        listen={"port": 8081, "max_in_flight": 20, "workers": 2},
        admin={"host": "0.0.0.0"},  # noqa: S104  # a value in a test config
        upstream={"read_timeout_s": 5},
        routes=[{"prefix": "/REST/a/v1", "scopes": ["s:b"]}, {"prefix": "/REST/b/v1"}],
    )
    plan = plan_reload(running, new)
    assert set(plan.changed) == {
        "listen.port",
        "listen.max_in_flight",
        "listen.workers",
        "admin.host",
        "upstream.read_timeout_s",
        "routes",
    }
    assert set(plan.needs_restart) == {"listen.port", "listen.workers", "admin.host"}
    assert plan.needs_restart == tuple(k for k in plan.changed if k in RESTART_ONLY)
    # What runs next: the new file, with the sockets and processes as they are.
    assert plan.config.listen.port == 8080
    assert plan.config.listen.workers == 1
    assert plan.config.admin.host == "127.0.0.1"
    assert plan.config.listen.max_in_flight == 20
    assert plan.config.upstream.read_timeout_s == 5
    assert [r.prefix for r in plan.config.routes] == ["/REST/a/v1", "/REST/b/v1"]
    assert changed_keys(plan.config, new) == ["listen.port", "listen.workers", "admin.host"]


def test_where_the_file_was_read_is_not_a_change(tmp_path: Path) -> None:
    data: dict[str, Any] = {"environment": "acpt", "client": {"id": "c", "pkcs12": "x.p12"}}
    data["routes"] = [{"prefix": "/REST/a"}]
    one = parse_config(data, {}, base_dir=tmp_path, source=tmp_path / "one.toml")
    two = parse_config(data, {}, base_dir=tmp_path, source=tmp_path / "two.toml")
    assert changed_keys(one, two) == []
