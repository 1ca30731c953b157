"""Own the egress rules: which destination goes through which forward proxy, as pure functions.

ksz-proxy talks to two kinds of destination, the authorization server (``oauth``: token endpoint
and discovery document) and the KSZ REST origins (``upstream``, and any route with its own
upstream). Each one is reached either directly or through an HTTP forward proxy with a
``CONNECT`` tunnel, inside which TLS runs end to end with the destination: the proxy sees the
destination's host and port, never the assertion or the token.

The rules, in order, for one destination:

1. its own setting (``oauth.proxy``, ``upstream.proxy``, ``routes[].proxy``): ``"direct"``, or a
   proxy URL, decides alone;
2. ``"egress"`` (the default) follows ``[egress]``: no proxy configured means direct; a host
   listed in ``no_proxy`` is reached directly; everything else goes through the proxy.

Nothing is bypassed implicitly -- not loopback, not private addresses: only what ``no_proxy``
lists. The configured ``no_proxy`` is strict: ``"host"`` is that host only, ``".example"`` every
host under ``example`` (not ``example`` itself); an IP address or network matches IP literals
only (names are never resolved to decide). With ``from_environment = true`` the proxy comes from
``https_proxy`` / ``HTTPS_PROXY`` and the list from ``no_proxy`` / ``NO_PROXY`` (lower case
first), read with the conventions other tools use there: an entry matches the host and every
host under it, with or without a leading dot, and ``*`` alone means no proxy at all.

Proxy credentials are a ``Secret`` holding the whole ``Proxy-Authorization`` value; a
description (``describe``) never shows them. The decision for a destination is an ``EgressRoute``
(``decide(config.egress, route.proxy, route.upstream, key=route.proxy_key)`` for a route,
``oauth.proxy`` for the authorization server) whose ``proxy`` (``ProxyServer``: host, port,
authorization) any HTTP client can use: connect to ``host:port``, send ``CONNECT
<destination host>:<port>`` with ``Proxy-Authorization: <authorization.reveal()>`` when set, then
run TLS to the destination inside the tunnel. aiohttp's client (the token endpoint's) gets the
same as ``request_options()``, and its failures are named by ``proxy_failure``; the upstream
client (``upstream_client.py``) gets the proxy mapped to its ``EgressProxy`` by ``forward.py``,
and the proxy's answer to its ``CONNECT`` is named by ``tunnel_failure``.
"""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, TypedDict
from urllib.parse import unquote, urlsplit

import aiohttp

from proxy.errors import ConfigError
from proxy.secret import Secret

if TYPE_CHECKING:
    from proxy.config import Config

Mode = Literal["none", "explicit", "environment"]

# Lower case first, as curl, Python's urllib and requests read them.
HTTPS_PROXY_VARIABLES: Final = ("https_proxy", "HTTPS_PROXY")
NO_PROXY_VARIABLES: Final = ("no_proxy", "NO_PROXY")
# Every variable some tool reads to pick a proxy; when set and ignored, start-up says so.
PROXY_VARIABLES: Final = (
    *HTTPS_PROXY_VARIABLES,
    "http_proxy",
    "HTTP_PROXY",
    "all_proxy",
    "ALL_PROXY",
)
_HOST_NAME: Final = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
PROXY_AUTH_FIX: Final = (
    "check egress.proxy_user and egress.proxy_password_file (or egress.proxy_password_env)"
)
PROXY_AUTH_HINT: Final = "the forward proxy refused the credentials (HTTP 407): " + PROXY_AUTH_FIX
CHOICES_TEXT: Final = '"egress", "direct" or an http://host:port proxy URL'


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyServer:
    """One HTTP forward proxy: where it listens and the ``Proxy-Authorization`` value, if any."""

    host: str
    port: int
    # The whole header value ("Basic ..."): reveal it only into the CONNECT request.
    authorization: Secret | None = field(default=None, repr=False)
    # The key or variable that named it, for messages (egress.proxy_url, HTTPS_PROXY, ...).
    source: str

    @property
    def url(self) -> str:
        """Return the proxy URL without credentials (``http://host:port``)."""
        return f"http://{authority(self.host, self.port)}"

    @property
    def address(self) -> str:
        """Return ``host:port``, for people."""
        return authority(self.host, self.port)


class ProxyOptions(TypedDict, total=False):
    """The per-request proxy options of aiohttp's client (empty: direct)."""

    proxy: str
    proxy_headers: dict[str, str]


# A destination's own setting: follow [egress], go direct, or use this proxy.
ProxyChoice = Literal["egress", "direct"] | ProxyServer


