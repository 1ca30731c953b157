"""Own the CONNECT handshake with a forward proxy, for the probes of ``ksz-proxy check``.

The proxy runtime tunnels with aiohttp's client; ``check`` needs to see each stage on its own
(reach the proxy, its answer to CONNECT, then TLS through the tunnel), so it opens tunnels here:
``open_tunnel`` sends ``CONNECT host:port`` (with ``Proxy-Authorization`` when configured) and
reads the answer's head; on 200 the stream is the tunnel, ready for ``StreamWriter.start_tls``.
The authorization value goes into the request only, never into a result or an error.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Final

from proxy.egress import ProxyServer, authority

MAX_HEAD_BYTES: Final = 16 * 1024


class TunnelRefused(Exception):
    """The proxy answered CONNECT with something other than 200."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"CONNECT answered {status}")
        self.status = status
        self.reason = reason


class ProxyProtocolError(Exception):
    """The proxy's answer to CONNECT is not an HTTP response head."""


@dataclass(slots=True)
class Tunnel:
    """An open CONNECT tunnel: the proxy's answer and the streams through it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    reason: str


async def open_tunnel(proxy: ProxyServer, host: str, port: int) -> Tunnel:
    """Connect to ``proxy`` and ask for a tunnel to ``host:port``; raise TunnelRefused if refused.

    Connection errors (``OSError``) come through as they are; the caller bounds the time.
    """
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    try:
        target = authority(host, port)
        lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
        if proxy.authorization is not None:
            lines.append("Proxy-Authorization: " + proxy.authorization.reveal())
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            raise ProxyProtocolError("the answer head is too long") from None
        except asyncio.IncompleteReadError:
            raise ProxyProtocolError("the proxy closed the connection without answering") from None
        status, reason = _status_line(head[:MAX_HEAD_BYTES])
        if status != 200:
            raise TunnelRefused(status, reason)
    except BaseException:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        raise
    return Tunnel(reader=reader, writer=writer, status=status, reason=reason)


def _status_line(head: bytes) -> tuple[int, str]:
    line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProxyProtocolError("the answer to CONNECT is not HTTP")
    reason = parts[2] if len(parts) > 2 else ""
    # Only a short printable reason phrase is kept: it ends up in the checklist.
    reason = "".join(c for c in reason[:64] if c.isprintable())
    return int(parts[1]), reason
