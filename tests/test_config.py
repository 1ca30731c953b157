"""The configuration loader: endpoint table, defaults, every key, every refusal, the examples."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import pickle
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import pytest
import trustme

from proxy.config import (
    DEFAULT_ALLOWED_HOSTS,
    AdminConfig,
    ClientConfig,
    Config,
    ListenConfig,
    LogConfig,
    OAuthConfig,
    Route,
    UpstreamConfig,
    load_config,
)
from proxy.egress import EgressPolicy, ProxyServer, basic_authorization, parse_no_proxy
from proxy.endpoints import DISCOVERY_URLS, ENDPOINTS
from proxy.errors import ConfigError
from proxy.secret import Secret

CANARY: Final = "canary-Pa55phrase-3b9d1f"  # must never show up in a repr or an error message
CONFIG_DIR: Final = Path(__file__).resolve().parent.parent / "config"
DROP: Final = object()  # a patch value that removes the key
ANY_HOST: Final = "0.0.0.0"  # noqa: S104  # a listen address under test, never bound here

# The KSZ.md endpoint table, copied by hand so the built-in one is checked against the source.
KSZ_TABLE: Final = [
    (
        "test",
        "extranet",
        "https://professionalservices-int.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-test.ksz-bcss.fgov.be:4543",
    ),
    (
        "test",
        "internet",
        "https://services-int.socialsecurity.be/REST/oauth/v5/token",
        "https://api.test.ksz-bcss.fgov.be",
    ),
    (
        "acpt",
        "extranet",
        "https://professionalservices-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-acpt.ksz-bcss.fgov.be:4543",
    ),
    (
        "acpt",
        "internet",
        "https://services-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://api.acpt.ksz-bcss.fgov.be",
    ),
    (
        "prod",
        "extranet",
        "https://professionalservices.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b.ksz-bcss.fgov.be:4543",
    ),
    (
        "prod",
        "internet",
        "https://services.socialsecurity.be/REST/oauth/v5/token",
        "https://api.ksz-bcss.fgov.be",
    ),
]

# Every key load_config accepts, per table ("" is the top level). The contract with operators:
# test_known_keys_match_the_dataclasses and test_every_key_set_explicitly keep it honest.
KNOWN_KEYS: Final[Mapping[str, frozenset[str]]] = {
    "": frozenset(
        {
            "environment",
            "channel",
            "client",
            "clients",
            "oauth",
            "upstream",
            "listen",
            "admin",
            "log",
            "routes",
            "egress",
        }
    ),
    "client": frozenset(
        {"id", "pkcs12", "private_key", "certificate", "password_file", "password_env"}
    ),
    "clients": frozenset(
        {
            "name",
            "id",
            "pkcs12",
            "private_key",
            "certificate",
            "password_file",
            "password_env",
            "algorithm",
            "key_id",
            "audience",
            "assertion_lifetime_s",
            "scopes",
        }
    ),
    "oauth": frozenset(
        {
            "token_url",
            "discovery_url",
            "audience",
            "algorithm",
            "key_id",
            "assertion_lifetime_s",
            "scopes",
            "ca_file",
            "proxy",
            "timeout_s",
            "send_client_id",
            "refresh_ratio",
            "retry_initial_s",
            "retry_max_s",
            "default_expires_in_s",
        }
    ),
    "upstream": frozenset(
        {
            "url",
            "ca_file",
            "client_certificate",
            "proxy",
            "connect_timeout_s",
            "read_timeout_s",
            "total_timeout_s",
            "max_connections",
            "replay_max_bytes",
        }
    ),
    "listen": frozenset(
        {
            "host",
            "port",
            "allowed_hosts",
            "max_body_bytes",
            "body_read_timeout_s",
            "keepalive_timeout_s",
            "drain_timeout_s",
            "max_in_flight",
            "max_receiving",
            "workers",
            "shared_secret_file",
        }
    ),
    "admin": frozenset({"host", "port"}),
    "log": frozenset({"level"}),
    "routes": frozenset({"prefix", "scopes", "upstream", "client", "proxy"}),
    "egress": frozenset(
        {
            "proxy_url",
            "proxy_user",
            "proxy_password_file",
            "proxy_password_env",
            "no_proxy",
            "from_environment",
        }
    ),
}

MINIMAL: Final[Mapping[str, Any]] = {
    "environment": "acpt",
    "client": {"id": "partenaire:federal:service:bus:client:confidential", "pkcs12": "acpt.p12"},
    "routes": [{"prefix": "/REST/demo/v1"}],
}


# --------------------------------------------------------------------------------------------
# Helpers: a tiny TOML writer, so cases read as data and still go through load_config.


def toml_value(value: Any) -> str:
    """Return ``value`` as a TOML value (inline tables for nested mappings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)  # repr gives nan and inf, which TOML spells the same way
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are TOML basic-string escapes
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def to_toml(data: Mapping[str, Any]) -> str:
    """Return a TOML document: top-level keys, then [tables], then [[arrays of tables]]."""
    lines: list[str] = []
    tables: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append(f"[{key}]")
            tables.extend(f"{k} = {toml_value(v)}" for k, v in value.items())
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            for item in value:
                tables.append(f"[[{key}]]")
                tables.extend(f"{k} = {toml_value(v)}" for k, v in item.items())
        else:
            lines.append(f"{key} = {toml_value(value)}")
    return "\n".join([*lines, *tables]) + "\n"


def patched(patch: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Return MINIMAL with ``patch`` applied: tables merge key by key, DROP removes a key."""
    data = copy.deepcopy(dict(MINIMAL))
    for key, value in (patch or {}).items():
        if value is DROP:
            data.pop(key, None)
        elif isinstance(value, dict) and isinstance(data.get(key), dict):
            for inner, inner_value in value.items():
                if inner_value is DROP:
                    data[key].pop(inner, None)
                else:
                    data[key][inner] = inner_value
        else:
            data[key] = value
    return data


@functools.cache
def ca_pem() -> bytes:
    """Return a real CA certificate in PEM, made at test time: CA files are loaded at start."""
    return bytes(trustme.CA().cert_pem.bytes())


def write(path: Path, content: str | bytes, mode: int = 0o600) -> Path:
    """Write a file with an exact mode (the umask does not get a say)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    path.chmod(mode)
    return path


def load(
    tmp_path: Path, patch: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Config:
    """Write MINIMAL + patch to tmp_path/ksz-proxy.toml and load it."""
    path = write(tmp_path / "ksz-proxy.toml", to_toml(patched(patch)), 0o644)
    return load_config(path, environ or {})


def failure(
    tmp_path: Path, patch: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> str:
    """Load MINIMAL + patch, expecting a ConfigError; return its message."""
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, patch, environ)
    error = caught.value
    assert str(error) == error.detail
    assert error.reason == "config"
    return error.detail


def host_labels(url: str) -> list[str]:
    """Return the dot- and dash-separated labels of a URL's host name."""
    return re.split(r"[.-]", urlsplit(url).hostname or "")


# --------------------------------------------------------------------------------------------
# Environment, channel and the endpoint table


def test_built_in_table_is_the_ksz_table() -> None:
    assert dict(ENDPOINTS) == {(env, ch): (token, rest) for env, ch, token, rest in KSZ_TABLE}


@pytest.mark.parametrize(("environment", "channel", "token_url", "rest"), KSZ_TABLE)
def test_environment_and_channel_choose_the_endpoints(
    tmp_path: Path, environment: str, channel: str, token_url: str, rest: str
) -> None:
    config = load(tmp_path, {"environment": environment, "channel": channel})
    assert config.environment == environment
    assert config.channel == channel
    assert config.oauth.token_url == token_url
    assert config.oauth.discovery_url is None
    assert config.upstream.url == rest
    assert [r.upstream for r in config.routes] == [rest]


@pytest.mark.parametrize("channel", ["extranet", "internet"])
def test_production_never_points_at_acceptance_or_test(tmp_path: Path, channel: str) -> None:
    # The onboarding document repeats the acceptance hosts in its production table (erratum).
    config = load(tmp_path, {"environment": "prod", "channel": channel})
    urls = [config.oauth.token_url or "", config.upstream.url, DISCOVERY_URLS["prod"]]
    urls += [r.upstream for r in config.routes]
    for url in urls:
        assert "acpt" not in url
        assert "acc" not in url
        assert not {"test", "int", "acpt", "acc"} & set(host_labels(url)), url


def test_channel_defaults_to_extranet(tmp_path: Path) -> None:
    assert load(tmp_path).channel == "extranet"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("test", "test"),
        ("acpt", "acpt"),
        ("acceptance", "acpt"),
        ("prod", "prod"),
        ("production", "prod"),
        ("Production", "prod"),
        ("ACPT", "acpt"),
    ],
)
def test_environment_aliases(tmp_path: Path, given: str, expected: str) -> None:
    config = load(tmp_path, {"environment": given})
    assert config.environment == expected
    assert config.oauth.token_url == ENDPOINTS[(expected, "extranet")][0]


