"""Own the configuration: TOML file -> validated, frozen dataclasses.

``load_config(path, environ)`` reads ``ksz-proxy.toml`` and checks everything before it returns.
Every problem raises ``ConfigError`` whose message starts with the key path
(``upstream.url: must be an https URL``) and never contains a secret value. Unknown keys are
errors, so a typo never falls back silently to a default.

The KSZ endpoint table (../shared/KSZ.md) is built in: ``environment`` and ``channel`` choose the
token endpoint and the REST base; explicit ``oauth.token_url`` / ``upstream.url`` override them.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast
from urllib.parse import urlsplit

from proxy.errors import ConfigError

Environment = Literal["test", "acpt", "prod"]
Channel = Literal["extranet", "internet"]

ENVIRONMENT_ALIASES: Final[Mapping[str, Environment]] = {
    "test": "test",
    "acpt": "acpt",
    "acceptance": "acpt",
    "prod": "prod",
    "production": "prod",
}

# (environment, channel) -> (token endpoint, REST base). Mind the KSZ.md erratum: the onboarding
# document repeats the acceptance hosts in its production table; production is production here.
ENDPOINTS: Final[Mapping[tuple[Environment, Channel], tuple[str, str]]] = {
    ("test", "extranet"): (
        "https://professionalservices-int.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-test.ksz-bcss.fgov.be:4543",
    ),
    ("test", "internet"): (
        "https://services-int.socialsecurity.be/REST/oauth/v5/token",
        "https://api.test.ksz-bcss.fgov.be",
    ),
    ("acpt", "extranet"): (
        "https://professionalservices-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b-acpt.ksz-bcss.fgov.be:4543",
    ),
    ("acpt", "internet"): (
        "https://services-acpt.socialsecurity.be/REST/oauth/v5/token",
        "https://api.acpt.ksz-bcss.fgov.be",
    ),
    ("prod", "extranet"): (
        "https://professionalservices.socialsecurity.be/REST/oauth/v5/token",
        "https://b2b.ksz-bcss.fgov.be:4543",
    ),
    ("prod", "internet"): (
        "https://services.socialsecurity.be/REST/oauth/v5/token",
        "https://api.ksz-bcss.fgov.be",
    ),
}

DISCOVERY_URLS: Final[Mapping[Environment, str]] = {
    "test": "https://oauth-v5.int.socialsecurity.be/.well-known/oauth-authorization-server",
    "acpt": "https://oauth-v5.acc.socialsecurity.be/.well-known/oauth-authorization-server",
    "prod": "https://oauth-v5.socialsecurity.be/.well-known/oauth-authorization-server",
}

ALGORITHMS: Final = ("RS256", "PS256", "ES256")
Algorithm = Literal["RS256", "PS256", "ES256"]

# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PREFIX_SEGMENT = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@-]+")

DEFAULT_CONFIG_NAME: Final = "ksz-proxy.toml"
DEFAULT_ALLOWED_HOSTS: Final = ("localhost", "127.0.0.1", "::1")


class Secret:
    """Hold a secret string; ``repr`` and ``str`` show ``***`` so it never lands in a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself; call only where it is used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Secret cannot be pickled")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClientConfig:
    """The partner's OAuth client and the files holding its key and certificate."""

    id: str
    pkcs12: Path | None = None
    private_key: Path | None = None
    certificate: Path | None = None
    password_file: Path | None = None
    password_env: str | None = None
    password: Secret | None = field(default=None, repr=False)


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
class Route:
    """One forwarded path prefix with its scope set and upstream origin."""

    prefix: str
    scopes: frozenset[str]
    upstream: str

    def matches(self, path: str) -> bool:
        """Return True when ``path`` is the prefix or lies under it on a segment boundary."""
        return path == self.prefix or path.startswith(self.prefix + "/")


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """The whole validated configuration."""

    environment: Environment | None
    channel: Channel
    client: ClientConfig
    oauth: OAuthConfig
    upstream: UpstreamConfig
    listen: ListenConfig
    admin: AdminConfig
    routes: tuple[Route, ...]
    source: Path | None = None

    @property
    def scope_sets(self) -> tuple[frozenset[str], ...]:
        """Return each distinct scope set the routes need, in route order."""
        seen: dict[frozenset[str], None] = {}
        for route in self.routes:
            seen.setdefault(route.scopes, None)
        return tuple(seen)


# --------------------------------------------------------------------------------------------
# File checks shared with the credentials module


