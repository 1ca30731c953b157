"""Own the network probes of ``ksz-proxy check`` (steps 2 to 4).

The checklist's building blocks (``StepResult``, ``CheckSettings``, ``Endpoint``, ``fail``,
``skip``) live in ``results.py`` and stay importable from here. The probes connect the way the
proxy does, to every host it needs (the token endpoint, each REST origin), one step building on
the other:

2. DNS: the name resolves (``loop.getaddrinfo``);
3. TCP: the port accepts a connection -- on the extranet a timeout means the firewall flow is not
   open yet, which the KSZ ESB team opens on a signed form;
4. TLS: the handshake succeeds with the proxy's own client context (system CAs plus the
   configured CA file, TLS 1.2 or newer, name checked, client certificate when configured).

A destination reached through a forward proxy (``[egress]``, ``oauth.proxy``, ``upstream.proxy``)
is probed the way the proxy reaches it, and each step says so ("via proxy host:port"): DNS
resolves the forward proxy's name (the destination's is resolved by the proxy), TCP reaches the
proxy and asks for the tunnel (``CONNECT``: its status is reported, 407 as refused credentials),
both in ``viaproxy.py``; TLS runs through the tunnel, verified against the destination as without
a proxy.
"""

from __future__ import annotations

import asyncio
import ipaddress
import ssl
from collections.abc import Sequence
from typing import Final

from cryptography import x509

from proxy.config import Config, Route
from proxy.credentials import Credentials
from proxy.egress import decide
from proxy.endpoints import ENDPOINTS

# The building blocks have their own module; these names stay importable from here.
from proxy.onboarding.results import ESB as ESB
from proxy.onboarding.results import FIREWALL_FORM as FIREWALL_FORM
from proxy.onboarding.results import NAMES as NAMES
from proxy.onboarding.results import CheckSettings as CheckSettings
from proxy.onboarding.results import Endpoint as Endpoint
from proxy.onboarding.results import Status as Status
from proxy.onboarding.results import StepResult as StepResult
from proxy.onboarding.results import Unresolved, lookup
from proxy.onboarding.results import close_quietly as close_quietly
from proxy.onboarding.results import fail as fail
from proxy.onboarding.results import skip as skip
from proxy.onboarding.tunnel import ProxyProtocolError, TunnelRefused, open_tunnel
from proxy.onboarding.viaproxy import connect_through_proxy, dns_of_proxy
from proxy.tls import client_context

# Alerts a server sends when it wants, or refuses, the client's certificate (mutual TLS).
_CLIENT_CERT_ALERTS: Final = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "UNKNOWN_CA")
_CLOSED: Final = "CLOSED_AFTER_HANDSHAKE"


# -- steps 2 to 4 ------------------------------------------------------------------------------


def url_source(config: Config, key: str) -> str:
    """Name where the URL at ``key`` came from: the key itself, or the built-in endpoint table.

    A hint to "check oauth.token_url" misleads when that key is not in the file at all.
    """
    url = config.oauth.token_url if key == "oauth.token_url" else config.upstream.url
    if config.environment is not None:
        token_url, rest_url = ENDPOINTS[(config.environment, config.channel)]
        if url == (token_url if key == "oauth.token_url" else rest_url):
            what = "token URL" if key == "oauth.token_url" else "REST URL"
            return (
                f"the {what} from environment = {config.environment}, channel = "
                f"{config.channel} (the built-in table; {key} would override it)"
            )
    return key


def endpoints(config: Config, routes: Sequence[Route]) -> list[Endpoint]:
    """Return the token endpoint, then each distinct REST origin of ``routes``."""
    extranet = config.channel == "extranet"
    oauth = config.oauth
    token_url = oauth.token_url or oauth.discovery_url or ""
    found = [
        Endpoint(
            label="token endpoint",
            url=token_url,
            url_key=url_source(config, "oauth.token_url")
            if oauth.token_url
            else "oauth.discovery_url",
            ca_key="oauth.ca_file",
            ca_file=oauth.ca_file,
            client_certificate=False,
            extranet=extranet,
            route=decide(config.egress, oauth.proxy, token_url, key="oauth.proxy"),
        )
    ]
    for route in routes:
        if any(e.url == route.upstream for e in found[1:]):
            continue
        found.append(
            Endpoint(
                label="REST API",
                url=route.upstream,
                url_key=url_source(config, "upstream.url")
                if route.upstream == config.upstream.url
                else "routes[].upstream",
                ca_key="upstream.ca_file",
                ca_file=config.upstream.ca_file,
                client_certificate=config.upstream.client_certificate,
                extranet=extranet,
                route=decide(config.egress, route.proxy, route.upstream, key=route.proxy_key),
            )
        )
    return found


async def network(
    e: Endpoint, credentials: Credentials, settings: CheckSettings
) -> tuple[StepResult, StepResult, StepResult]:
    """Return the DNS, TCP and TLS results for one endpoint, skipping after a failure."""
    dns = await _dns(e, settings)
    if not dns.passed:
        return dns, skip(3, e.target, "DNS failed"), skip(4, e.target, "DNS failed")
    tcp = await _tcp(e, settings)
    if not tcp.passed:
        return dns, tcp, skip(4, e.target, "TCP connect failed")
    return dns, tcp, await _tls(e, credentials, settings)


