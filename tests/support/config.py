"""Configurations pointing at the fakes: as data for ``parse_config`` or as a TOML file.

Each takes changes, so a test states only what differs from the usual chain: a table given as a
dict updates that table (a ``None`` value drops the key), any other value replaces the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from proxy.config import Config, parse_config
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.partner import CLIENT_ID, DEFAULT_SCOPES, PartnerFiles

DEMO: Final = "/REST/demo/v1"
OTHER: Final = "/REST/other/v2"
# Fast token retries, so a test about an outage does not wait for production back-offs.
FAST_RETRIES: Final = {"retry_initial_s": 0.05, "retry_max_s": 0.2}


def changed(data: Mapping[str, Any], **changes: Any) -> dict[str, Any]:
    """Return ``data`` with ``changes``: a dict updates its table (None drops a key), else set."""
    result: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for name, value in changes.items():
        if isinstance(value, dict):
            table = result.setdefault(name, {})
            table.update(value)
            for key in [k for k, v in value.items() if v is None]:
                del table[key]
        else:
            result[name] = value
    return result


def toml(data: Mapping[str, Any]) -> str:
    """Render a config dict as TOML (plain keys, tables and arrays of tables only)."""
    # JSON strings, numbers, booleans and string arrays are valid TOML values.
    lines = [f"{k} = {json.dumps(v)}" for k, v in data.items() if not isinstance(v, dict | list)]
    for key, value in data.items():
        if isinstance(value, dict):
            lines.append(f"[{key}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in value.items()]
        elif isinstance(value, list):
            for item in value:
                lines.append(f"[[{key}]]")
                lines += [f"{k} = {json.dumps(v)}" for k, v in item.items()]
    return "\n".join(lines) + "\n"


def write_toml(path: Path, data: Mapping[str, Any]) -> Path:
    """Write ``data`` as TOML to ``path``; return ``path``."""
    path.write_text(toml(data), encoding="utf-8")
    return path


def client_table(files: PartnerFiles) -> dict[str, Any]:
    """Return the [client] table of the test partner with its keystore files."""
    return {"id": CLIENT_ID, "pkcs12": str(files.pkcs12), "password_file": str(files.password_file)}


def chain_data(
    auth: AuthServerHandle, upstream_url: str, files: PartnerFiles, ca_file: Path
) -> dict[str, Any]:
    """Return the usual chain's config as data: the fakes, free ports, two routes."""
    return {
        "client": client_table(files),
        "oauth": {"token_url": auth.token_url, "ca_file": str(ca_file), **FAST_RETRIES},
        "upstream": {"url": upstream_url, "ca_file": str(ca_file)},
        "listen": {"port": 0},
        "admin": {"port": 0},
        "routes": [
            {"prefix": DEMO, "scopes": ["scope:demo:consult"]},
            {"prefix": OTHER, "scopes": ["scope:cbss:api:demo:consult"]},
        ],
    }


def chain_config(
    auth: AuthServerHandle,
    upstream_url: str,
    files: PartnerFiles,
    ca_file: Path,
    **sections: Any,
) -> Config:
    """Return a proxy config pointing at the fakes; ``sections`` override/extend tables."""
    return parse_config(changed(chain_data(auth, upstream_url, files, ca_file), **sections), {})


def make_config(
    token_url: str | None, files: PartnerFiles, ca_file: Path | None, **oauth: Any
) -> Config:
    """Return a config for a token provider alone: ``oauth`` keys as given, no upstream behind."""
    oauth_table: dict[str, Any] = {**oauth}
    if token_url is not None:
        oauth_table["token_url"] = token_url
    if ca_file is not None:
        oauth_table["ca_file"] = str(ca_file)
    data: dict[str, Any] = {
        "client": client_table(files),
        "oauth": oauth_table,
        "upstream": {"url": "https://127.0.0.1:9"},
        "routes": [{"prefix": DEMO, "scopes": sorted(DEFAULT_SCOPES)}],
    }
    return parse_config(data, {})


def write_config(
    path: Path,
    *,
    authserver: AuthServerHandle,
    upstream: UpstreamHandle,
    ca_file: Path,
    pkcs12: Path,
    password_file: Path,
    drain_timeout_s: float = 10,
    **changes: Any,
) -> Path:
    """Write a config pointing at the fakes (both listeners on free ports); return its path."""
    data = {
        "environment": "test",
        "client": {"id": CLIENT_ID, "pkcs12": str(pkcs12), "password_file": str(password_file)},
        "oauth": {"token_url": authserver.token_url, "ca_file": str(ca_file), **FAST_RETRIES},
        "upstream": {"url": upstream.url, "ca_file": str(ca_file)},
        "listen": {"port": 0, "drain_timeout_s": drain_timeout_s},
        "admin": {"port": 0},
        "routes": [{"prefix": DEMO, "scopes": ["scope:demo:consult"]}],
    }
    return write_toml(path, changed(data, **changes))
