"""Own the checklist's building blocks: a ``StepResult`` per line, the settings, the endpoints.

A ``StepResult`` is one checklist line: a step, its target, ok / warning / failed / skipped, and
for anything but ok the likely cause and the fix. ``proxy.onboarding.probes`` (which re-exports
these names) and ``steps.py`` build them; ``check.py`` renders them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal
from urllib.parse import urlsplit

from proxy.egress import EgressRoute, ProxyServer

Status = Literal["ok", "warning", "failed", "skipped"]

NAMES: Final = {1: "config", 2: "dns", 3: "tcp", 4: "tls", 5: "token", 6: "health"}
ESB: Final = "the KSZ ESB team (esb@ksz-bcss.fgov.be)"
FIREWALL_FORM: Final = '"EXTRANET - Firewall IP Flux Management"'


@dataclass(frozen=True, slots=True, kw_only=True)
class CheckSettings:
    """Time limits of the network steps."""

    connect_timeout_s: float = 5.0
    # After the handshake, how long to listen for a TLS 1.3 alert refusing the client
    # certificate: TLS 1.3 servers judge it only after the client considers the handshake done.
    tls_probe_s: float = 0.3
    health_timeout_s: float = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StepResult:
    """The outcome of one step for one target (a file, a host, a scope set, an API path)."""

    number: int
    target: str
    status: Status
    detail: str
    cause: str | None = None
    fix: str | None = None

    @property
    def name(self) -> str:
        """Return the step's stable name (config, dns, tcp, tls, token, health)."""
        return NAMES[self.number]

    @property
    def passed(self) -> bool:
        """Return True for ok and warning (passed, with a remark)."""
        return self.status in ("ok", "warning")


@dataclass(frozen=True, slots=True, kw_only=True)
class Endpoint:
    """One remote host:port the proxy talks to, with the trust used for it."""

    label: str  # "token endpoint" or "REST API"
    url: str
    url_key: str  # the configuration key naming the URL
    ca_key: str
    ca_file: Path | None
    client_certificate: bool
    extranet: bool
    # How the proxy reaches it (direct or through a forward proxy); None: direct.
    route: EgressRoute | None = None

    @property
    def proxy(self) -> ProxyServer | None:
        """Return the forward proxy on the way, if any."""
        return self.route.proxy if self.route is not None else None

    @property
    def via(self) -> str:
        """Return "via proxy host:port" for a proxied destination, else an empty string."""
        proxy = self.proxy
        return f"via proxy {proxy.address}" if proxy is not None else ""

    @property
    def host(self) -> str:
        """Return the host name or address."""
        return urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        """Return the port (443 when the URL names none)."""
        return urlsplit(self.url).port or 443

    @property
    def target(self) -> str:
        """Return the label with host and port, for the checklist."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.label} {host}:{self.port}"


def fail(number: int, target: str, detail: str, cause: str, fix: str) -> StepResult:
    """Return a failed step with its likely cause and the fix."""
    return StepResult(
        number=number, target=target, status="failed", detail=detail, cause=cause, fix=fix
    )


def skip(number: int, target: str, why: str) -> StepResult:
    """Return a step not run because one it depends on failed."""
    return StepResult(number=number, target=target, status="skipped", detail=f"skipped: {why}")


async def close_quietly(writer: asyncio.StreamWriter) -> None:
    """Close a probe connection without waiting long for the peer."""
    writer.close()
    # A TLS peer may never answer close_notify; the probe must not hang on it.
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(1.0):
            await writer.wait_closed()


class Unresolved(Exception):
    """A name that did not resolve: ``reason`` is the resolver's, None when it did not answer."""

    def __init__(self, reason: str | None) -> None:
        super().__init__(reason)
        self.reason = reason


async def lookup(host: str, port: int, timeout_s: float) -> list[str]:
    """Return the distinct addresses ``host`` resolves to, in order; raise ``Unresolved``."""
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, port, type=socket.SOCK_STREAM
            )
    except TimeoutError:
        raise Unresolved(None) from None
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "invalid name"
        raise Unresolved(reason) from None
    return list(dict.fromkeys(str(info[4][0]) for info in infos))
