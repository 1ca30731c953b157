"""A bare pass-through proxy: aiohttp server and ClientSession on uvloop, no token, no checks.

Usage: ``python bench/bare.py PORT UPSTREAM_ORIGIN CA_FILE``. Streams both ways like ksz-proxy,
over the same kind of verified, pooled TLS client session; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import ssl
import sys

import aiohttp
import uvloop
from aiohttp import web
from listen import serve_until_signal
from multidict import CIMultiDict
from yarl import URL

DROP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})


async def main(port: int, origin: str, ca_file: str) -> None:
    """Forward every request to ``origin`` until SIGTERM or SIGINT."""
    connector = aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=ca_file))
    session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in DROP)
        data = request.content if request.body_exists else None
        url = URL(origin + request.raw_path, encoded=True)
        async with session.request(
            request.method, url, headers=headers, data=data, allow_redirects=False
        ) as upstream:
            back = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in DROP)
            response = web.StreamResponse(status=upstream.status, headers=back)
            if upstream.content_length is not None:
                response.content_length = upstream.content_length
            await response.prepare(request)
            async for chunk in upstream.content.iter_chunked(64 * 1024):
                await response.write(chunk)
            await response.write_eof()
            return response

    await serve_until_signal(web.Server(handle, access_log=None), port)
    await session.close()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), sys.argv[2], sys.argv[3]))