@dataclass(frozen=True, slots=True, kw_only=True)
class NoProxyEntry:
    """One ``no_proxy`` entry: a host, a domain suffix, or an IP network."""

    text: str
    host: str | None = None  # exact host (lower case, no trailing dot)
    suffix: str | None = None  # ".example": hosts under it
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    # Environment convention: "example" also matches hosts under it.
    with_subdomains: bool = False

    def matches(self, host: str) -> bool:
        """Return True when ``host`` (lower case, no trailing dot) is reached directly."""
        if self.network is not None:
            address = _ip(host)
            return (
                address is not None
                and address.version == self.network.version
                and (address in self.network)
            )
        if self.host is not None:
            return host == self.host or (self.with_subdomains and host.endswith("." + self.host))
        return self.suffix is not None and host.endswith(self.suffix)


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressPolicy:
    """The validated ``[egress]`` table (or what the environment said, in that mode)."""

    mode: Mode = "none"
    proxy: ProxyServer | None = None
    no_proxy: tuple[NoProxyEntry, ...] = ()
    # Credentials for any proxy named by a destination's own URL (oauth.proxy = "http://...").
    authorization: Secret | None = field(default=None, repr=False)
    # Environment mode only: NO_PROXY was "*", so nothing goes through the proxy.
    bypass_all: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRoute:
    """How one destination is reached: directly, or through ``proxy``, and why."""

    host: str
    port: int
    proxy: ProxyServer | None
    why: str  # the key or rule that decided, e.g. "egress.proxy_url", "egress.no_proxy"

    @property
    def direct(self) -> bool:
        """Return True when no proxy is used."""
        return self.proxy is None

    def describe(self) -> str:
        """Return the route for people and logs, never with credentials."""
        if self.proxy is None:
            return f"direct ({self.why})"
        auth = ", with Proxy-Authorization" if self.proxy.authorization is not None else ""
        return f"via proxy {self.proxy.address} ({self.why}{auth})"

    def request_options(self) -> ProxyOptions:
        """Return the per-request proxy options of aiohttp's client (none when direct)."""
        if self.proxy is None:
            return {}
        headers: dict[str, str] = {}
        if self.proxy.authorization is not None:
            # aiohttp sends proxy_headers on the CONNECT request only, for https targets.
            headers["Proxy-Authorization"] = self.proxy.authorization.reveal()
        return {"proxy": self.proxy.url, "proxy_headers": headers}


# -- deciding -----------------------------------------------------------------------------------


def decide(policy: EgressPolicy, choice: ProxyChoice, url: str, *, key: str) -> EgressRoute:
    """Return how to reach ``url`` given the destination's ``choice`` (set at ``key``)."""
    parts = urlsplit(url)
    host = normalise_host(parts.hostname or "")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    if choice == "direct":
        return EgressRoute(host=host, port=port, proxy=None, why=f'{key} = "direct"')
    if isinstance(choice, ProxyServer):
        return EgressRoute(host=host, port=port, proxy=choice, why=key)
    if policy.proxy is None:
        why = "no HTTPS_PROXY set" if policy.mode == "environment" else "no egress proxy"
        return EgressRoute(host=host, port=port, proxy=None, why=why)
    if policy.bypass_all:
        return EgressRoute(host=host, port=port, proxy=None, why="NO_PROXY=*")
    for entry in policy.no_proxy:
        if entry.matches(host):
            where = "NO_PROXY" if policy.mode == "environment" else "egress.no_proxy"
            return EgressRoute(host=host, port=port, proxy=None, why=f"{where} {entry.text}")
    return EgressRoute(host=host, port=port, proxy=policy.proxy, why=policy.proxy.source)


def destinations(config: Config) -> dict[str, EgressRoute]:
    """Return every destination of ``config`` (label -> route): oauth first, then each origin."""
    oauth = config.oauth
    found: dict[str, EgressRoute] = {}
    for url in dict.fromkeys(u for u in (oauth.token_url, oauth.discovery_url) if u):
        origin = _origin(url)
        found[f"oauth {origin}"] = decide(config.egress, oauth.proxy, url, key="oauth.proxy")
    for route in sorted(config.routes, key=lambda r: r.proxy_key != "upstream.proxy"):
        decided = decide(config.egress, route.proxy, route.upstream, key=route.proxy_key)
        label = f"upstream {route.upstream}"
        if label in found and found[label] != decided:
            label += f" ({route.prefix})"  # the same origin reached another way by this route
        found.setdefault(label, decided)
    return found


def describe_destinations(config: Config) -> dict[str, str]:
    """Return, per destination, how it is reached: for /health and the start-up line."""
    return {label: route.describe() for label, route in destinations(config).items()}


def normalise_host(host: str) -> str:
    """Return ``host`` as it is compared: lower case, brackets and one trailing dot removed."""
    return host.strip("[]").lower().removesuffix(".")


