"""Own the configuration: TOML file -> validated, frozen dataclasses.

``load_config(path, environ)`` reads ``ksz-proxy.toml`` and checks everything before it returns.
Every problem raises ``ConfigError`` whose message starts with the key path
(``upstream.url: must be an https URL``) and never contains a secret value. Unknown keys are
errors, so a typo never falls back silently to a default.

The KSZ endpoint table (``proxy/endpoints.py``) is built in: ``environment`` and ``channel``
choose the token endpoint and the REST base; explicit ``oauth.token_url`` / ``upstream.url``
override them. Each default is written once, in its dataclass below; the section builders read
the TOML through ``proxy.config_reader.Table`` and pass on only the keys that are present.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from proxy import egress as egress_rules
from proxy.config_reader import Table, present
from proxy.egress import EgressPolicy, ProxyChoice, ProxyServer
from proxy.endpoints import CHANNELS, ENDPOINTS, ENVIRONMENT_ALIASES, Channel, Environment
from proxy.errors import ConfigError

# Secrets and secret files have their own module; these names stay importable from here too.
from proxy.secret import Secret as Secret
from proxy.secret import check_private_file as check_private_file
from proxy.secret import read_secret_file as read_secret_file

Algorithm = Literal["RS256", "PS256", "ES256"]
ALGORITHMS: Final[tuple[Algorithm, ...]] = ("RS256", "PS256", "ES256")
LogLevel = Literal["debug", "info", "warning", "error"]
LOG_LEVELS: Final[tuple[LogLevel, ...]] = ("debug", "info", "warning", "error")

_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

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
        return _is_loopback(self.host)


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
    egress = _egress(reader.table("egress"), environ)
    oauth = _oauth(reader.table("oauth"), default_token_url, egress)
    clients = _clients(reader, client_table, oauth, environ)
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


def _client(t: Table, environ: Mapping[str, str]) -> ClientConfig:
    client_id = t.required_string("id")
    if not client_id.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise ConfigError(f"{t.key('id')}: must be a non-empty printable string")
    pkcs12 = t.path("pkcs12")
    private_key = t.path("private_key")
    certificate = t.path("certificate")
    password_file = t.path("password_file")
    password_env = t.string("password_env")
    t.finish()
    if pkcs12 is not None and (private_key is not None or certificate is not None):
        raise ConfigError(
            f"{t.key('pkcs12')}: set either pkcs12 or private_key + certificate, not both"
        )
    if pkcs12 is None:
        if private_key is None and certificate is None:
            raise ConfigError(
                f"{t.key('pkcs12')}: required (or set {t.key('private_key')} and "
                f"{t.key('certificate')})"
            )
        if private_key is None:
            raise ConfigError(f"{t.key('private_key')}: required with {t.key('certificate')}")
        if certificate is None:
            raise ConfigError(f"{t.key('certificate')}: required with {t.key('private_key')}")
    if password_file is not None and password_env is not None:
        raise ConfigError(f"{t.key('password_file')}: set password_file or password_env, not both")
    password: Secret | None = None
    if password_file is not None:
        password = read_secret_file(password_file, t.key("password_file"))
    elif password_env is not None:
        if not _ENV_NAME.fullmatch(password_env):
            raise ConfigError(f"{t.key('password_env')}: must be an environment variable name")
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"{t.key('password_env')}: environment variable {password_env} is not set"
            )
        password = Secret(value)
    return ClientConfig(
        id=client_id,
        pkcs12=pkcs12,
        private_key=private_key,
        certificate=certificate,
        password_file=password_file,
        password_env=password_env,
        password=password,
    )


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
            ca_file=t.existing_file("ca_file"),
            proxy=_proxy_choice(t, "proxy", egress),
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
            ca_file=t.existing_file("ca_file"),
            client_certificate=t.boolean("client_certificate"),
            proxy=_proxy_choice(t, "proxy", egress),
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
        client = _route_client(t, clients)
        proxy = _proxy_choice(t, "proxy", egress)
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


def _egress(t: Table, environ: Mapping[str, str]) -> EgressPolicy:
    """Validate ``[egress]``; the rules themselves live in ``proxy.egress``."""
    proxy_url = t.string("proxy_url")
    user = t.string("proxy_user")
    password_file = t.path("proxy_password_file")
    password_env = t.string("proxy_password_env")
    no_proxy = t.string_list("no_proxy")
    use_environment = bool(t.boolean("from_environment"))
    t.finish()
    if use_environment and proxy_url is not None:
        raise ConfigError("egress.proxy_url: set proxy_url or from_environment = true, not both")
    if use_environment and no_proxy is not None:
        raise ConfigError(
            "egress.no_proxy: with from_environment = true the list comes from NO_PROXY"
        )
    if not use_environment and proxy_url is None and no_proxy is not None:
        raise ConfigError("egress.no_proxy: needs egress.proxy_url")
    if password_file is not None and password_env is not None:
        raise ConfigError(
            "egress.proxy_password_file: set proxy_password_file or proxy_password_env, not both"
        )
    password: Secret | None = None
    if password_file is not None:
        password = read_secret_file(password_file, "egress.proxy_password_file")
        egress_rules.check_password(password.reveal(), "egress.proxy_password_file")
    elif password_env is not None:
        if not _ENV_NAME.fullmatch(password_env):
            raise ConfigError("egress.proxy_password_env: must be an environment variable name")
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"egress.proxy_password_env: environment variable {password_env} is not set"
            )
        egress_rules.check_password(value, "egress.proxy_password_env")
        password = Secret(value)
    if user is not None:
        egress_rules.check_user(user, "egress.proxy_user")
        if password is None:
            raise ConfigError(
                "egress.proxy_user: needs egress.proxy_password_file or egress.proxy_password_env"
            )
    elif password is not None:
        raise ConfigError("egress.proxy_user: required with a proxy password")
    authorization = (
        Secret(egress_rules.basic_authorization(user, password.reveal()))
        if user is not None and password is not None
        else None
    )
    if use_environment:
        return egress_rules.policy_from_environment(environ, authorization)
    proxy = None
    if proxy_url is not None:
        address = egress_rules.parse_proxy_url(proxy_url, "egress.proxy_url")
        proxy = ProxyServer(
            host=address.host,
            port=address.port,
            authorization=authorization,
            source="egress.proxy_url",
        )
    return EgressPolicy(
        mode="none" if proxy is None else "explicit",
        proxy=proxy,
        no_proxy=egress_rules.parse_no_proxy(no_proxy or [], "egress.no_proxy"),
        authorization=authorization,
    )


def _proxy_choice(t: Table, name: str, egress: EgressPolicy) -> ProxyChoice | None:
    """Read a destination's ``proxy`` setting; None when absent (the dataclass default)."""
    value = t.string(name)
    if value is None:
        return None
    choice = egress_rules.parse_choice(value, t.key(name))
    if isinstance(choice, str):
        return choice
    # A proxy named here uses the [egress] credentials, if any: one set per configuration.
    return ProxyServer(
        host=choice.host,
        port=choice.port,
        authorization=egress.authorization,
        source=t.key(name),
    )


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