def test_explicit_urls_override_the_table(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "oauth": {"token_url": "https://token.example/oauth/v5/token"},
            "upstream": {"url": "https://rest.example:4543"},
        },
    )
    assert config.environment == "acpt"
    assert config.oauth.token_url == "https://token.example/oauth/v5/token"
    assert config.upstream.url == "https://rest.example:4543"
    assert config.routes[0].upstream == "https://rest.example:4543"


def test_discovery_url_replaces_the_table_token_url(tmp_path: Path) -> None:
    discovery = DISCOVERY_URLS["acpt"]
    config = load(tmp_path, {"oauth": {"discovery_url": discovery}})
    assert config.oauth.token_url is None
    assert config.oauth.discovery_url == discovery


def test_no_environment_with_explicit_urls(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "environment": DROP,
            "oauth": {"token_url": "https://127.0.0.1:8443/token"},
            "upstream": {"url": "https://127.0.0.1:9443"},
        },
    )
    assert config.environment is None
    assert config.oauth.token_url == "https://127.0.0.1:8443/token"
    assert config.upstream.url == "https://127.0.0.1:9443"


def test_no_environment_and_no_urls_is_an_error(tmp_path: Path) -> None:
    assert failure(tmp_path, {"environment": DROP}).startswith("upstream.url: required")
    text = failure(tmp_path, {"environment": DROP, "upstream": {"url": "https://rest.example"}})
    assert text.startswith("oauth.token_url: required")


def test_no_environment_with_discovery_only(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "environment": DROP,
            "oauth": {"discovery_url": "https://auth.example/.well-known/x"},
            "upstream": {"url": "https://rest.example"},
        },
    )
    assert config.oauth.token_url is None
    assert config.oauth.discovery_url == "https://auth.example/.well-known/x"


# --------------------------------------------------------------------------------------------
# Defaults and every key


def test_every_default(tmp_path: Path) -> None:
    config = load(tmp_path)
    token_url, rest = ENDPOINTS[("acpt", "extranet")]
    assert config == Config(
        environment="acpt",
        channel="extranet",
        clients=(
            ClientConfig(
                id="partenaire:federal:service:bus:client:confidential",
                pkcs12=tmp_path / "acpt.p12",
            ),
        ),
        oauth=OAuthConfig(
            token_url=token_url,
            discovery_url=None,
            audience=None,
            algorithm="RS256",
            key_id="none",
            assertion_lifetime_s=300,
            scopes=frozenset(),
            ca_file=None,
            timeout_s=10.0,
            send_client_id=False,
            refresh_ratio=0.8,
            retry_initial_s=1.0,
            retry_max_s=60.0,
            default_expires_in_s=300,
        ),
        upstream=UpstreamConfig(
            url=rest,
            ca_file=None,
            client_certificate=False,
            connect_timeout_s=5.0,
            read_timeout_s=60.0,
            total_timeout_s=300.0,
            max_connections=100,
            replay_max_bytes=1048576,
        ),
        listen=ListenConfig(
            host="127.0.0.1",
            port=8080,
            allowed_hosts=("localhost", "127.0.0.1", "::1"),
            max_body_bytes=67108864,
            body_read_timeout_s=30.0,
            keepalive_timeout_s=15.0,
            drain_timeout_s=20.0,
            max_in_flight=256,
            workers=1,
            shared_secret_file=None,
            shared_secret=None,
        ),
        admin=AdminConfig(host="127.0.0.1", port=9090),
        routes=(Route(prefix="/REST/demo/v1", scopes=frozenset(), upstream=rest),),
        source=tmp_path / "ksz-proxy.toml",
    )
    assert config.client.private_key is None
    assert config.client.certificate is None
    assert config.client.password_file is None
    assert config.client.password_env is None
    assert config.client.password is None
    assert config.listen.allowed_hosts == DEFAULT_ALLOWED_HOSTS
    assert config.listen.is_loopback


FULL: Final[Mapping[str, Any]] = {
    "environment": "production",
    "channel": "internet",
    "client": {
        "id": "other:consult:client:confidential",
        "pkcs12": "client.p12",
        "password_file": "password.txt",
    },
    "oauth": {
        "token_url": "https://token.example/REST/oauth/v5/token",
        "discovery_url": "https://token.example/.well-known/oauth-authorization-server",
        "audience": "https://oauth-v5.example",
        "algorithm": "ES256",
        "key_id": "x5t#S256",
        "assertion_lifetime_s": 120,
        "scopes": ["scope:a", "scope:b"],
        "ca_file": "oauth-ca.pem",
        "proxy": "direct",
        "timeout_s": 2.5,
        "send_client_id": True,
        "refresh_ratio": 0.5,
        "retry_initial_s": 0.25,
        "retry_max_s": 30,
        "default_expires_in_s": 600,
    },
    "upstream": {
        "url": "https://rest.example:8443/",
        "ca_file": "upstream-ca.pem",
        "client_certificate": True,
        "proxy": "egress",
        "connect_timeout_s": 1.5,
        "read_timeout_s": 20,
        "total_timeout_s": 90,
        "max_connections": 7,
        "replay_max_bytes": 4096,
    },
    "listen": {
        "host": ANY_HOST,
        "port": 18080,
        "allowed_hosts": ["Proxy.Internal", "[::1]", "10.0.0.5"],
        "max_body_bytes": 1000,
        "body_read_timeout_s": 3,
        "keepalive_timeout_s": 4.5,
        "drain_timeout_s": 7.5,
        "max_in_flight": 9,
        "max_receiving": 11,
        "workers": 3,
        "shared_secret_file": "shared.key",
    },
    "admin": {"host": "::1", "port": 19090},
    "log": {"level": "warning"},
    "routes": [
        {"prefix": "/REST/b/v1"},
        {
            "prefix": "/REST/alpha/v1/",
            "scopes": ["scope:c"],
            "upstream": "https://other.example/",
            "proxy": "http://other-proxy.example:8080",
        },
    ],
    "egress": {
        "proxy_url": "http://proxy.partner.local:3128",
        "proxy_user": "svc-ksz",
        "proxy_password_file": "proxy.password",
        "no_proxy": ["b2b-acpt.ksz-bcss.fgov.be", ".internal.example"],
        "from_environment": False,
    },
}