# -- failures ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyFailure:
    """A forward proxy's fault: ``proxy_auth`` (credentials refused) or ``proxy`` (any other)."""

    reason: Literal["proxy_auth", "proxy"]
    status: int | None  # the proxy's answer to CONNECT, when it answered
    detail: str  # for logs and `check`: names the proxy, never its credentials


def proxy_failure(route: EgressRoute, exc: BaseException) -> ProxyFailure | None:
    """Return the proxy's fault behind a client error on ``route``, or None if it is not one.

    A CONNECT answered 407 -- or 401, which tinyproxy 1.11 sends for a wrong password (see
    docs/tinyproxy-401-on-connect.md) and which on a CONNECT can only be the proxy's own -- means
    the proxy refused its credentials. A proxy host that does not resolve is the proxy's fault too:
    through a proxy, the destination's name is resolved by the proxy, not here.
    """
    proxy = route.proxy
    if proxy is None:
        return None
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return tunnel_failure(route, exc.status)
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return tunnel_failure(route, None)
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return ProxyFailure(
            reason="proxy",
            status=None,
            detail=f"the forward proxy {proxy.address}: its host name does not resolve",
        )
    return None


def tunnel_failure(route: EgressRoute, status: int | None) -> ProxyFailure:
    """Return the proxy's fault when it answered ``CONNECT`` with ``status`` (None: no answer)."""
    where = f"the forward proxy {route.proxy.address}" if route.proxy else "the forward proxy"
    if status is None:
        return ProxyFailure(reason="proxy", status=None, detail=f"{where} is unreachable")
    if status in (401, 407):
        return ProxyFailure(
            reason="proxy_auth",
            status=status,
            detail=f"{where} refused the credentials (HTTP {status})",
        )
    return ProxyFailure(
        reason="proxy",
        status=status,
        detail=f"{where} refused the tunnel to {authority(route.host, route.port)} "
        f"(CONNECT answered HTTP {status})",
    )


# -- parsing (config.py calls these) --------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ProxyAddress:
    """A parsed proxy URL; ``user``/``password`` only from an environment variable's userinfo."""

    host: str
    port: int
    user: str | None = None
    password: str | None = field(default=None, repr=False)


