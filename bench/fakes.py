"""Run the sandbox fakes for the benchmark in a process of their own.

Serves, on 127.0.0.1:

- the fake authorization server (``FakeAuthServer``) over TLS, with the partner registered;
- the fake KSZ REST API (``FakeUpstream``) over TLS, the far end of the streaming measurements;
- a plain-HTTP control listener for the harness: ``GET /counts`` (token requests, upstream
  requests), ``POST /delay?seconds=S`` (the next token request waits S seconds, so that a burst
  of requests meets a cold proxy), ``POST /reset`` (counters and records).

Usage: ``python bench/fakes.py DIR``. DIR holds ``server.pem``/``server.key`` (TLS) and
``partner.pem`` (the certificate the client assertions are verified with). Once listening, the
URLs are written to ``DIR/fakes.json``; the process runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path

import uvloop
from aiohttp import web
from cryptography import x509

from proxy.sandbox.authserver import FakeAuthServer, Fault, RegisteredClient
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream

CLIENT_ID = "bench:client:confidential"
SCOPE = "scope:bench:consult"


def _control_app(auth: FakeAuthServer, upstream: FakeUpstream) -> web.Application:
    async def counts(request: web.Request) -> web.Response:
        del request
        return web.json_response(
            {"token_requests": auth.token_requests, "upstream_requests": upstream.count}
        )

    async def delay(request: web.Request) -> web.Response:
        auth.inject(Fault(kind="delay", delay_s=float(request.query.get("seconds", "1"))))
        return web.json_response({"ok": True})

    async def reset(request: web.Request) -> web.Response:
        del request
        auth.reset_counters()
        auth.clear_faults()
        upstream.reset()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/counts", counts)
    app.router.add_post("/delay", delay)
    app.router.add_post("/reset", reset)
    return app


async def main(folder: Path) -> None:
    """Serve the fakes until SIGTERM or SIGINT."""
    partner = x509.load_pem_x509_certificate((folder / "partner.pem").read_bytes())
    auth = FakeAuthServer(
        clients=[
            RegisteredClient(
                client_id=CLIENT_ID,
                certificate=partner,
                scopes=frozenset({SCOPE}),
                default_scopes=frozenset({SCOPE}),
            )
        ],
        expires_in=3600,
    )
    # The streamed bodies are hashed as they pass, never kept.
    upstream = FakeUpstream(introspect=auth.introspect)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(folder / "server.pem", folder / "server.key")
    served = [
        await serve(auth.make_app(), ssl_context=context),
        await serve(upstream.make_app(), ssl_context=context),
        await serve(_control_app(auth, upstream)),
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    urls = {"auth": served[0].url, "upstream": served[1].url, "control": served[2].url}
    ready = folder / "fakes.json.tmp"
    ready.write_text(json.dumps(urls), encoding="utf-8")
    ready.rename(folder / "fakes.json")  # appears whole, never half-written
    try:
        await stop.wait()
    finally:
        for item in reversed(served):
            await item.close()


if __name__ == "__main__":
    uvloop.run(main(Path(sys.argv[1])))