FULL_PEM: Final[Mapping[str, Any]] = {
    "client": {
        "id": "partner",
        "private_key": "client.key",
        "certificate": "client.crt",
        "password_env": "KSZ_KEY_PASSWORD",
    },
    # Every [[clients]] key; loaded in test_config_clients.py (upstream.client_certificate,
    # set in FULL, needs a single client).
    "clients": [
        {
            "name": "daas",
            "id": "other:daas:client:confidential",
            "pkcs12": "daas.p12",
            "password_file": "daas-password.txt",
            "algorithm": "PS256",
            "key_id": "x5t",
            "audience": "https://aud.daas.example",
            "assertion_lifetime_s": 60,
            "scopes": ["scope:daas:consult"],
        },
        {
            "name": "consult",
            "id": "other:consult:client:confidential",
            "private_key": "consult.key",
            "certificate": "consult.crt",
            "password_env": "KSZ_CONSULT_KEY_PASSWORD",
        },
    ],
    "routes": [{"prefix": "/REST/daas/v1", "client": "daas"}],
    "egress": {"proxy_password_env": "KSZ_PROXY_PASSWORD"},
}


def keys_of(data: Mapping[str, Any]) -> dict[str, set[str]]:
    """Return the keys a config document sets, per table, as KNOWN_KEYS spells them."""
    found: dict[str, set[str]] = {"": set(data)}
    for name, value in data.items():
        items = value if isinstance(value, list) else [value]
        for item in items:
            if isinstance(item, dict):
                found.setdefault(name, set()).update(item)
    return found


def test_known_keys_match_the_dataclasses() -> None:
    # Filled by the loader, not keys ([egress] becomes an EgressPolicy: see test_egress.py).
    derived = {"source", "password", "shared_secret", "where", "proxy_key"}
    tables = {
        "": Config,
        "clients": ClientConfig,
        "oauth": OAuthConfig,
        "upstream": UpstreamConfig,
        "listen": ListenConfig,
        "admin": AdminConfig,
        "log": LogConfig,
        "routes": Route,
    }
    for name, cls in tables.items():
        fields = {f.name for f in dataclasses.fields(cls)} - derived
        if cls is Config:
            fields.add("client")  # [client] is clients[0], named "default"
        assert fields == KNOWN_KEYS[name], name
    # [client] takes the key files of a client; its assertion settings are [oauth]'s.
    assert KNOWN_KEYS["client"] < KNOWN_KEYS["clients"]


def test_the_full_configs_set_every_known_key() -> None:
    full, pem = keys_of(FULL), keys_of(FULL_PEM)
    for name, keys in KNOWN_KEYS.items():
        assert full.get(name, set()) | pem.get(name, set()) == keys, name


def test_every_key_set_explicitly(tmp_path: Path) -> None:
    write(tmp_path / "password.txt", CANARY + "\n")
    write(tmp_path / "shared.key", "s3cret-shared\n")
    write(tmp_path / "oauth-ca.pem", ca_pem(), 0o644)
    write(tmp_path / "upstream-ca.pem", ca_pem(), 0o644)
    write(tmp_path / "proxy.password", "proxy-" + CANARY + "\n")
    path = write(tmp_path / "ksz-proxy.toml", to_toml(FULL), 0o644)
    config = load_config(path, {})
    authorization = Secret(basic_authorization("svc-ksz", "proxy-" + CANARY))
    proxy = ProxyServer(
        host="proxy.partner.local",
        port=3128,
        authorization=authorization,
        source="egress.proxy_url",
    )
    assert config == Config(
        environment="prod",
        channel="internet",
        clients=(
            ClientConfig(
                id="other:consult:client:confidential",
                pkcs12=tmp_path / "client.p12",
                password_file=tmp_path / "password.txt",
                password=Secret(CANARY),
                algorithm="ES256",
                key_id="x5t#S256",
                audience="https://oauth-v5.example",
                assertion_lifetime_s=120,
                scopes=frozenset({"scope:a", "scope:b"}),
            ),
        ),
        oauth=OAuthConfig(
            token_url="https://token.example/REST/oauth/v5/token",
            discovery_url="https://token.example/.well-known/oauth-authorization-server",
            audience="https://oauth-v5.example",
            algorithm="ES256",
            key_id="x5t#S256",
            assertion_lifetime_s=120,
            scopes=frozenset({"scope:a", "scope:b"}),
            ca_file=tmp_path / "oauth-ca.pem",
            proxy="direct",
            timeout_s=2.5,
            send_client_id=True,
            refresh_ratio=0.5,
            retry_initial_s=0.25,
            retry_max_s=30.0,
            default_expires_in_s=600,
        ),
        upstream=UpstreamConfig(
            url="https://rest.example:8443",
            ca_file=tmp_path / "upstream-ca.pem",
            client_certificate=True,
            connect_timeout_s=1.5,
            read_timeout_s=20.0,
            total_timeout_s=90.0,
            max_connections=7,
            replay_max_bytes=4096,
        ),
        listen=ListenConfig(
            host=ANY_HOST,
            port=18080,
            allowed_hosts=("proxy.internal", "::1", "10.0.0.5"),
            max_body_bytes=1000,
            body_read_timeout_s=3.0,
            keepalive_timeout_s=4.5,
            drain_timeout_s=7.5,
            max_in_flight=9,
            max_receiving=11,
            workers=3,
            shared_secret_file=tmp_path / "shared.key",
            shared_secret=Secret("s3cret-shared"),
        ),
        admin=AdminConfig(host="::1", port=19090),
        log=LogConfig(level="warning"),
        routes=(
            Route(
                prefix="/REST/alpha/v1",
                scopes=frozenset({"scope:c"}),
                upstream="https://other.example",
                proxy=ProxyServer(
                    host="other-proxy.example",
                    port=8080,
                    authorization=authorization,
                    source="routes[1].proxy",
                ),
                proxy_key="routes[1].proxy",
            ),
            Route(
                prefix="/REST/b/v1",
                scopes=frozenset({"scope:a", "scope:b"}),
                upstream="https://rest.example:8443",
            ),
        ),
        egress=EgressPolicy(
            mode="explicit",
            proxy=proxy,
            no_proxy=parse_no_proxy(
                ["b2b-acpt.ksz-bcss.fgov.be", ".internal.example"], "egress.no_proxy"
            ),
            authorization=authorization,
        ),
        source=path,
    )
    assert not config.listen.is_loopback
    assert isinstance(config.oauth.timeout_s, float)
    assert isinstance(config.upstream.read_timeout_s, float)


def test_pem_key_with_password_from_the_environment(tmp_path: Path) -> None:
    patch = {"client": {**FULL_PEM["client"], "pkcs12": DROP}}
    config = load(tmp_path, patch, {"KSZ_KEY_PASSWORD": CANARY})
    assert config.client == ClientConfig(
        id="partner",
        private_key=tmp_path / "client.key",
        certificate=tmp_path / "client.crt",
        password_env="KSZ_KEY_PASSWORD",
        password=Secret(CANARY),
    )


def test_non_loopback_listen_host_is_allowed(tmp_path: Path) -> None:
    # Allowed on purpose (a container's published port); the proxy warns when it starts.
    config = load(tmp_path, {"listen": {"host": ANY_HOST}})
    assert not config.listen.is_loopback


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("10.1.2.3", False),
        ("::", False),
        ("proxy.internal", False),
    ],
)
def test_listen_is_loopback(tmp_path: Path, host: str, loopback: bool) -> None:
    assert load(tmp_path, {"listen": {"host": host}}).listen.is_loopback is loopback


