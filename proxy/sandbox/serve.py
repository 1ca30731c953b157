"""Own how the sandbox's fake servers are started and stopped on a local port.

``serve(app)`` runs an aiohttp application on ``127.0.0.1`` and a free port (or the one given),
over TLS when an ``ssl.SSLContext`` is passed, and returns a ``Served`` that knows its URL and
closes it. The fakes answer quietly: no access log, no signal handlers, so the demo and the
tests can run several of them in one event loop.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass

from aiohttp import web


@dataclass(slots=True)
class Served:
    """An aiohttp application listening on ``host:port`` until ``close()``."""

    runner: web.AppRunner
    host: str
    port: int
    tls: bool = True

    @property
    def url(self) -> str:
        """Return the base URL, e.g. ``https://127.0.0.1:8443`` or ``https://[::1]:8443``."""
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{_authority_host(self.host)}:{self.port}"

    async def close(self) -> None:
        """Stop listening, let in-flight requests finish briefly, then free the port."""
        await self.runner.cleanup()


async def serve(
    app: web.Application,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
    shutdown_timeout_s: float = 2.0,
) -> Served:
    """Start ``app`` on ``host:port`` (port 0 picks a free one) and return where it listens."""
    # A fake's handlers may be parked in an injected delay; a short shutdown bound keeps
    # teardown quick instead of aiohttp's 60 s default.
    runner = web.AppRunner(
        app, access_log=None, handle_signals=False, shutdown_timeout=shutdown_timeout_s
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
        await site.start()
        # With port 0 only the bound socket knows the port the kernel chose.
        address = runner.addresses[0]
    except BaseException:
        await runner.cleanup()
        raise
    return Served(runner=runner, host=host, port=int(address[1]), tls=ssl_context is not None)


def _authority_host(host: str) -> str:
    try:
        is_v6 = ipaddress.ip_address(host).version == 6
    except ValueError:
        is_v6 = False
    return f"[{host}]" if is_v6 else host