async def _dns(e: Endpoint, settings: CheckSettings) -> StepResult:
    if e.proxy is not None:
        return await dns_of_proxy(e, e.proxy, settings)
    target = f"{e.label} {e.host}"
    try:
        ipaddress.ip_address(e.host)
    except ValueError:
        pass
    else:
        return StepResult(number=2, target=target, status="ok", detail="an IP address")
    fix = f"check the host name in {e.url_key} and this server's DNS settings"
    if e.host.endswith(".ksz-bcss.fgov.be"):
        fix += (
            "; the KSZ entry points are b2b-test.ksz-bcss.fgov.be (85.91.184.96), "
            "b2b-acpt.ksz-bcss.fgov.be (85.91.184.103) and b2b.ksz-bcss.fgov.be (85.91.184.102)"
        )
    try:
        addresses = await lookup(e.host, e.port, settings.connect_timeout_s)
    except Unresolved as exc:
        if exc.reason is None:
            return fail(
                2,
                target,
                f"no answer from the DNS resolver within {settings.connect_timeout_s:g} s",
                "the DNS servers of this machine do not answer",
                fix,
            )
        return fail(2, target, f"does not resolve ({exc.reason})", "the name is unknown", fix)
    return StepResult(
        number=2, target=target, status="ok", detail="resolves to " + ", ".join(addresses)
    )


async def _tcp(e: Endpoint, settings: CheckSettings) -> StepResult:
    if e.proxy is not None:
        return await connect_through_proxy(e, e.proxy, settings)
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            _reader, writer = await asyncio.open_connection(e.host, e.port)
    except TimeoutError:
        if e.extranet:
            cause = (
                "no answer: a firewall drops the packets; on the extranet this means the flow "
                f"from this server to {e.host} port {e.port} is not open yet"
            )
            fix = (
                f"ask for the flow with the form {FIREWALL_FORM}, signed and sent to {ESB} (one "
                "form covers test, acpt and prod; REST uses port 4543, and a partner already "
                "calling a KSZ SOAP service over the extranet has it open); also check your own "
                "outbound firewall"
            )
        else:
            cause = "no answer: a firewall drops the packets"
            fix = (
                f"open outbound HTTPS to {e.host}:{e.port} in your firewall; for the test "
                f"environment over the internet Smals must also allow your source IP range (ask "
                f"{ESB})"
            )
        return fail(3, e.target, f"timed out after {settings.connect_timeout_s:g} s", cause, fix)
    except ConnectionRefusedError:
        fix = f"check the port in {e.url_key}"
        if e.extranet and e.label == "REST API":
            fix += " (KSZ REST services on the extranet listen on port 4543)"
        return fail(3, e.target, "connection refused", f"nothing listens on port {e.port}", fix)
    except OSError as exc:
        return fail(
            3,
            e.target,
            f"cannot connect ({exc.strerror or type(exc).__name__})",
            "no network route to the host",
            "check the routing from this server (extranet line, VPN, default gateway)",
        )
    peer = writer.get_extra_info("peername")
    await close_quietly(writer)
    detail = f"connected to {peer[0]}" if peer else "connected"
    if e.route is not None and e.route.why != "no egress proxy":
        # A proxy is configured somewhere: say why this destination is reached without it.
        detail += f", {e.route.describe()}"
    return StepResult(number=3, target=e.target, status="ok", detail=detail)


async def _tls(e: Endpoint, credentials: Credentials, settings: CheckSettings) -> StepResult:
    context = client_context(
        e.ca_file, client_credentials=credentials if e.client_certificate else None
    )
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            reader, writer = await _open_tls(e, context)
    except (TunnelRefused, ProxyProtocolError):
        return fail(
            4,
            e.target,
            f"{e.via}: the tunnel failed this time",
            "the forward proxy refused a tunnel it granted in step 3",
            "run the check again; if it persists, look at the proxy's log",
        )
    except ssl.SSLError as exc:
        return _tls_failure(e, exc)
    except TimeoutError:
        return fail(
            4,
            e.target,
            f"the handshake did not finish within {settings.connect_timeout_s:g} s",
            "the port accepts connections but does not speak TLS, or a firewall interferes",
            f"check the URL in {e.url_key}",
        )
    except OSError as exc:
        return fail(
            4,
            e.target,
            f"the connection broke during the handshake ({exc.strerror or type(exc).__name__})",
            "a firewall or TLS-inspecting proxy interferes, or the server refuses this client",
            "check with your network team; compare with `openssl s_client -connect HOST:PORT`",
        )
    try:
        tls_object = writer.get_extra_info("ssl_object")
        version = tls_object.version() if tls_object is not None else "TLS"
        der = tls_object.getpeercert(binary_form=True) if tls_object is not None else None
        refused = await _refusal_after_handshake(reader, settings.tls_probe_s)
    finally:
        await close_quietly(writer)
    if refused is not None:
        return _tls_refusal(e, refused)
    detail = f"{version}, name and chain verified"
    if e.proxy is not None:
        detail = f"{e.via}, end to end through the tunnel: {detail}"
    if der:
        server = x509.load_der_x509_certificate(der)
        detail += (
            f"; server certificate {server.subject.rfc4514_string()} issued by "
            f"{server.issuer.rfc4514_string()}, valid until "
            f"{server.not_valid_after_utc:%Y-%m-%d}"
        )
    if e.client_certificate:
        detail += "; client certificate accepted"
    return StepResult(number=4, target=e.target, status="ok", detail=detail)


