"""Run the sandbox's fake KSZ inside the image, for tests/test_image.py.

Started in a second container that shares the proxy container's loopback-only network namespace:
``python /fakes/image_fakes.py /fakes`` serves the fake authorization server on
``https://127.0.0.1:8443`` and the fake KSZ REST API on ``https://127.0.0.1:8444`` with the
server certificate the test made (``server-cert.pem``, ``server-key.pem``), registers the
partner certificate (``partner-cert.pem``) for ``CLIENT_ID``, prints ``ready`` and then one JSON
line for every request the fake API receives, until SIGTERM. Only the image's own Python and
packages are used: this file is the one thing mounted in.
"""

from __future__ import annotations

import asyncio
import json
import signal
import ssl
import sys
from pathlib import Path
from typing import Final

from cryptography import x509

from proxy.sandbox.authserver import FakeAuthServer, RegisteredClient
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream

CLIENT_ID: Final = "image:test:client"
SCOPE: Final = "scope:image:test"
AUTH_PORT: Final = 8443
API_PORT: Final = 8444


async def main(folder: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(folder / "server-cert.pem", folder / "server-key.pem")
    partner = x509.load_pem_x509_certificate((folder / "partner-cert.pem").read_bytes())
    auth = FakeAuthServer(
        clients=[
            RegisteredClient(
                client_id=CLIENT_ID,
                certificate=partner,
                scopes=frozenset({SCOPE}),
                default_scopes=frozenset({SCOPE}),
            )
        ]
    )
    upstream = FakeUpstream(introspect=auth.introspect)
    served = [
        await serve(auth.make_app(), ssl_context=context, port=AUTH_PORT),
        await serve(upstream.make_app(), ssl_context=context, port=API_PORT),
    ]
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    reported = 0
    while not stop.is_set():
        for seen in upstream.seen[reported:]:
            # What the fake API saw, the token itself left out.
            bearer = [v for v in seen.header_values("Authorization") if v.startswith("Bearer ")]
            line = {"target": seen.target, "bearer": len(bearer), "trace_id": seen.trace_id}
            print(json.dumps(line), flush=True)
            reported += 1
        await asyncio.sleep(0.05)
    for item in reversed(served):
        await item.close()


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
