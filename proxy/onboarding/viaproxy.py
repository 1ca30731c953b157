"""Own steps 2 and 3 for a destination reached through a forward proxy.

DNS resolves the forward proxy's name (the destination's is resolved by the proxy); TCP reaches
the proxy and asks for the tunnel (``CONNECT``: its status is reported, 407 as refused
credentials). Step 4 (TLS through the tunnel) stays with the other probes in ``probes.py``.
"""

from __future__ import annotations

import asyncio
import ipaddress

from proxy.egress import PROXY_AUTH_FIX, ProxyServer
from proxy.onboarding.results import (
    FIREWALL_FORM,
    CheckSettings,
    Endpoint,
    StepResult,
    Unresolved,
    close_quietly,
    fail,
    lookup,
)
from proxy.onboarding.tunnel import ProxyProtocolError, TunnelRefused, open_tunnel


async def dns_of_proxy(e: Endpoint, proxy: ProxyServer, settings: CheckSettings) -> StepResult:
    target = f"{e.label} {e.host}"
    fix = f"check the proxy's host name in {proxy.source} and this server's DNS settings"
    try:
        ipaddress.ip_address(proxy.host)
    except ValueError:
        pass
    else:
        return StepResult(
            number=2, target=target, status="ok", detail=f"{e.via}: the proxy resolves the name"
        )
    try:
        addresses = await lookup(proxy.host, proxy.port, settings.connect_timeout_s)
    except Unresolved as exc:
        if exc.reason is None:
            return fail(
                2,
                target,
                f"{e.via}: no answer from the DNS resolver for the proxy's name",
                "the DNS servers of this machine do not answer",
                fix,
            )
        return fail(
            2,
            target,
            f"{e.via}: the proxy's name {proxy.host} does not resolve ({exc.reason})",
            "the forward proxy's name is unknown here",
            fix,
        )
    return StepResult(
        number=2,
        target=target,
        status="ok",
        detail=f"{e.via} ({proxy.host} resolves to {', '.join(addresses)}); "
        f"the proxy resolves {e.host}",
    )


async def connect_through_proxy(
    e: Endpoint, proxy: ProxyServer, settings: CheckSettings
) -> StepResult:
    connect = f"CONNECT {e.host}:{e.port}"
    try:
        async with asyncio.timeout(settings.connect_timeout_s):
            tunnel = await open_tunnel(proxy, e.host, e.port)
    except TimeoutError:
        return fail(
            3,
            e.target,
            f"{e.via}: no answer within {settings.connect_timeout_s:g} s",
            "the forward proxy does not answer (a firewall between this server and the proxy, "
            "or the proxy waits on the destination)",
            f"check {proxy.source} and the way to the proxy with your network team",
        )
    except TunnelRefused as exc:
        return _tunnel_refused(e, proxy, connect, exc)
    except ProxyProtocolError as exc:
        return fail(
            3,
            e.target,
            f"{e.via}: {connect} got no proper answer ({exc})",
            f"{proxy.address} does not behave like an HTTP forward proxy",
            f"check the port in {proxy.source}",
        )
    except OSError as exc:
        return fail(
            3,
            e.target,
            f"{e.via}: cannot reach the proxy ({exc.strerror or type(exc).__name__})",
            f"the forward proxy {proxy.address} is down or not reachable from this server",
            f"check {proxy.source} and that the proxy runs and accepts this server",
        )
    await close_quietly(tunnel.writer)
    return StepResult(
        number=3,
        target=e.target,
        status="ok",
        detail=f"{e.via}: {connect} answered {tunnel.status} {tunnel.reason}".rstrip(),
    )


def _tunnel_refused(
    e: Endpoint, proxy: ProxyServer, connect: str, exc: TunnelRefused
) -> StepResult:
    detail = f"{e.via}: {connect} answered {exc.status}"
    if exc.status in (401, 407):
        # 401: tinyproxy 1.11 answers a wrong password that way (docs/tinyproxy-401-on-connect.md).
        cause = f"the forward proxy {proxy.address} wants valid credentials (Basic)"
        if proxy.authorization is None:
            cause += "; none are configured"
        return fail(3, e.target, f"{detail}: proxy refused the credentials", cause, PROXY_AUTH_FIX)
    if exc.status in (502, 503, 504):
        fix = f"ask your network team to open {e.host} port {e.port} from the proxy"
        if e.extranet:
            fix += f" (KSZ extranet flows are opened with the form {FIREWALL_FORM})"
        return fail(
            3,
            e.target,
            detail,
            f"the forward proxy could not reach {e.host}:{e.port} (its DNS or its firewall)",
            fix,
        )
    return fail(
        3,
        e.target,
        detail,
        f"the forward proxy does not allow a tunnel to {e.host}:{e.port}",
        f"ask your network team to allow CONNECT to {e.host} port {e.port}; if this host is "
        "reached without the proxy, list it in egress.no_proxy",
    )