def test_zero_limits_are_allowed(tmp_path: Path) -> None:
    config = load(
        tmp_path, {"listen": {"max_body_bytes": 0, "port": 0}, "upstream": {"replay_max_bytes": 0}}
    )
    assert config.listen.max_body_bytes == 0
    assert config.listen.port == 0
    assert config.upstream.replay_max_bytes == 0


def test_ephemeral_ports_may_coincide(tmp_path: Path) -> None:
    config = load(tmp_path, {"listen": {"port": 0}, "admin": {"port": 0}})
    assert (config.listen.port, config.admin.port) == (0, 0)


def test_same_port_on_distinct_addresses(tmp_path: Path) -> None:
    config = load(tmp_path, {"listen": {"host": "192.0.2.10"}, "admin": {"port": 8080}})
    assert config.listen.port == config.admin.port == 8080


@pytest.mark.parametrize(
    "key_id", ["none", "x5t", "x5t#S256", "7F:3A:partner-key", "literal with spaces"]
)
def test_key_id_modes(tmp_path: Path, key_id: str) -> None:
    assert load(tmp_path, {"oauth": {"key_id": key_id}}).oauth.key_id == key_id


@pytest.mark.parametrize("algorithm", ["RS256", "PS256", "ES256"])
def test_algorithms(tmp_path: Path, algorithm: str) -> None:
    assert load(tmp_path, {"oauth": {"algorithm": algorithm}}).oauth.algorithm == algorithm


# --------------------------------------------------------------------------------------------
# Routes


def test_routes_longest_prefix_first_and_trailing_slash_dropped(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "routes": [
                {"prefix": "/REST"},
                {"prefix": "/REST/demo/v1/"},
                {"prefix": "/REST/demo"},
                {"prefix": "/REST/other/v22"},
            ]
        },
    )
    assert [r.prefix for r in config.routes] == [
        "/REST/other/v22",
        "/REST/demo/v1",
        "/REST/demo",
        "/REST",
    ]


def test_route_scopes_and_upstream_override_the_defaults(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "oauth": {"scopes": ["scope:default"]},
            "routes": [
                {"prefix": "/REST/a", "scopes": ["scope:cbss:api:a:consult"]},
                {"prefix": "/REST/bb"},
                {"prefix": "/REST/ccc", "scopes": []},
                {"prefix": "/REST/dddd", "upstream": "https://other.example:4543"},
            ],
        },
    )
    default = ENDPOINTS[("acpt", "extranet")][1]
    assert config.routes == (
        Route(
            prefix="/REST/dddd",
            scopes=frozenset({"scope:default"}),
            upstream="https://other.example:4543",
        ),
        Route(prefix="/REST/ccc", scopes=frozenset(), upstream=default),
        Route(prefix="/REST/bb", scopes=frozenset({"scope:default"}), upstream=default),
        Route(prefix="/REST/a", scopes=frozenset({"scope:cbss:api:a:consult"}), upstream=default),
    )


def test_scope_sets_are_distinct_in_route_order(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        {
            "oauth": {"scopes": ["d"]},
            "routes": [
                {"prefix": "/a", "scopes": ["s1"]},
                {"prefix": "/bb"},
                {"prefix": "/ccc", "scopes": ["s1"]},
                {"prefix": "/dddd", "scopes": ["s3", "s2"]},
                {"prefix": "/e", "scopes": []},
                {"prefix": "/ffffff", "scopes": ["d"]},
            ],
        },
    )
    assert [r.prefix for r in config.routes] == ["/ffffff", "/dddd", "/ccc", "/bb", "/a", "/e"]
    assert config.scope_sets == (
        frozenset({"d"}),
        frozenset({"s2", "s3"}),
        frozenset({"s1"}),
        frozenset(),
    )


@pytest.mark.parametrize(
    ("path", "matches"),
    [
        ("/REST/demo/v1", True),
        ("/REST/demo/v1/", True),
        ("/REST/demo/v1/x", True),
        ("/REST/demo/v1/x/y", True),
        ("/REST/demo/v10", False),
        ("/REST/demo/v1x/y", False),
        ("/REST/demo", False),
        ("/REST/demo/v", False),
        ("/rest/demo/v1", False),
        ("", False),
    ],
)
def test_route_matches_on_whole_segments(path: str, matches: bool) -> None:
    route = Route(prefix="/REST/demo/v1", scopes=frozenset(), upstream="https://rest.example")
    assert route.matches(path) is matches


# --------------------------------------------------------------------------------------------
# Refusals: each message starts with the key path


UNKNOWN_KEY_CASES = [
    ({"tiemout_s": 3}, "tiemout_s"),
    ({"client": {"pkcs_12": "x.p12"}}, "client.pkcs_12"),
    ({"oauth": {"timout_s": 3}}, "oauth.timout_s"),
    ({"upstream": {"read_timeout": 3}}, "upstream.read_timeout"),
    ({"listen": {"adress": "127.0.0.1"}}, "listen.adress"),
    ({"admin": {"prot": 9091}}, "admin.prot"),
    ({"routes": [{"prefix": "/REST/a", "scope": ["x"]}]}, "routes[0].scope"),
    ({"routes": [{"prefix": "/REST/a"}, {"prefix": "/REST/b", "url": "x"}]}, "routes[1].url"),
]


@pytest.mark.parametrize(
    ("patch", "where"), UNKNOWN_KEY_CASES, ids=[w for _, w in UNKNOWN_KEY_CASES]
)
def test_unknown_keys_are_errors(tmp_path: Path, patch: dict[str, Any], where: str) -> None:
    assert failure(tmp_path, patch).startswith(f"{where}: unknown key (")