async def _open_tls(
    e: Endpoint, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open TLS to the endpoint: directly, or through a CONNECT tunnel of its proxy."""
    if e.proxy is None:
        return await asyncio.open_connection(e.host, e.port, ssl=context, server_hostname=e.host)
    tunnel = await open_tunnel(e.proxy, e.host, e.port)
    try:
        await tunnel.writer.start_tls(context, server_hostname=e.host)
    except BaseException:
        await close_quietly(tunnel.writer)
        raise
    return tunnel.reader, tunnel.writer


async def _refusal_after_handshake(reader: asyncio.StreamReader, wait_s: float) -> str | None:
    """Return why the server dropped us right after the handshake, or None if it did not."""
    try:
        async with asyncio.timeout(wait_s):
            data = await reader.read(1)
    except ssl.SSLError as exc:
        return _reason(exc)
    except (TimeoutError, OSError):
        return None  # silence is what a healthy server waiting for a request sounds like
    # Some servers close without a word (no alert) when they refuse the client certificate.
    return None if data else _CLOSED


def _tls_failure(e: Endpoint, exc: ssl.SSLError) -> StepResult:
    if isinstance(exc, ssl.SSLCertVerificationError):
        code, message = exc.verify_code, exc.verify_message or exc.reason or "verify failed"
        if code == 62 or "mismatch" in message:
            cause = f"the server's certificate does not name {e.host}"
            fix = (
                f"use the host name of the KSZ endpoint table in {e.url_key}, not an address "
                "or an alias"
            )
        elif code == 10:
            cause = "the server's certificate has expired"
            fix = "check this server's clock; if it is right, report the expired certificate to KSZ"
        elif code == 9:
            cause = "the server's certificate is not valid yet"
            fix = "check this server's clock (NTP)"
        else:
            cause = (
                f"the server's certificate is not trusted: its CA is neither in the system "
                f"trust store nor in {e.ca_key}"
            )
            fix = (
                f"set {e.ca_key} to a PEM file with the CA of the server's certificate chain "
                "(behind a TLS-inspecting firewall: that firewall's CA)"
            )
            if e.proxy is not None:
                cause += f"; the forward proxy {e.proxy.address} may be inspecting TLS"
        return fail(4, e.target, f"certificate verify failed ({message})", cause, fix)
    return _tls_refusal(e, _reason(exc))


def _reason(exc: ssl.SSLError) -> str:
    return str(getattr(exc, "reason", None) or type(exc).__name__).upper()


def _tls_refusal(e: Endpoint, reason: str) -> StepResult:
    closed = reason == _CLOSED
    if closed or any(alert in reason for alert in _CLIENT_CERT_ALERTS):
        detail = (
            "the server closed the connection right after the handshake"
            if closed
            else "the server refused the client"
        )
        likely = "probably " if closed else ""
        if e.client_certificate:
            cause = (
                f"the server {likely}refused the partner certificate presented for mutual TLS "
                f"({reason})"
            )
            fix = (
                "present the certificate KSZ registered for this environment (see `ksz-proxy "
                "cert-info -c CONFIG`); if KSZ does not use mutual TLS here, set "
                "upstream.client_certificate = false"
            )
        elif e.label == "REST API":
            cause = f"the server {likely}asks for a client certificate (mutual TLS) ({reason})"
            fix = "set upstream.client_certificate = true to present the partner certificate"
        else:
            cause = f"the token endpoint {likely}asks for a client certificate ({reason})"
            fix = (
                f"check {e.url_key}: the Social Security token endpoints need no client certificate"
            )
        return fail(4, e.target, detail, cause, fix)
    if "WRONG_VERSION_NUMBER" in reason or "RECORD_LAYER" in reason:
        cause = "the port does not speak TLS (plain HTTP?)"
        fix = f"check the scheme and port in {e.url_key}"
    elif "PROTOCOL_VERSION" in reason or "UNSUPPORTED_PROTOCOL" in reason:
        cause = "the server offers no TLS version from 1.2 on"
        fix = "ksz-proxy requires TLS 1.2 or newer; check the URL, or ask the server's owner"
    else:
        cause = "the TLS handshake failed"
        fix = "compare with `openssl s_client -connect HOST:PORT -servername HOST`"
    return fail(4, e.target, f"handshake failed ({reason})", cause, fix)
