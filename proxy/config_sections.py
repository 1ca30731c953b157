"""Own the configuration's sections: frozen dataclasses, each default written once.

``proxy.config`` builds them from the TOML file and re-exports every name here; the section
builders (``config.py``, ``config_clients.py``, ``config_egress.py``) pass on only the keys that
are present, so a default lives in its dataclass below and nowhere else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Literal

from proxy.egress import EgressPolicy, ProxyChoice
from proxy.endpoints import Channel, Environment
from proxy.secret import Secret

Algorithm = Literal["RS256", "PS256", "ES256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("RS256", "PS256", "ES256")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")

ENV_NAME: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # password_env, proxy_password_env

DEFAULT_CONFIG_NAME: Final = "ksz-proxy.toml"
DEFAULT_ALLOWED_HOSTS: Final = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """One OAuth client of the partner: its name, id, key files and assertion shape.

    ``[client]`` is the client named "default"; each ``[[clients]]`` entry is another. The
    assertion settings and ``scopes`` are resolved: a client that does not set them has the
    ``[oauth]`` values.
    """

    id: str
    pkcs12: Path | None = None
    private_key: Path | None = None
    certificate: Path | None = None
    password_file: Path | None = None
    password_env: str | None = None
    password: Secret | None = field(default=None, repr=False)
    name: str = "default"
    where: str = "client"  # its table, for messages: "client" or "clients[N]"
    algorithm: Algorithm = "RS256"
    key_id: str = "none"
    audience: str | None = None
    assertion_lifetime_s: int = 300
    scopes: frozenset[str] = frozenset()  # for its routes that name none


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuthConfig:
    """How to obtain tokens: endpoint, client assertion shape, scopes, retries."""

    token_url: str | None
    discovery_url: str | None = None
    audience: str | None = None
    algorithm: Algorithm = "RS256"
    key_id: str = "none"
    assertion_lifetime_s: int = 300
    scopes: frozenset[str] = frozenset()
    ca_file: Path | None = None
    proxy: ProxyChoice = "egress"
    timeout_s: float = 10.0
    send_client_id: bool = False
    refresh_ratio: float = 0.8
    retry_initial_s: float = 1.0
    retry_max_s: float = 60.0
    default_expires_in_s: int = 300


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamConfig:
    """The KSZ REST endpoint: origin, trust, timeouts and pool size."""

    url: str
    ca_file: Path | None = None
    client_certificate: bool = False
    proxy: ProxyChoice = "egress"
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 60.0
    total_timeout_s: float = 300.0
    max_connections: int = 100
    replay_max_bytes: int = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenConfig:
    """The proxy listener the legacy application calls, and its inbound limits."""

    host: str = "127.0.0.1"
    port: int = 8080
    allowed_hosts: tuple[str, ...] = DEFAULT_ALLOWED_HOSTS
    max_body_bytes: int = 64 * 1024 * 1024
    body_read_timeout_s: float = 30.0
    keepalive_timeout_s: float = 15.0
    drain_timeout_s: float = 20.0
    max_in_flight: int = 256
    # Requests still receiving their body are counted apart from those in flight upstream.
    max_receiving: int = 1024
    workers: int = 1
    shared_secret_file: Path | None = None
    shared_secret: Secret | None = field(default=None, repr=False)

    @property
    def is_loopback(self) -> bool:
        """Return True when the listener binds a loopback address only."""
        return is_loopback_host(self.host)


@dataclass(frozen=True, slots=True, kw_only=True)
class AdminConfig:
    """The admin listener: health, readiness and metrics."""

    host: str = "127.0.0.1"
    port: int = 9090


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    """Log output set in the file; ``--log-level`` on the command line wins over it."""

    level: LogLevel | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    """One forwarded path prefix with its scope set, upstream origin and client."""

    prefix: str
    scopes: frozenset[str]
    upstream: str
    client: str = "default"  # the name of the client whose tokens it carries
    # How to reach the upstream: routes[].proxy when the route has its own upstream, else
    # upstream.proxy; proxy_key names where it was set.
    proxy: ProxyChoice = "egress"
    proxy_key: str = field(default="upstream.proxy", compare=False)

    def matches(self, path: str) -> bool:
        """Return True when ``path`` is the prefix or lies under it on a segment boundary."""
        return path == self.prefix or path.startswith(self.prefix + "/")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    environment: Environment | None
    channel: Channel
    clients: tuple[ClientConfig, ...]  # [client] first (named "default"), then [[clients]]
    oauth: OAuthConfig
    upstream: UpstreamConfig
    listen: ListenConfig
    admin: AdminConfig
    routes: tuple[Route, ...]
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    log: LogConfig = LogConfig()
    source: Path | None = None

    @property
    def client(self) -> ClientConfig:
        """Return the default client (see ``default_client``), else the first one."""
        return self.clients_by_name.get(default_client(self.clients) or "", self.clients[0])

    @property
    def clients_by_name(self) -> Mapping[str, ClientConfig]:
        """Return every client by its name."""
        return {client.name: client for client in self.clients}

    @property
    def token_keys(self) -> tuple[tuple[str, frozenset[str]], ...]:
        """Return each distinct (client name, scope set) the routes need, in route order."""
        return tuple(dict.fromkeys((route.client, route.scopes) for route in self.routes))

    @property
    def scope_sets(self) -> tuple[frozenset[str], ...]:
        """Return each distinct scope set the routes need, in route order."""
        seen: dict[frozenset[str], None] = {}
        for route in self.routes:
            seen.setdefault(route.scopes, None)
        return tuple(seen)


# --------------------------------------------------------------------------------------------
# Several clients: [client] is the client named "default", each [[clients]] entry another.

DEFAULT_CLIENT: Final = "default"


def default_client(clients: tuple[ClientConfig, ...]) -> str | None:
    """Return the name routes use when they name none: "default", or the only client."""
    if any(client.name == DEFAULT_CLIENT for client in clients):
        return DEFAULT_CLIENT
    return clients[0].name if len(clients) == 1 else None


def is_loopback_host(host: str) -> bool:
    """Return True for localhost and the loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