ERROR_CASES: list[tuple[dict[str, Any], str]] = [
    # top level
    ({"environment": "staging"}, "environment: must be one of test, acpt, prod"),
    ({"environment": ""}, "environment: must be one of"),
    ({"environment": 1}, "environment: must be a string"),
    ({"channel": "intranet"}, "channel: must be one of extranet, internet"),
    ({"channel": True}, "channel: must be a string"),
    ({"client": "x"}, "client: must be a table"),
    ({"oauth": ["x"]}, "oauth: must be a table"),
    ({"routes": DROP}, "routes: at least one [[routes]] entry is required"),
    ({"routes": []}, "routes: at least one [[routes]] entry is required"),
    ({"routes": {"prefix": "/REST/a"}}, "routes: must be an array of tables"),
    ({"routes": ["/REST/a"]}, "routes: must be an array of tables"),
    # client
    ({"client": DROP}, "client: section [client] (or a [[clients]] entry) is required"),
    ({"client": {"id": DROP}}, "client.id: required"),
    ({"client": {"id": " "}}, "client.id: must be a non-empty printable string"),
    ({"client": {"id": "a\nb"}}, "client.id: must be a non-empty printable string"),
    ({"client": {"id": 7}}, "client.id: must be a string"),
    ({"client": {"pkcs12": DROP}}, "client.pkcs12: required"),
    ({"client": {"pkcs12": ""}}, "client.pkcs12: must not be empty"),
    ({"client": {"pkcs12": "a\u0000b"}}, "client.pkcs12: must not contain a NUL character"),
    ({"client": {"private_key": "k.pem"}}, "client.pkcs12: set either pkcs12 or private_key"),
    ({"client": {"certificate": "c.pem"}}, "client.pkcs12: set either pkcs12 or private_key"),
    (
        {"client": {"pkcs12": DROP, "private_key": "k.pem"}},
        "client.certificate: required with client.private_key",
    ),
    (
        {"client": {"pkcs12": DROP, "certificate": "c.pem"}},
        "client.private_key: required with client.certificate",
    ),
    (
        {"client": {"password_file": "pw", "password_env": "PW"}},
        "client.password_file: set password_file or password_env, not both",
    ),
    ({"client": {"password_env": "1PW"}}, "client.password_env: must be an environment variable"),
    ({"client": {"password_env": "KSZ_PW"}}, "client.password_env: environment variable KSZ_PW"),
    ({"client": {"password_file": "missing.txt"}}, "client.password_file: file "),
    # oauth
    ({"oauth": {"token_url": "http://token.example/t"}}, "oauth.token_url: must be an https URL"),
    ({"oauth": {"token_url": "token.example/t"}}, "oauth.token_url: must be an https URL"),
    ({"oauth": {"token_url": "https:///t"}}, "oauth.token_url: must be an https URL"),
    ({"oauth": {"token_url": "https://a.example/t\n"}}, "oauth.token_url: must be an https URL"),
    ({"oauth": {"token_url": "https://a .example/t"}}, "oauth.token_url: must be an https URL"),
    (
        {"oauth": {"token_url": "https://user:pw@token.example/t"}},
        "oauth.token_url: must not contain credentials",
    ),
    ({"oauth": {"token_url": "https://token.example/t#x"}}, "oauth.token_url: must not contain a"),
    ({"oauth": {"token_url": "https://token.example:99999/t"}}, "oauth.token_url: has an invalid"),
    ({"oauth": {"discovery_url": "http://a.example/x"}}, "oauth.discovery_url: must be an https"),
    ({"oauth": {"audience": ""}}, "oauth.audience: must not be empty"),
    ({"oauth": {"algorithm": "HS256"}}, "oauth.algorithm: must be one of RS256, PS256, ES256"),
    ({"oauth": {"algorithm": "rs256"}}, "oauth.algorithm: must be one of"),
    ({"oauth": {"key_id": ""}}, "oauth.key_id: must be none"),
    ({"oauth": {"key_id": "a\tb"}}, "oauth.key_id: must be none"),
    ({"oauth": {"assertion_lifetime_s": 9}}, "oauth.assertion_lifetime_s: must be between 10"),
    ({"oauth": {"assertion_lifetime_s": 3601}}, "oauth.assertion_lifetime_s: must be between"),
    ({"oauth": {"assertion_lifetime_s": 300.0}}, "oauth.assertion_lifetime_s: must be an integer"),
    ({"oauth": {"assertion_lifetime_s": True}}, "oauth.assertion_lifetime_s: must be an integer"),
    ({"oauth": {"scopes": "scope:demo:consult"}}, "oauth.scopes: must be a list of strings"),
    ({"oauth": {"scopes": [1]}}, "oauth.scopes: must be a list of strings"),
    ({"oauth": {"scopes": ["a b"]}}, "oauth.scopes[0]: not a valid OAuth scope"),
    ({"oauth": {"scopes": ["ok", ""]}}, "oauth.scopes[1]: not a valid OAuth scope"),
    ({"oauth": {"scopes": ['a"b']}}, "oauth.scopes[0]: not a valid OAuth scope"),
    ({"oauth": {"scopes": ["a\\b"]}}, "oauth.scopes[0]: not a valid OAuth scope"),
    ({"oauth": {"scopes": ["caf\u00e9"]}}, "oauth.scopes[0]: not a valid OAuth scope"),
    ({"oauth": {"ca_file": "missing-ca.pem"}}, "oauth.ca_file: file "),
    ({"oauth": {"timeout_s": True}}, "oauth.timeout_s: must be a number"),
    ({"oauth": {"timeout_s": "10"}}, "oauth.timeout_s: must be a number"),
    ({"oauth": {"timeout_s": 0}}, "oauth.timeout_s: must be between 0.1 and 300"),
    ({"oauth": {"timeout_s": math.nan}}, "oauth.timeout_s: must be between"),
    ({"oauth": {"timeout_s": math.inf}}, "oauth.timeout_s: must be between"),
    ({"oauth": {"send_client_id": 1}}, "oauth.send_client_id: must be true or false"),
    ({"oauth": {"send_client_id": "yes"}}, "oauth.send_client_id: must be true or false"),
    ({"oauth": {"refresh_ratio": 0.99}}, "oauth.refresh_ratio: must be between 0.1 and 0.95"),
    ({"oauth": {"refresh_ratio": 0}}, "oauth.refresh_ratio: must be between"),
    ({"oauth": {"retry_initial_s": 0}}, "oauth.retry_initial_s: must be between"),
    ({"oauth": {"retry_max_s": 3601}}, "oauth.retry_max_s: must be between"),
    (
        {"oauth": {"retry_initial_s": 5, "retry_max_s": 2}},
        "oauth.retry_max_s: must be >= oauth.retry_initial_s",
    ),
    ({"oauth": {"default_expires_in_s": 9}}, "oauth.default_expires_in_s: must be between"),
    # upstream
    ({"upstream": {"url": "http://rest.example"}}, "upstream.url: must be an https URL"),
    ({"upstream": {"url": "https://u:p@rest.example"}}, "upstream.url: must not contain cred"),
    ({"upstream": {"url": "https://rest.example/REST"}}, "upstream.url: must be an origin only"),
    ({"upstream": {"url": "https://rest.example/?a=1"}}, "upstream.url: must be an origin only"),
    ({"upstream": {"url": "https://rest.example:0x1"}}, "upstream.url: has an invalid port"),
    ({"upstream": {"url": 4543}}, "upstream.url: must be a string"),
    ({"upstream": {"ca_file": "missing-ca.pem"}}, "upstream.ca_file: file "),
    ({"upstream": {"client_certificate": "true"}}, "upstream.client_certificate: must be true"),
    ({"upstream": {"connect_timeout_s": 301}}, "upstream.connect_timeout_s: must be between"),
    ({"upstream": {"read_timeout_s": 0.05}}, "upstream.read_timeout_s: must be between"),
    ({"upstream": {"total_timeout_s": -1}}, "upstream.total_timeout_s: must be between"),
    ({"upstream": {"max_connections": 0}}, "upstream.max_connections: must be between 1 and"),
    ({"upstream": {"max_connections": False}}, "upstream.max_connections: must be an integer"),
    ({"upstream": {"replay_max_bytes": -1}}, "upstream.replay_max_bytes: must be between 0"),
    # listen
    ({"listen": {"host": ""}}, "listen.host: must be a host name or IP address"),
    ({"listen": {"host": "[::1]"}}, "listen.host: must be a host name or IP address"),
    ({"listen": {"host": "http://localhost"}}, "listen.host: must be a host name"),
    ({"listen": {"port": 65536}}, "listen.port: must be between 0 and 65535"),
    ({"listen": {"port": -1}}, "listen.port: must be between 0 and 65535"),
    ({"listen": {"port": "8080"}}, "listen.port: must be an integer"),
    ({"listen": {"port": True}}, "listen.port: must be an integer"),
    ({"listen": {"port": 8080.0}}, "listen.port: must be an integer"),
    ({"listen": {"allowed_hosts": []}}, "listen.allowed_hosts: must name at least one host"),
    ({"listen": {"allowed_hosts": "localhost"}}, "listen.allowed_hosts: must be a list"),
    ({"listen": {"allowed_hosts": ["ok", ""]}}, "listen.allowed_hosts[1]: must be a host name"),
    ({"listen": {"allowed_hosts": ["a b"]}}, "listen.allowed_hosts[0]: must be a host name"),
    ({"listen": {"allowed_hosts": [" a"]}}, "listen.allowed_hosts[0]: must be a host name"),
    ({"listen": {"allowed_hosts": ["u@a"]}}, "listen.allowed_hosts[0]: must be a host name"),
    (
        {"listen": {"allowed_hosts": ["localhost:8080"]}},
        "listen.allowed_hosts[0]: must be a host name without a port",
    ),
    (
        {"listen": {"allowed_hosts": ["[::1]:8080"]}},
        "listen.allowed_hosts[0]: must be a host name without a port",
    ),
    ({"listen": {"max_body_bytes": -1}}, "listen.max_body_bytes: must be between 0"),
    ({"listen": {"body_read_timeout_s": 0}}, "listen.body_read_timeout_s: must be between"),
    ({"listen": {"keepalive_timeout_s": 3601}}, "listen.keepalive_timeout_s: must be between"),
    ({"listen": {"drain_timeout_s": -1}}, "listen.drain_timeout_s: must be between"),
    ({"listen": {"max_in_flight": 0}}, "listen.max_in_flight: must be between 1"),
    ({"listen": {"shared_secret_file": "missing.key"}}, "listen.shared_secret_file: file "),
    # admin
    ({"admin": {"port": 8080}}, "admin.port: must differ from listen.port"),
    ({"admin": {"port": 8080, "host": "localhost"}}, "admin.port: must differ from listen.port"),
    (
        {"admin": {"port": 8080}, "listen": {"host": ANY_HOST}},
        "admin.port: must differ from listen.port",
    ),
    (
        {"admin": {"port": 8080, "host": "::"}, "listen": {"host": "::1"}},
        "admin.port: must differ from listen.port",
    ),
    ({"admin": {"port": 70000}}, "admin.port: must be between 0 and 65535"),
    ({"admin": {"host": "a/b"}}, "admin.host: must be a host name or IP address"),
    # routes
    ({"routes": [{"scopes": ["x"]}]}, "routes[0].prefix: required"),
    ({"routes": [{"prefix": 1}]}, "routes[0].prefix: must be a string"),
    ({"routes": [{"prefix": "/"}]}, 'routes[0].prefix: must start with "/"'),
    ({"routes": [{"prefix": ""}]}, 'routes[0].prefix: must start with "/"'),
    ({"routes": [{"prefix": "REST/demo"}]}, 'routes[0].prefix: must start with "/"'),
    ({"routes": [{"prefix": "//x"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a//b"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a//"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a/../b"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a/./b"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a/.."}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a%2f"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a%2e%2e"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a b"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a?x=1"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a#x"}]}, "routes[0].prefix: must be plain path segments"),
    ({"routes": [{"prefix": "/a\\b"}]}, "routes[0].prefix: must be plain path segments"),
    (
        {"routes": [{"prefix": "/REST/a"}, {"prefix": "/REST/a/"}]},
        "routes[1].prefix: /REST/a is configured twice",
    ),
    ({"routes": [{"prefix": "/a", "scopes": ["x y"]}]}, "routes[0].scopes[0]: not a valid OAuth"),
    ({"routes": [{"prefix": "/a", "scopes": "x"}]}, "routes[0].scopes: must be a list of strings"),
    (
        {"routes": [{"prefix": "/a", "upstream": "https://r.example/REST"}]},
        "routes[0].upstream: must be an origin only",
    ),
    (
        {"routes": [{"prefix": "/a", "upstream": "http://r.example"}]},
        "routes[0].upstream: must be an https URL",
    ),
]


@pytest.mark.parametrize(("patch", "expected"), ERROR_CASES, ids=[e for _, e in ERROR_CASES])
def test_refusals_name_the_key(tmp_path: Path, patch: dict[str, Any], expected: str) -> None:
    assert failure(tmp_path, patch).startswith(expected)


def test_password_env_unset_names_the_variable(tmp_path: Path) -> None:
    patch = {"client": {"password_env": "KSZ_KEY_PASSWORD"}}
    text = failure(tmp_path, patch, {"OTHER": "x"})
    assert text == "client.password_env: environment variable KSZ_KEY_PASSWORD is not set"
    assert failure(tmp_path, patch, {"KSZ_KEY_PASSWORD": ""}).startswith("client.password_env:")


# --------------------------------------------------------------------------------------------
# Secret files


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660, 0o444])
def test_password_file_readable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    pw = write(tmp_path / "password.txt", CANARY + "\n", mode)
    text = failure(tmp_path, {"client": {"password_file": "password.txt"}})
    assert text.startswith(f"client.password_file: {pw} is readable by group or others")
    assert f"{mode:04o}" in text
    assert CANARY not in text


def test_password_file_mode_0640_is_named(tmp_path: Path) -> None:
    pw = write(tmp_path / "password.txt", CANARY, 0o640)
    text = failure(tmp_path, {"client": {"password_file": "password.txt"}})
    assert text == (
        f"client.password_file: {pw} is readable by group or others (mode 0640); "
        f"run: chmod 600 {pw}"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700, 0o602])
def test_password_file_private_modes_are_accepted(tmp_path: Path, mode: int) -> None:
    # The rule is about reading: a file writable by others is odd, but not a disclosure.
    write(tmp_path / "password.txt", CANARY, mode)
    config = load(tmp_path, {"client": {"password_file": "password.txt"}})
    assert config.client.password == Secret(CANARY)
    assert config.client.password_file == tmp_path / "password.txt"


@pytest.mark.parametrize(
    ("content", "password"),
    [
        (CANARY, CANARY),
        (CANARY + "\n", CANARY),
        (CANARY + "\r\n", CANARY),
        (CANARY + "\n\n", CANARY + "\n"),
        (" " + CANARY + " \n", " " + CANARY + " "),
    ],
)
def test_password_file_drops_one_trailing_newline(
    tmp_path: Path, content: str, password: str
) -> None:
    write(tmp_path / "password.txt", content)
    config = load(tmp_path, {"client": {"password_file": "password.txt"}})
    assert config.client.password is not None
    assert config.client.password.reveal() == password


@pytest.mark.parametrize("content", [b"", b"\n", b"\r\n"])
def test_empty_password_file_is_refused(tmp_path: Path, content: bytes) -> None:
    pw = write(tmp_path / "password.txt", content)
    text = failure(tmp_path, {"client": {"password_file": "password.txt"}})
    assert text == f"client.password_file: {pw} is empty"


def test_password_file_must_be_utf8_text(tmp_path: Path) -> None:
    pw = write(tmp_path / "password.txt", b"\xff\xfe")
    text = failure(tmp_path, {"client": {"password_file": "password.txt"}})
    assert text == f"client.password_file: {pw} is not UTF-8 text"


def test_password_file_missing_or_a_directory(tmp_path: Path) -> None:
    text = failure(tmp_path, {"client": {"password_file": "nowhere.txt"}})
    assert text == f"client.password_file: file {tmp_path / 'nowhere.txt'} does not exist"
    (tmp_path / "dir").mkdir(mode=0o700)
    text = failure(tmp_path, {"client": {"password_file": "dir"}})
    assert text == f"client.password_file: {tmp_path / 'dir'} is not a regular file"


def test_shared_secret_file(tmp_path: Path) -> None:
    write(tmp_path / "proxy.key", CANARY + "\n", 0o400)
    config = load(tmp_path, {"listen": {"shared_secret_file": "proxy.key"}})
    assert config.listen.shared_secret == Secret(CANARY)
    assert config.listen.shared_secret_file == tmp_path / "proxy.key"
    (tmp_path / "proxy.key").chmod(0o644)
    text = failure(tmp_path, {"listen": {"shared_secret_file": "proxy.key"}})
    assert text.startswith("listen.shared_secret_file: ")
    assert "(mode 0644)" in text


# --------------------------------------------------------------------------------------------
# The file itself


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.detail == f"config: file {path} does not exist"


def test_config_path_is_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path, {})
    assert caught.value.detail.startswith(f"config: cannot read {tmp_path}")


