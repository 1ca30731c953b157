"""Own the configuration: TOML file -> validated, frozen dataclasses.

``load_config(path, environ)`` reads ``ksz-proxy.toml`` and checks everything before it returns.
Every problem raises ``ConfigError`` whose message starts with the key path
(``upstream.url: must be an https URL``) and never contains a secret value. Unknown keys are
errors, so a typo never falls back silently to a default.

The KSZ endpoint table (``proxy/endpoints.py``) is built in: ``environment`` and ``channel``
choose the token endpoint and the REST base; explicit ``oauth.token_url`` / ``upstream.url``
override them. Each default is written once, in its dataclass (``proxy.config_sections``,
re-exported here); the section builders (here, in ``config_clients.py`` and ``config_egress.py``)
read the TOML through ``proxy.config_reader.Table`` and pass on only the keys that are present.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from proxy.config_clients import build_clients, route_client
from proxy.config_egress import build_egress, proxy_choice
from proxy.config_reader import Table, present

# The sections have their own module; every name stays importable from here.
from proxy.config_sections import ALGORITHMS as ALGORITHMS
from proxy.config_sections import DEFAULT_ALLOWED_HOSTS as DEFAULT_ALLOWED_HOSTS
from proxy.config_sections import DEFAULT_CLIENT as DEFAULT_CLIENT
from proxy.config_sections import DEFAULT_CONFIG_NAME as DEFAULT_CONFIG_NAME
from proxy.config_sections import LOG_LEVELS as LOG_LEVELS
from proxy.config_sections import AdminConfig as AdminConfig
from proxy.config_sections import Algorithm as Algorithm
from proxy.config_sections import ClientConfig as ClientConfig
from proxy.config_sections import Config as Config
from proxy.config_sections import ListenConfig as ListenConfig
from proxy.config_sections import LogConfig as LogConfig
from proxy.config_sections import LogLevel as LogLevel
from proxy.config_sections import OAuthConfig as OAuthConfig
from proxy.config_sections import Route as Route
from proxy.config_sections import UpstreamConfig as UpstreamConfig
from proxy.config_sections import default_client as default_client
from proxy.config_sections import is_loopback_host
from proxy.egress import EgressPolicy
from proxy.endpoints import CHANNELS, ENDPOINTS, ENVIRONMENT_ALIASES, Environment
from proxy.errors import ConfigError

# Secrets and secret files have their own module; these names stay importable from here too.
from proxy.secret import Secret as Secret
from proxy.secret import check_private_file as check_private_file
from proxy.secret import read_secret_file as read_secret_file

_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")


# --------------------------------------------------------------------------------------------
# Loading


def config_path(arg: str | None, environ: Mapping[str, str]) -> Path:
    """Return the config path: ``-c``, else ``$KSZ_PROXY_CONFIG``, else ``./ksz-proxy.toml``."""
    return Path(arg or environ.get("KSZ_PROXY_CONFIG") or DEFAULT_CONFIG_NAME)


def load_config(path: str | os.PathLike[str], environ: Mapping[str, str]) -> Config:
    """Read and validate the TOML file at ``path``; ``environ`` resolves ``password_env``."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"config: cannot read {path} ({exc.strerror})") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"config: {path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML ({exc})") from None
    return parse_config(data, environ, base_dir=path.absolute().parent, source=path)


def parse_config(
    data: Mapping[str, Any],
    environ: Mapping[str, str],
    *,
    base_dir: Path | None = None,
    source: Path | None = None,
) -> Config:
    """Validate an already-parsed TOML document; relative file paths resolve against base_dir."""
    reader = Table(data, "", base_dir or Path.cwd())
    environment = _environment(reader)
    channel = reader.choice("channel", CHANNELS) or "extranet"
    client_table = reader.table("client") if "client" in reader.data else None
    default_token_url, default_rest = (
        ENDPOINTS[(environment, channel)] if environment else (None, None)
    )
    egress = build_egress(reader.table("egress"), environ)
    oauth = _oauth(reader.table("oauth"), default_token_url, egress)
    clients = build_clients(reader, client_table, oauth, environ)
    upstream = _upstream(reader.table("upstream"), default_rest, egress)
    listen = _listen(reader.table("listen"))
    admin = _admin(reader.table("admin"))
    log = _log(reader.table("log"))
    routes = _routes(reader, clients, upstream, egress)
    reader.finish()
    if oauth.token_url is None and oauth.discovery_url is None:
        raise ConfigError(
            "oauth.token_url: required when no environment is set "
            "(or set environment = test | acpt | prod)"
        )
    if upstream.client_certificate and len(clients) > 1:
        # One upstream connection pool presents one certificate: never another client's.
        raise ConfigError("upstream.client_certificate: not available with several clients")
    if listen.port == admin.port != 0 and _same_socket(listen.host, admin.host):
        raise ConfigError("admin.port: must differ from listen.port on the same host")
    return Config(
        environment=environment,
        channel=channel,
        clients=clients,
        oauth=oauth,
        upstream=upstream,
        listen=listen,
        admin=admin,
        routes=routes,
        egress=egress,
        log=log,
        source=source,
    )


def _environment(reader: Table) -> Environment | None:
    value = reader.string("environment")
    if value is None:
        return None
    env = ENVIRONMENT_ALIASES.get(value.lower())
    if env is None:
        raise ConfigError(
            "environment: must be one of test, acpt, prod (aliases: acceptance, production)"
        )
    return env


def _oauth(t: Table, default_token_url: str | None, egress: EgressPolicy) -> OAuthConfig:
    token_url = t.https_url("token_url")
    discovery_url = t.https_url("discovery_url")
    audience = t.string("audience")
    if audience is not None and not audience.strip():
        raise ConfigError("oauth.audience: must not be empty")
    algorithm = t.choice("algorithm", ALGORITHMS)
    key_id = t.string("key_id")
    if key_id is not None and (not key_id or any(ord(c) < 0x20 for c in key_id)):
        raise ConfigError('oauth.key_id: must be none, "x5t#S256", "x5t" or a printable string')
    if token_url is None and discovery_url is None:
        token_url = default_token_url
    oauth = OAuthConfig(
        token_url=token_url,
        **present(
            discovery_url=discovery_url,
            audience=audience,
            algorithm=algorithm,
            key_id=key_id,
            assertion_lifetime_s=t.integer("assertion_lifetime_s", low=10, high=3600),
            scopes=t.scopes("scopes"),
            ca_file=t.ca_bundle("ca_file"),
            proxy=proxy_choice(t, "proxy", egress),
            timeout_s=t.number("timeout_s", low=0.1, high=300),
            send_client_id=t.boolean("send_client_id"),
            refresh_ratio=t.number("refresh_ratio", low=0.1, high=0.95),
            retry_initial_s=t.number("retry_initial_s", low=0.01, high=600),
            retry_max_s=t.number("retry_max_s", low=0.01, high=3600),
            default_expires_in_s=t.integer("default_expires_in_s", low=10, high=86400),
        ),
    )
    t.finish()
    if oauth.retry_max_s < oauth.retry_initial_s:
        raise ConfigError("oauth.retry_max_s: must be >= oauth.retry_initial_s")
    return oauth


def _upstream(t: Table, default_url: str | None, egress: EgressPolicy) -> UpstreamConfig:
    url = t.origin("url") or default_url
    if url is None:
        raise ConfigError(
            "upstream.url: required when no environment is set "
            "(or set environment = test | acpt | prod)"
        )
    config = UpstreamConfig(
        url=url,
        **present(
            ca_file=t.ca_bundle("ca_file"),
            client_certificate=t.boolean("client_certificate"),
            proxy=proxy_choice(t, "proxy", egress),
            connect_timeout_s=t.number("connect_timeout_s", low=0.1, high=300),
            read_timeout_s=t.number("read_timeout_s", low=0.1, high=3600),
            total_timeout_s=t.number("total_timeout_s", low=0.1, high=86400),
            max_connections=t.integer("max_connections", low=1, high=10000),
            replay_max_bytes=t.integer("replay_max_bytes", low=0, high=1024**3),
        ),
    )
    t.finish()
    return config


def _listen(t: Table) -> ListenConfig:
    host = t.host("host")
    port = t.integer("port", low=0, high=65535)
    allowed = t.string_list("allowed_hosts")
    if allowed is not None:
        if not allowed:
            raise ConfigError("listen.allowed_hosts: must name at least one host")
        for i, name in enumerate(allowed):
            if not name or any(c in name for c in "/ \t@?#") or name != name.strip():
                raise ConfigError(f"listen.allowed_hosts[{i}]: must be a host name or address")
            # The Host header's port is checked against listen.port, so a port here never matches.
            if ":" in name and not _is_ip(name.strip("[]")):
                raise ConfigError(f"listen.allowed_hosts[{i}]: must be a host name without a port")
    config = ListenConfig(
        **present(
            host=host,
            port=port,
            allowed_hosts=tuple(a.lower().strip("[]") for a in allowed) if allowed else None,
            max_body_bytes=t.integer("max_body_bytes", low=0, high=1 << 40),
            body_read_timeout_s=t.number("body_read_timeout_s", low=0.1, high=3600),
            keepalive_timeout_s=t.number("keepalive_timeout_s", low=0.1, high=3600),
            drain_timeout_s=t.number("drain_timeout_s", low=0, high=3600),
            max_in_flight=t.integer("max_in_flight", low=1, high=100000),
            max_receiving=t.integer("max_receiving", low=1, high=100000),
            workers=t.integer("workers", low=1, high=64),
        )
    )
    if config.workers > 1 and config.port == 0:
        # Workers share the port through SO_REUSEPORT; port 0 would give each its own.
        raise ConfigError("listen.workers: more than one worker needs a fixed listen.port, not 0")
    secret_file = t.path("shared_secret_file")
    t.finish()
    if secret_file is None:
        return config
    return dataclasses.replace(
        config,
        shared_secret_file=secret_file,
        shared_secret=read_secret_file(secret_file, "listen.shared_secret_file"),
    )


def _admin(t: Table) -> AdminConfig:
    config = AdminConfig(**present(host=t.host("host"), port=t.integer("port", low=0, high=65535)))
    t.finish()
    return config


def _log(t: Table) -> LogConfig:
    config = LogConfig(**present(level=t.choice("level", LOG_LEVELS)))
    t.finish()
    return config


def _routes(
    reader: Table,
    clients: tuple[ClientConfig, ...],
    upstream: UpstreamConfig,
    egress: EgressPolicy,
) -> tuple[Route, ...]:
    items = reader.table_list("routes")
    if not items:
        reader.refuse_near("routes")
        raise ConfigError(
            'routes: at least one [[routes]] entry is required (prefix = "/REST/...")'
        )
    routes: list[Route] = []
    for t in items:
        prefix = t.required_string("prefix")
        _check_prefix(prefix, f"{t.where}.prefix")
        prefix = prefix.rstrip("/")
        scopes = t.scopes("scopes")
        own_upstream = t.origin("upstream")
        client = route_client(t, clients)
        proxy = proxy_choice(t, "proxy", egress)
        t.finish()
        if any(r.prefix == prefix for r in routes):
            raise ConfigError(f"{t.where}.prefix: {prefix} is configured twice")
        if proxy is not None and own_upstream is None:
            raise ConfigError(
                f"{t.where}.proxy: only for a route with its own upstream (this route uses "
                "upstream.url, so upstream.proxy applies)"
            )
        routes.append(
            Route(
                prefix=prefix,
                scopes=client.scopes if scopes is None else scopes,
                upstream=own_upstream or upstream.url,
                client=client.name,
                proxy=upstream.proxy if own_upstream is None else (proxy or "egress"),
                proxy_key="upstream.proxy" if own_upstream is None else f"{t.where}.proxy",
            )
        )
    # Longest prefix first, so the most specific route wins.
    return tuple(sorted(routes, key=lambda r: len(r.prefix), reverse=True))


def _check_prefix(prefix: str, key: str) -> None:
    if not prefix.startswith("/") or prefix == "/":
        raise ConfigError(f'{key}: must start with "/" and name at least one segment')
    # Only the leading slash and one trailing slash go: "//x" and "/a//" keep an empty segment.
    segments = prefix[1:].removesuffix("/").split("/")
    for segment in segments:
        if segment in ("", ".", "..") or not _PREFIX_SEGMENT.fullmatch(segment):
            raise ConfigError(
                f"{key}: must be plain path segments (no //, dot segments, %, spaces or ?#)"
            )


def _same_socket(a: str, b: str) -> bool:
    """Return True when two listeners on these hosts and one port would collide."""
    if a == b or _is_unspecified(a) or _is_unspecified(b):
        return True
    # localhost binds the loopback addresses, so it collides with either of them.
    return "localhost" in (a, b) and is_loopback_host(a) and is_loopback_host(b)


def _is_unspecified(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_unspecified


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