def check_private_file(path: Path, key: str) -> None:
    """Refuse a secret file that is missing or readable by group or others.

    The error names the key, the file and its mode, never its content.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o044:
        raise ConfigError(
            f"{key}: {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}"
        )


def read_secret_file(path: Path, key: str) -> Secret:
    """Read a secret from a private file, dropping one trailing newline."""
    check_private_file(path, key)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return Secret(text)


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
    reader = _Table(data, "", base_dir or Path.cwd())
    environment = _environment(reader)
    channel = cast(Channel, reader.choice("channel", ("extranet", "internet"), "extranet"))
    client = _client(reader.table("client", required=True), environ)
    default_token_url, default_rest = (
        ENDPOINTS[(environment, channel)] if environment else (None, None)
    )
    oauth = _oauth(reader.table("oauth"), default_token_url)
    upstream = _upstream(reader.table("upstream"), default_rest)
    listen = _listen(reader.table("listen"))
    admin = _admin(reader.table("admin"))
    routes = _routes(reader, oauth.scopes, upstream.url)
    reader.finish()
    if oauth.token_url is None and oauth.discovery_url is None:
        raise ConfigError(
            "oauth.token_url: required when no environment is set "
            "(or set environment = test | acpt | prod)"
        )
    if listen.port == admin.port != 0 and _same_socket(listen.host, admin.host):
        raise ConfigError("admin.port: must differ from listen.port on the same host")
    return Config(
        environment=environment,
        channel=channel,
        client=client,
        oauth=oauth,
        upstream=upstream,
        listen=listen,
        admin=admin,
        routes=routes,
        source=source,
    )


def _environment(reader: _Table) -> Environment | None:
    value = reader.string("environment", None)
    if value is None:
        return None
    env = ENVIRONMENT_ALIASES.get(value.lower())
    if env is None:
        raise ConfigError(
            "environment: must be one of test, acpt, prod (aliases: acceptance, production)"
        )
    return env


def _client(t: _Table, environ: Mapping[str, str]) -> ClientConfig:
    client_id = t.string("id", required=True)
    if not client_id.strip() or any(ord(c) < 0x20 or ord(c) == 0x7F for c in client_id):
        raise ConfigError("client.id: must be a non-empty printable string")
    pkcs12 = t.path("pkcs12")
    private_key = t.path("private_key")
    certificate = t.path("certificate")
    password_file = t.path("password_file")
    password_env = t.string("password_env", None)
    t.finish()
    if pkcs12 is not None and (private_key is not None or certificate is not None):
        raise ConfigError("client.pkcs12: set either pkcs12 or private_key + certificate, not both")
    if pkcs12 is None:
        if private_key is None and certificate is None:
            raise ConfigError(
                "client.pkcs12: required (or set client.private_key and client.certificate)"
            )
        if private_key is None:
            raise ConfigError("client.private_key: required with client.certificate")
        if certificate is None:
            raise ConfigError("client.certificate: required with client.private_key")
    if password_file is not None and password_env is not None:
        raise ConfigError("client.password_file: set password_file or password_env, not both")
    password: Secret | None = None
    if password_file is not None:
        password = read_secret_file(password_file, "client.password_file")
    elif password_env is not None:
        if not _ENV_NAME.fullmatch(password_env):
            raise ConfigError("client.password_env: must be an environment variable name")
        value = environ.get(password_env)
        if not value:
            raise ConfigError(
                f"client.password_env: environment variable {password_env} is not set"
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


def _oauth(t: _Table, default_token_url: str | None) -> OAuthConfig:
    token_url = t.https_url("token_url")
    discovery_url = t.https_url("discovery_url")
    audience = t.string("audience", None)
    if audience is not None and not audience.strip():
        raise ConfigError("oauth.audience: must not be empty")
    algorithm = cast(Algorithm, t.choice("algorithm", ALGORITHMS, "RS256"))
    key_id = t.string("key_id", "none")
    if not key_id or any(ord(c) < 0x20 for c in key_id):
        raise ConfigError('oauth.key_id: must be none, "x5t#S256", "x5t" or a printable string')
    lifetime = t.integer("assertion_lifetime_s", 300, low=10, high=3600)
    scopes = t.scopes("scopes")
    ca_file = t.existing_file("ca_file")
    timeout_s = t.number("timeout_s", 10.0, low=0.1, high=300)
    send_client_id = t.boolean("send_client_id", False)
    refresh_ratio = t.number("refresh_ratio", 0.8, low=0.1, high=0.95)
    retry_initial_s = t.number("retry_initial_s", 1.0, low=0.01, high=600)
    retry_max_s = t.number("retry_max_s", 60.0, low=0.01, high=3600)
    default_expires_in_s = t.integer("default_expires_in_s", 300, low=10, high=86400)
    t.finish()
    if retry_max_s < retry_initial_s:
        raise ConfigError("oauth.retry_max_s: must be >= oauth.retry_initial_s")
    if token_url is None and discovery_url is None:
        token_url = default_token_url
    return OAuthConfig(
        token_url=token_url,
        discovery_url=discovery_url,
        audience=audience,
        algorithm=algorithm,
        key_id=key_id,
        assertion_lifetime_s=lifetime,
        scopes=scopes,
        ca_file=ca_file,
        timeout_s=timeout_s,
        send_client_id=send_client_id,
        refresh_ratio=refresh_ratio,
        retry_initial_s=retry_initial_s,
        retry_max_s=retry_max_s,
        default_expires_in_s=default_expires_in_s,
    )


def _upstream(t: _Table, default_url: str | None) -> UpstreamConfig:
    url = t.origin("url") or default_url
    if url is None:
        raise ConfigError(
            "upstream.url: required when no environment is set "
            "(or set environment = test | acpt | prod)"
        )
    config = UpstreamConfig(
        url=url,
        ca_file=t.existing_file("ca_file"),
        client_certificate=t.boolean("client_certificate", False),
        connect_timeout_s=t.number("connect_timeout_s", 5.0, low=0.1, high=300),
        read_timeout_s=t.number("read_timeout_s", 60.0, low=0.1, high=3600),
        total_timeout_s=t.number("total_timeout_s", 300.0, low=0.1, high=86400),
        max_connections=t.integer("max_connections", 100, low=1, high=10000),
        replay_max_bytes=t.integer("replay_max_bytes", 1024 * 1024, low=0, high=1024**3),
    )
    t.finish()
    return config


def _listen(t: _Table) -> ListenConfig:
    host = t.host("host", "127.0.0.1")
    port = t.integer("port", 8080, low=0, high=65535)
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
    max_body = t.integer("max_body_bytes", 64 * 1024 * 1024, low=0, high=1 << 40)
    body_timeout = t.number("body_read_timeout_s", 30.0, low=0.1, high=3600)
    keepalive = t.number("keepalive_timeout_s", 15.0, low=0.1, high=3600)
    drain = t.number("drain_timeout_s", 20.0, low=0, high=3600)
    max_in_flight = t.integer("max_in_flight", 256, low=1, high=100000)
    workers = t.integer("workers", 1, low=1, high=64)
    if workers > 1 and port == 0:
        # Workers share the port through SO_REUSEPORT; port 0 would give each its own.
        raise ConfigError("listen.workers: more than one worker needs a fixed listen.port, not 0")
    secret_file = t.path("shared_secret_file")
    t.finish()
    secret = (
        read_secret_file(secret_file, "listen.shared_secret_file")
        if secret_file is not None
        else None
    )
    return ListenConfig(
        host=host,
        port=port,
        allowed_hosts=tuple(a.lower().strip("[]") for a in allowed)
        if allowed is not None
        else DEFAULT_ALLOWED_HOSTS,
        max_body_bytes=max_body,
        body_read_timeout_s=body_timeout,
        keepalive_timeout_s=keepalive,
        drain_timeout_s=drain,
        max_in_flight=max_in_flight,
        workers=workers,
        shared_secret_file=secret_file,
        shared_secret=secret,
    )


def _admin(t: _Table) -> AdminConfig:
    config = AdminConfig(
        host=t.host("host", "127.0.0.1"),
        port=t.integer("port", 9090, low=0, high=65535),
    )
    t.finish()
    return config


def _routes(
    reader: _Table, default_scopes: frozenset[str], default_upstream: str
) -> tuple[Route, ...]:
    items = reader.table_list("routes")
    if not items:
        raise ConfigError(
            'routes: at least one [[routes]] entry is required (prefix = "/REST/...")'
        )
    routes: list[Route] = []
    for t in items:
        prefix = t.string("prefix", required=True)
        _check_prefix(prefix, f"{t.where}.prefix")
        prefix = prefix.rstrip("/")
        scopes = t.scopes("scopes", None)
        upstream = t.origin("upstream")
        t.finish()
        if any(r.prefix == prefix for r in routes):
            raise ConfigError(f"{t.where}.prefix: {prefix} is configured twice")
        routes.append(
            Route(
                prefix=prefix,
                scopes=default_scopes if scopes is None else scopes,
                upstream=upstream or default_upstream,
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


# --------------------------------------------------------------------------------------------
# A small typed reader that tracks the key path and the keys it has consumed.

T = TypeVar("T")
_MISSING: Final = object()


class _Table:
    def __init__(self, data: Mapping[str, Any], where: str, base_dir: Path) -> None:
        self.data = data
        self.where = where
        self.base_dir = base_dir
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.where}.{name}" if self.where else name

    def get(self, name: str) -> Any:
        self.used.add(name)
        return self.data.get(name, _MISSING)

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key (check the spelling)")

    def table(self, name: str, *, required: bool = False) -> _Table:
        value = self.get(name)
        if value is _MISSING:
            if required:
                raise ConfigError(f"{self.key(name)}: section [{self.key(name)}] is required")
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: must be a table [{self.key(name)}]")
        return _Table(value, self.key(name), self.base_dir)

    def table_list(self, name: str) -> list[_Table]:
        value = self.get(name)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self.key(name)}: must be an array of tables [[{name}]]")
        return [_Table(v, f"{self.key(name)}[{i}]", self.base_dir) for i, v in enumerate(value)]

    def _typed(self, name: str, kind: type[T], label: str, default: Any) -> Any:
        value = self.get(name)
        if value is _MISSING:
            return default
        # bool is an int in Python; TOML keeps them apart, so do we.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{self.key(name)}: must be {label}")
        return value

    def string(self, name: str, default: Any = None, *, required: bool = False) -> Any:
        value = self._typed(name, str, "a string", _MISSING)
        if value is _MISSING:
            if required:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        return value

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self._typed(name, bool, "true or false", default))

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        value = int(self._typed(name, int, "an integer", default))
        if not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: must be between {low} and {high}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        value = self.get(name)
        if value is _MISSING:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: must be a number")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: must be between {low:g} and {high:g}")
        return float(value)

    def choice(self, name: str, options: tuple[str, ...], default: str) -> str:
        value = self.string(name, default)
        if value not in options:
            raise ConfigError(f"{self.key(name)}: must be one of {', '.join(options)}")
        return str(value)

    def string_list(self, name: str) -> list[str] | None:
        value = self.get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: must be a list of strings")
        return list(value)

    def scopes(self, name: str, default: Any = frozenset()) -> Any:
        values = self.string_list(name)
        if values is None:
            return default
        for i, scope in enumerate(values):
            if not _SCOPE_TOKEN.fullmatch(scope):
                raise ConfigError(
                    f"{self.key(name)}[{i}]: not a valid OAuth scope (no spaces, quotes or "
                    "backslashes)"
                )
        return frozenset(values)

    def path(self, name: str) -> Path | None:
        value = self.string(name, None)
        if value is None:
            return None
        if not value:
            raise ConfigError(f"{self.key(name)}: must not be empty")
        if "\x00" in value:
            raise ConfigError(f"{self.key(name)}: must not contain a NUL character")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def existing_file(self, name: str) -> Path | None:
        p = self.path(name)
        if p is not None and not p.is_file():
            raise ConfigError(f"{self.key(name)}: file {p} does not exist")
        return p

    def host(self, name: str, default: str) -> str:
        value = str(self.string(name, default))
        if not value or any(c in value for c in "/ \t@?#[]"):
            raise ConfigError(f"{self.key(name)}: must be a host name or IP address")
        return value

    def https_url(self, name: str) -> str | None:
        value = self.string(name, None)
        if value is None:
            return None
        # urlsplit drops tabs and newlines silently; the raw value must not carry them on.
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ConfigError(f"{self.key(name)}: must be an https URL (no spaces or controls)")
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"{self.key(name)}: must be an https URL")
        if parts.username or parts.password:
            raise ConfigError(f"{self.key(name)}: must not contain credentials")
        if parts.fragment:
            raise ConfigError(f"{self.key(name)}: must not contain a fragment")
        try:
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError:
            raise ConfigError(f"{self.key(name)}: has an invalid port") from None
        return str(value)

    def origin(self, name: str) -> str | None:
        value = self.https_url(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"{self.key(name)}: must be an origin only (https://host[:port]); the request "
                "path is appended as sent"
            )
        return f"https://{parts.netloc}"
