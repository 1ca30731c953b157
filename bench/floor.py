"""The floor: ksz-proxy's stack and nothing else -- the ceiling for one ksz-proxy process.

Usage: ``python bench/floor.py PORT UPSTREAM_ORIGIN CA_FILE``, with ``proxy`` importable (the
harness sets ``PYTHONPATH`` to the repository). The parts one ksz-proxy process is built on: the
low-level ``aiohttp.web.Server`` with one handler on uvloop, and ksz-proxy's own upstream client
(``proxy.upstream_client.UpstreamClient``: pooled, verified TLS from ``proxy.tls``) with its
default limits. None of ksz-proxy's own work: a static ``Authorization`` header instead of a token
(as the nginx reference), no checks, no access log, no metrics. Hop-by-hop headers are dropped
both ways (the fixed set and every name listed in ``Connection``). An answer of known length up to
64 KiB goes back in one write, as ksz-proxy sends it; a longer one or one of unknown length, and
every request body, stream. Stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import uvloop
from aiohttp import web
from listen import serve_until_signal
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import UpstreamError
from proxy.tls import client_context
from proxy.upstream_client import UpstreamClient

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)
# Framing is redone on each side; the upstream client sets Host; Expect is answered here.
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "authorization", "expect"}
RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
AUTHORIZATION = "Bearer bench"
ONE_WRITE_MAX = 64 * 1024  # proxy/forward.py's CHUNK: the same small-answer rule as ksz-proxy
NO_BODY_STATUSES = frozenset({204, 304})


def filtered(headers: CIMultiDictProxy[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Return ``headers`` without the names in ``drop`` and those listed in ``Connection``."""
    if "Connection" in headers:
        listed = (n.strip().lower() for v in headers.getall("Connection") for n in v.split(","))
        drop = drop.union(listed)
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])


async def main(port: int, origin: str, ca_file: str) -> None:
    """Forward every request to ``origin`` until SIGTERM or SIGINT."""
    # ksz-proxy's [upstream] defaults (proxy/config_sections.py).
    client = UpstreamClient(
        ssl_context=client_context(Path(ca_file)),
        max_connections=100,
        connect_timeout_s=5.0,
        read_timeout_s=60.0,
        total_timeout_s=300.0,
    )

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = filtered(request.headers, REQUEST_DROP)
        headers["Authorization"] = AUTHORIZATION
        body, length = None, None
        if request.body_exists:
            if request.headers.get("Expect", "").lower() == "100-continue":
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            # The caller's framing: its Content-Length, or chunked when it sent none.
            body, length = request.content.iter_any(), request.content_length
            if length is not None:
                headers["Content-Length"] = str(length)
        try:
            upstream = await client.request(
                request.method, origin, request.raw_path, headers, body, length
            )
        except (UpstreamError, OSError, TimeoutError):
            return web.Response(status=502, text="upstream failed\n")
        response: web.StreamResponse | None = None
        try:
            back = filtered(upstream.headers, RESPONSE_DROP)
            no_body = request.method == "HEAD" or upstream.status in NO_BODY_STATUSES
            size = upstream.content_length
            if size is not None and size <= ONE_WRITE_MAX and not no_body:
                whole = await upstream.read()
                return web.Response(
                    status=upstream.status, reason=upstream.reason, headers=back, body=whole
                )
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=back
            )
            if size is not None and upstream.status != 204:
                response.content_length = size  # HEAD and 304 keep the full answer's length
            await response.prepare(request)
            if not no_body:
                while chunk := await upstream.read_chunk():
                    await response.write(chunk)
            await response.write_eof()
            return response
        except (UpstreamError, OSError, TimeoutError):
            if response is None or not response.prepared:
                return web.Response(status=502, text="upstream failed\n")
            # Headers are gone already: a clean end would pass a truncated body for whole.
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError from None
        finally:
            upstream.release()  # a connection left mid-body is closed, never reused

    await serve_until_signal(web.Server(handle, access_log=None, auto_decompress=False), port)
    await client.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