# --------------------------------------------------------------------------------------------
# Several clients: [client] is the client named "default", each [[clients]] entry another.

DEFAULT_CLIENT: Final = "default"
_CLIENT_NAME = re.compile(r"[a-z0-9_-]+")


def default_client(clients: tuple[ClientConfig, ...]) -> str | None:
    """Return the name routes use when they name none: "default", or the only client."""
    if any(client.name == DEFAULT_CLIENT for client in clients):
        return DEFAULT_CLIENT
    return clients[0].name if len(clients) == 1 else None


def _clients(
    reader: Table, table: Table | None, oauth: OAuthConfig, environ: Mapping[str, str]
) -> tuple[ClientConfig, ...]:
    """Return [client] (if present) then every [[clients]] entry, names and identities checked."""
    clients: list[ClientConfig] = []
    if table is not None:
        clients.append(_with_oauth(_client(table, environ), oauth))
    for t in reader.table_list("clients"):
        client = _named_client(t, oauth, environ)
        if client.name == DEFAULT_CLIENT and table is not None:
            raise ConfigError(
                f'{t.key("name")}: "default" is the [client] table; give this client another '
                "name, or drop [client]"
            )
        twin = next((c for c in clients if c.name == client.name), None)
        if twin is not None:
            raise ConfigError(f'{t.key("name")}: a client named "{client.name}" is already set')
        twin = next((c for c in clients if _same_identity(c, client)), None)
        if twin is not None:
            raise ConfigError(
                f'{t.key("id")}: client "{twin.name}" already has this id with the same key '
                "files; one client per identity (routes choose scopes themselves)"
            )
        clients.append(client)
    if not clients:
        reader.refuse_near("client")
        reader.refuse_near("clients")
        raise ConfigError("client: section [client] (or a [[clients]] entry) is required")
    return tuple(clients)