def parse_proxy_url(value: str, key: str, *, from_environment: bool = False) -> ProxyAddress:
    """Validate an ``http://host:port`` proxy URL; raise ConfigError naming ``key``.

    An ``https://`` proxy (TLS to the proxy itself) is refused: the tunnel's own TLS is end to end
    with the destination either way. In the environment a URL without a scheme means http, and
    credentials in it are taken (that is where such variables carry them); in the configuration
    they are refused (use ``egress.proxy_user`` and ``egress.proxy_password_file``).
    """
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ConfigError(f"{key}: must be an http://host:port URL (no spaces or controls)")
    if from_environment and "://" not in value:
        value = "http://" + value
    parts = urlsplit(value)
    if parts.scheme == "https":
        raise ConfigError(
            f"{key}: https:// proxies (TLS to the proxy itself) are not supported; use the "
            "proxy's http:// port: the tunnel to KSZ is TLS end to end either way"
        )
    if parts.scheme != "http" or not parts.hostname:
        raise ConfigError(f"{key}: must be an http://host:port URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"{key}: must be http://host:port only (no path, query or fragment)")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: has an invalid port") from None
    if not port:
        raise ConfigError(f"{key}: must name the proxy's port (http://host:3128)")
    host = normalise_host(parts.hostname)
    if not (_ip(host) or all(_HOST_NAME.fullmatch(label) for label in host.split("."))):
        raise ConfigError(f"{key}: {host} is not a host name or IP address")
    if parts.username is not None or parts.password is not None:
        if not from_environment:
            raise ConfigError(
                f"{key}: must not contain credentials; set egress.proxy_user and "
                "egress.proxy_password_file (or egress.proxy_password_env)"
            )
        return ProxyAddress(
            host=host,
            port=port,
            user=unquote(parts.username or ""),
            password=unquote(parts.password or ""),
        )
    return ProxyAddress(host=host, port=port)


def parse_no_proxy(entries: Sequence[str], key: str) -> tuple[NoProxyEntry, ...]:
    """Validate the configured ``no_proxy`` list (strict: a leading dot marks a suffix)."""
    parsed = []
    for i, text in enumerate(entries):
        where = f"{key}[{i}]"
        value = text.strip().lower()
        if not value or value != text.lower() or value == "*" or "*" in value:
            raise ConfigError(
                f'{where}: must be a host, ".domain" or an IP network (no wildcards; set '
                '"direct" on a destination to bypass the proxy for it)'
            )
        entry = _entry(value, with_subdomains=False)
        if entry is None:
            raise ConfigError(f'{where}: {text} is not a host, ".domain" or an IP network')
        parsed.append(entry)
    return tuple(parsed)


def no_proxy_from_environment(value: str) -> tuple[tuple[NoProxyEntry, ...], bool]:
    """Parse a ``NO_PROXY`` value; return (entries, bypass everything).

    Entries that cannot be understood are skipped, as curl does; ``host:port`` counts as host.
    """
    entries = []
    for raw in value.split(","):
        text = raw.strip().lower()
        if not text:
            continue
        if text == "*":
            return (), True
        host, _, port = text.rpartition(":") if text.count(":") == 1 else (text, "", "")
        if port.isdigit():
            text = host
        entry = _entry(text.strip("[]").removeprefix("*"), with_subdomains=True)
        if entry is not None:
            entries.append(entry)
    return tuple(entries), False


def policy_from_environment(
    environ: Mapping[str, str], authorization: Secret | None
) -> EgressPolicy:
    """Return the policy ``from_environment = true`` means: HTTPS_PROXY and NO_PROXY.

    ``authorization`` comes from ``egress.proxy_user`` and its password, when set; credentials
    in the variable's URL are the other way to give them, not both.
    """
    named = from_environment(environ)
    entries, bypass_all = no_proxy_from_environment(environment_no_proxy(environ))
    proxy = None
    if named is not None:
        variable, value = named
        key = f"egress.from_environment: {variable}"
        address = parse_proxy_url(value, key, from_environment=True)
        if address.user is not None:
            if authorization is not None:
                raise ConfigError(
                    f"egress.proxy_user: {variable} already carries credentials; set them in "
                    "one place"
                )
            check_user(address.user, key)
            check_password(address.password or "", key)
            authorization = Secret(basic_authorization(address.user, address.password or ""))
        proxy = ProxyServer(
            host=address.host, port=address.port, authorization=authorization, source=variable
        )
    return EgressPolicy(
        mode="environment",
        proxy=proxy,
        no_proxy=entries,
        authorization=authorization,
        bypass_all=bypass_all,
    )


def from_environment(environ: Mapping[str, str]) -> tuple[str, str] | None:
    """Return (variable name, value) of the HTTPS proxy the environment names, if any."""
    for name in HTTPS_PROXY_VARIABLES:
        value = environ.get(name, "").strip()
        if value:
            return name, value
    return None


def environment_no_proxy(environ: Mapping[str, str]) -> str:
    """Return the ``no_proxy`` / ``NO_PROXY`` value (lower case first), or an empty string."""
    for name in NO_PROXY_VARIABLES:
        if name in environ:
            return environ[name]
    return ""


def ignored_variables(environ: Mapping[str, str]) -> list[str]:
    """Return the proxy variables that are set (and therefore ignored outside environment mode)."""
    return [name for name in PROXY_VARIABLES if environ.get(name, "").strip()]


def basic_authorization(user: str, password: str) -> str:
    """Return the ``Proxy-Authorization`` value for HTTP Basic (RFC 7617, UTF-8)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def check_user(user: str, key: str) -> None:
    """Refuse a proxy user name that Basic authentication cannot carry."""
    if not user or ":" in user or any(ord(c) < 0x20 or ord(c) == 0x7F for c in user):
        raise ConfigError(f"{key}: must be a non-empty printable name without ':'")


def check_password(password: str, key: str) -> None:
    """Refuse a proxy password with control characters (it would break the header)."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in password):
        raise ConfigError(f"{key}: the password contains control characters")


def parse_choice(value: str, key: str) -> Literal["egress", "direct"] | ProxyAddress:
    """Validate a destination's ``proxy`` setting: "egress", "direct" or a proxy URL."""
    if value in ("egress", "direct"):
        return "egress" if value == "egress" else "direct"
    if "://" not in value:
        raise ConfigError(f"{key}: must be {CHOICES_TEXT}")
    return parse_proxy_url(value, key)


def authority(host: str, port: int) -> str:
    """Return ``host:port``, with brackets around an IPv6 address."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _entry(value: str, *, with_subdomains: bool) -> NoProxyEntry | None:
    if "/" in value or _ip(value.strip("[]")) is not None:
        try:
            network = ipaddress.ip_network(value.strip("[]"), strict=False)
        except ValueError:
            return None
        return NoProxyEntry(text=value, network=network)
    name = value.removesuffix(".")
    if name.startswith("."):
        labels = name[1:].split(".")
        if not all(_HOST_NAME.fullmatch(label) for label in labels):
            return None
        if with_subdomains:
            return NoProxyEntry(text=value, host=name[1:], with_subdomains=True)
        return NoProxyEntry(text=value, suffix=name)
    if not all(_HOST_NAME.fullmatch(label) for label in name.split(".")):
        return None
    return NoProxyEntry(text=value, host=name, with_subdomains=with_subdomains)


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None