@pytest.mark.parametrize(
    "text",
    [
        'environment = "acpt\n',
        "environment = acpt\n",
        "[client]\nid = 1\nid = 2\n",
        "[[routes]]\nprefix =\n",
    ],
)
def test_invalid_toml(tmp_path: Path, text: str) -> None:
    path = write(tmp_path / "ksz-proxy.toml", text, 0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.detail.startswith(f"config: {path} is not valid TOML (")


def test_config_must_be_utf8(tmp_path: Path) -> None:
    path = write(tmp_path / "ksz-proxy.toml", b'environment = "\xe9"\n', 0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert caught.value.detail == f"config: {path} is not UTF-8 text"


def test_relative_paths_resolve_against_the_config_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    etc = tmp_path / "etc"
    write(etc / "secrets" / "password", CANARY)
    write(etc / "secrets" / "proxy.key", "shared")
    write(etc / "ca" / "oauth.pem", ca_pem(), 0o644)
    write(etc / "ca" / "upstream.pem", ca_pem(), 0o644)
    data = patched(
        {
            "client": {"pkcs12": "keys/acpt.p12", "password_file": "secrets/password"},
            "oauth": {"ca_file": "ca/oauth.pem"},
            "upstream": {"ca_file": "ca/upstream.pem"},
            "listen": {"shared_secret_file": "secrets/proxy.key"},
        }
    )
    write(etc / "ksz-proxy.toml", to_toml(data), 0o644)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(tmp_path)
    config = load_config("etc/ksz-proxy.toml", {})
    # Absolute, so a later change of working directory cannot move them.
    assert config.client.pkcs12 == etc / "keys" / "acpt.p12"
    assert config.client.password_file == etc / "secrets" / "password"
    assert config.oauth.ca_file == etc / "ca" / "oauth.pem"
    assert config.upstream.ca_file == etc / "ca" / "upstream.pem"
    assert config.listen.shared_secret_file == etc / "secrets" / "proxy.key"
    monkeypatch.chdir(elsewhere)
    assert config.client.pkcs12.is_absolute()
    assert config.client.pkcs12.parent.parent == etc


def test_absolute_paths_stay(tmp_path: Path) -> None:
    p12 = tmp_path / "elsewhere" / "acpt.p12"
    config = load(tmp_path / "conf", {"client": {"pkcs12": str(p12)}})
    assert config.client.pkcs12 == p12


# --------------------------------------------------------------------------------------------
# Secrets never leak


def test_secret_hides_its_value() -> None:
    secret = Secret(CANARY)
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "***"
    assert f"{secret}" == "***"
    assert CANARY not in repr([secret]) + repr({"k": secret})
    assert secret.reveal() == CANARY
    assert secret == Secret(CANARY)
    assert secret != Secret("other")
    assert secret != CANARY
    with pytest.raises(TypeError):
        pickle.dumps(secret)


def test_password_not_in_config_repr(tmp_path: Path) -> None:
    write(tmp_path / "proxy.key", CANARY + "-shared")
    config = load(
        tmp_path,
        {
            "client": {"password_env": "KSZ_KEY_PASSWORD"},
            "listen": {"shared_secret_file": "proxy.key"},
        },
        {"KSZ_KEY_PASSWORD": CANARY},
    )
    assert config.client.password == Secret(CANARY)
    for text in (repr(config), str(config), repr(config.client), repr(config.listen)):
        assert CANARY not in text


CANARY_CASES: list[dict[str, Any]] = [
    {"oauth": {"timeout_s": -1}},
    {"routes": [{"prefix": "/a"}, {"prefix": "/a"}]},
    {"listen": {"port": 8080}, "admin": {"port": 8080}},
    {"tiemout_s": CANARY},
    {"environment": CANARY},
    {"channel": CANARY},
    {"client": {"id": CANARY + "\n"}},
    {"oauth": {"token_url": f"https://user:{CANARY}@token.example/t"}},
    {"oauth": {"token_url": f"http://{CANARY}.example/t"}},
    {"oauth": {"discovery_url": f"https://token.example/t\n{CANARY}"}},
    {"oauth": {"key_id": CANARY + "\n"}},
    {"oauth": {"algorithm": CANARY}},
    {"oauth": {"scopes": [CANARY + " x"]}},
    {"upstream": {"url": f"https://rest.example/{CANARY}"}},
    {"upstream": {"url": f"https://u:{CANARY}@rest.example"}},
    {"listen": {"allowed_hosts": [CANARY + " "]}},
    {"listen": {"host": CANARY + "/"}},
    {"routes": [{"prefix": f"/a/{CANARY}/%2f"}]},
    {"routes": [{"prefix": "/a", "upstream": f"https://r.example/{CANARY}"}]},
]


@pytest.mark.parametrize("patch", CANARY_CASES)
def test_no_secret_in_error_messages(tmp_path: Path, patch: dict[str, Any]) -> None:
    merged = patched(patch)
    merged.setdefault("client", {})["password_env"] = "KSZ_KEY_PASSWORD"
    path = write(tmp_path / "ksz-proxy.toml", to_toml(merged), 0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"KSZ_KEY_PASSWORD": CANARY})
    for text in (str(caught.value), repr(caught.value), caught.value.detail):
        assert CANARY not in text


def test_no_secret_in_file_errors(tmp_path: Path) -> None:
    write(tmp_path / "password.txt", CANARY, 0o644)
    text = failure(tmp_path, {"client": {"password_file": "password.txt"}})
    assert CANARY not in text
    path = write(tmp_path / "ksz-proxy.toml", f'password = "{CANARY}\n', 0o644)
    with pytest.raises(ConfigError) as caught:
        load_config(path, {})
    assert CANARY not in str(caught.value)
    assert CANARY not in repr(caught.value)


# --------------------------------------------------------------------------------------------
# The example files in config/

EXAMPLES: Final = ["ksz-proxy.example.toml", "test.toml", "acpt.toml", "prod.toml"]
# The partner with two purposes (README "Several client-ids").
TWO_PURPOSES: Final = "two-purposes.toml"
ALL_EXAMPLES: Final = [*EXAMPLES, TWO_PURPOSES]
_SECTION: Final = re.compile(r"^\[\[?([A-Za-z_]+)\]\]?\s*$")
# A whole table shown commented out ("# [[clients]]" and the key lines under it).
_COMMENTED_SECTION: Final = re.compile(r"^#\s?\[\[?([A-Za-z_]+)\]\]?\s*$")
_COMMENTED_KEY: Final = re.compile(r"^#\s?([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$")
# In the reference example these commented values illustrate a key rather than show its
# default (the key has no default, or its default comes from another key).
ILLUSTRATIONS: Final = frozenset(
    {
        "client.private_key",
        "client.certificate",
        "client.password_env",
        "oauth.discovery_url",
        "oauth.audience",
        "oauth.ca_file",
        "upstream.ca_file",
        "listen.shared_secret_file",
        "log.level",
        "routes.scopes",
        "routes.proxy",
        "egress.proxy_url",
        "egress.proxy_user",
        "egress.proxy_password_file",
        "egress.proxy_password_env",
        "egress.no_proxy",
    }
)


def commented_keys(text: str) -> list[tuple[int, str, str]]:
    """Return (line index, section, key) for every ``# key = value`` line of an example.

    Keys of a commented-out table are not among them: see ``commented_tables``.
    """
    found: list[tuple[int, str, str]] = []
    section = ""
    for i, line in enumerate(text.splitlines()):
        if match := _SECTION.match(line):
            section = match.group(1)
        elif _COMMENTED_SECTION.match(line):
            section = "#"  # until the next real table header
        elif match := _COMMENTED_KEY.match(line):
            key, value = match.groups()
            # A commented key line must be a valid TOML line once uncommented.
            tomllib.loads(f"{key} = {value}")
            if section != "#":
                found.append((i, section, key))
    return found


def commented_tables(text: str) -> list[tuple[str, list[int], set[str]]]:
    """Return (section, line indexes, keys) for every commented-out table of an example.

    The lines are its header and its ``# key = value`` lines, up to the first line that is not a
    comment; uncommenting exactly those gives the table.
    """
    found: list[tuple[str, list[int], set[str]]] = []
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if match := _COMMENTED_SECTION.match(line):
            indexes, keys = [i], set()
            for j in range(i + 1, len(lines)):
                if not lines[j].startswith("#"):
                    break
                if key := _COMMENTED_KEY.match(lines[j]):
                    indexes.append(j)
                    keys.add(key.group(1))
            found.append((match.group(1), indexes, keys))
    return found


def uncommented(text: str, indexes: list[int]) -> str:
    """Return ``text`` with the lines at ``indexes`` uncommented."""
    lines = text.splitlines()
    for i in indexes:
        lines[i] = re.sub(r"^#\s?", "", lines[i])
    return "\n".join(lines) + "\n"


def load_example(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Config:
    """Load an example with its password file replaced by a private one in tmp_path."""
    write(tmp_path / "ksz-key-password", CANARY + "\n")
    text, count = re.subn(
        r'^password_file = "[^"]*"$',
        'password_file = "ksz-key-password"',
        text,
        flags=re.MULTILINE,
    )
    assert count == 1
    return load_config(write(tmp_path / "ksz-proxy.toml", text, 0o644), environ or {})


@pytest.mark.parametrize("name", ALL_EXAMPLES)
def test_example_is_valid_toml_with_known_keys_only(name: str) -> None:
    text = (CONFIG_DIR / name).read_text(encoding="utf-8")
    data = tomllib.loads(text)
    for section, keys in keys_of(data).items():
        known = KNOWN_KEYS.get(section, frozenset())
        assert keys <= known, (section, keys - known)
    for _, section, key in commented_keys(text):
        assert key in KNOWN_KEYS.get(section, frozenset()), f"{name}: [{section}] {key}"
    for section, _, keys in commented_tables(text):
        assert section in KNOWN_KEYS[""], f"{name}: [{section}]"
        assert keys <= KNOWN_KEYS[section], f"{name}: [{section}] {keys - KNOWN_KEYS[section]}"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_commented_tables_load(tmp_path: Path, name: str) -> None:
    text = (CONFIG_DIR / name).read_text(encoding="utf-8")
    baseline = load_example(tmp_path, text)
    for section, indexes, _ in commented_tables(text):
        config = load_example(tmp_path, uncommented(text, indexes))
        assert config != baseline, f"{name}:{indexes[0] + 1}: [{section}]"


def test_reference_example_shows_another_client(tmp_path: Path) -> None:
    text = (CONFIG_DIR / EXAMPLES[0]).read_text(encoding="utf-8")
    [(section, indexes, _)] = commented_tables(text)
    assert section == "clients"
    config = load_example(tmp_path, uncommented(text, indexes))
    assert [c.name for c in config.clients] == ["default", "daas"]
    assert config.clients_by_name["daas"].algorithm == "ES256"
    assert config.client.name == "default"
    assert {r.client for r in config.routes} == {"default"}


def test_two_purposes_example(tmp_path: Path) -> None:
    text = (CONFIG_DIR / TWO_PURPOSES).read_text(encoding="utf-8")
    config = load_example(tmp_path, text, {"KSZ_DAAS_KEY_PASSWORD": "daas-" + CANARY})
    assert config.environment == "acpt"
    consult, daas = config.clients
    assert (consult.name, consult.id) == ("default", "other:consult:client:confidential")
    assert consult.password == Secret(CANARY)
    assert consult.algorithm == "RS256"
    assert (daas.name, daas.id) == ("daas", "other:daas:client:confidential")
    assert daas.password == Secret("daas-" + CANARY)
    assert daas.algorithm == "ES256"
    assert daas.pkcs12 is None
    assert daas.certificate is not None
    assert {(r.prefix, r.client, r.scopes) for r in config.routes} == {
        ("/REST/demo/v1", "default", frozenset({"scope:demo:consult"})),
        ("/REST/daas/v1", "daas", frozenset({"scope:daas:consult"})),
    }


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_loads(tmp_path: Path, name: str) -> None:
    config = load_example(tmp_path, (CONFIG_DIR / name).read_text(encoding="utf-8"))
    assert config.channel == "extranet"
    assert config.client.password == Secret(CANARY)
    assert [r.prefix for r in config.routes] == ["/REST/demo/v1"]
    if name != "ksz-proxy.example.toml":
        environment = name.removesuffix(".toml")
        assert config.environment == environment
        assert (config.oauth.token_url, config.upstream.url) == ENDPOINTS[
            (config.environment, "extranet")
        ]
        assert config.client.pkcs12 == Path(f"/etc/ksz-proxy/{environment}.p12")
        assert config.routes[0].scopes == frozenset({"scope:demo:consult"})
        assert config.listen.host == "127.0.0.1"
        assert config.admin.host == "127.0.0.1"


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_commented_keys_are_known_to_the_loader(tmp_path: Path, name: str) -> None:
    # Uncomment each key line alone and load: a misspelled key is an "unknown key" error.
    text = (CONFIG_DIR / name).read_text(encoding="utf-8")
    lines = text.splitlines()
    baseline = load_example(tmp_path, text)
    for i, section, key in commented_keys(text):
        variant = [*lines[:i], re.sub(r"^#\s?", "", lines[i]), *lines[i + 1 :]]
        where = f"{name}:{i + 1}: {section}.{key}"
        try:
            config = load_example(tmp_path, "\n".join(variant) + "\n")
        except ConfigError as exc:
            assert "unknown key" not in exc.detail, where
            assert f"{section}.{key}" in ILLUSTRATIONS or name != EXAMPLES[0], where
            continue
        if name == EXAMPLES[0] and f"{section}.{key}" not in ILLUSTRATIONS:
            # The reference example shows each default: uncommenting it changes nothing.
            assert config == baseline, where


def test_reference_example_mentions_every_key() -> None:
    text = (CONFIG_DIR / EXAMPLES[0]).read_text(encoding="utf-8")
    mentioned = keys_of(tomllib.loads(text))
    for _, section, key in commented_keys(text):
        mentioned.setdefault(section, set()).add(key)
    for section, _, table_keys in commented_tables(text):
        mentioned[""].add(section)
        mentioned.setdefault(section, set()).update(table_keys)
    # A [[clients]] entry's key and password options are those of [client], and say so.
    mentioned["clients"] |= mentioned["client"]
    for section, keys in KNOWN_KEYS.items():
        assert mentioned.get(section, set()) >= keys, (
            section,
            keys - mentioned.get(section, set()),
        )


@pytest.mark.parametrize("section", ["oauth", "upstream"])
def test_a_ca_file_that_holds_no_certificate_names_the_key(tmp_path: Path, section: str) -> None:
    # Found by review: such a file passed the config check and then failed start-up with a
    # traceback, or a SIGHUP reload half-way (a new token provider swapped in, nothing else).
    junk = write(tmp_path / "ca.pem", "not a certificate\n", 0o644)
    data = patched({section: {"ca_file": str(junk)}})
    with pytest.raises(ConfigError, match=rf"^{section}\.ca_file: .* holds no PEM CA certificate"):
        load_config(write(tmp_path / "ksz-proxy.toml", to_toml(data), 0o644), {})