def _named_client(t: Table, oauth: OAuthConfig, environ: Mapping[str, str]) -> ClientConfig:
    name = t.required_string("name")
    if not _CLIENT_NAME.fullmatch(name):
        raise ConfigError(f"{t.key('name')}: must be lower-case letters, digits, _ or - only")
    audience = t.string("audience")
    if audience is not None and not audience.strip():
        raise ConfigError(f"{t.key('audience')}: must not be empty")
    algorithm = t.choice("algorithm", ALGORITHMS)
    key_id = t.string("key_id")
    if key_id is not None and (not key_id or any(ord(c) < 0x20 for c in key_id)):
        raise ConfigError(
            f'{t.key("key_id")}: must be none, "x5t#S256", "x5t" or a printable string'
        )
    lifetime = t.integer("assertion_lifetime_s", low=10, high=3600)
    scopes = t.scopes("scopes")
    client = _with_oauth(_client(t, environ), oauth)  # reads the key files and finishes t
    return dataclasses.replace(
        client,
        name=name,
        where=t.where,
        algorithm=algorithm or client.algorithm,
        key_id=key_id or client.key_id,
        audience=audience or client.audience,
        assertion_lifetime_s=lifetime or client.assertion_lifetime_s,
        scopes=client.scopes if scopes is None else scopes,
    )


def _with_oauth(client: ClientConfig, oauth: OAuthConfig) -> ClientConfig:
    """Return ``client`` with the [oauth] assertion settings and scopes."""
    return dataclasses.replace(
        client,
        algorithm=oauth.algorithm,
        key_id=oauth.key_id,
        audience=oauth.audience,
        assertion_lifetime_s=oauth.assertion_lifetime_s,
        scopes=oauth.scopes,
    )


def _same_identity(a: ClientConfig, b: ClientConfig) -> bool:
    """Return True when two clients have the same id and the same key material files.

    Certificates in different files are compared once the credentials are loaded.
    """
    if a.id != b.id:
        return False
    files_a = (a.pkcs12,) if a.pkcs12 is not None else (a.private_key, a.certificate)
    files_b = (b.pkcs12,) if b.pkcs12 is not None else (b.private_key, b.certificate)
    return any(_same_file(x, y) for x in files_a for y in files_b)


def _same_file(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return a == b or a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop: not our question to answer here
        return False


def _route_client(t: Table, clients: tuple[ClientConfig, ...]) -> ClientConfig:
    """Return the client a route names, or the default client when it names none."""
    by_name = {client.name: client for client in clients}
    name = t.string("client")
    if name is None:
        name = default_client(clients)
        if name is None:
            raise ConfigError(
                f"{t.key('client')}: required: there are several clients and none is named "
                f'"default" (known: {", ".join(by_name)})'
            )
    client = by_name.get(name)
    if client is None:
        raise ConfigError(
            f'{t.key("client")}: no client is named "{name}" (known: {", ".join(by_name)})'
        )
    return client


def _same_socket(a: str, b: str) -> bool:
    """Return True when two listeners on these hosts and one port would collide."""
    if a == b or _is_unspecified(a) or _is_unspecified(b):
        return True
    # localhost binds the loopback addresses, so it collides with either of them.
    return "localhost" in (a, b) and _is_loopback(a) and _is_loopback(b)


def _is_unspecified(host: str) -> bool:
    return _is_ip(host) and ipaddress.ip_address(host).is_unspecified


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
