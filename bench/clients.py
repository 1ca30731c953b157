"""Compare upstream HTTP clients side by side (issue 17): criteria met, throughput, CPU per request.

The candidates are installed into a virtual environment of their own, never the project's:

    python3 -m venv /tmp/clients-venv
    /tmp/clients-venv/bin/pip install -e . aiosonic pyreqwest curl-cffi httpr trustme
    /tmp/clients-venv/bin/python bench/clients.py [--seconds 3] [--rounds 3] [-c 32]

For each client, first the criteria (against tests/support/rawupstream.py, a scripted HTTPS upstream
answering the exact bytes it is given): the request line and headers as sent byte-exact with
nothing added, a redirect returned, a gzip body kept, and the malformed answers refused. Then, in
a process of its own per client and round, ``-c`` concurrent GETs of the bench's small document
from a TLS nginx for ``--seconds``: requests/s and the client process's CPU time per request
(threads included). Nothing here asserts; the table goes to stdout for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

Fetch = Callable[
    [str, str, list[tuple[str, str]]], Awaitable[tuple[int, list[tuple[str, str]], bytes]]
]
CLIENTS = ("ours", "aiohttp", "aiosonic", "pyreqwest", "curl-cffi", "httpr")


async def make_client(name: str, ca_file: str) -> tuple[Fetch, Callable[[], Awaitable[None]]]:
    """Return ``fetch(origin, target, headers)`` and ``close()`` for one candidate."""
    context = ssl.create_default_context(cafile=ca_file)
    if name == "ours":
        from multidict import CIMultiDict

        from proxy.upstream_client import UpstreamClient

        ours = UpstreamClient(
            ssl_context=context,
            max_connections=100,
            connect_timeout_s=5,
            read_timeout_s=60,
            total_timeout_s=300,
        )

        async def fetch_ours(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            response = await ours.request("GET", origin, target, CIMultiDict(headers))
            try:
                body = await response.read()
            finally:
                response.release()
            return response.status, list(response.headers.items()), body

        return fetch_ours, ours.close
    if name == "aiohttp":
        import aiohttp
        from yarl import URL

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=100),
            trust_env=False,
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        )
        session._retry_connection = False  # as proxy/forward.py had it before the own client

        async def fetch_aiohttp(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            url = URL(origin + target, encoded=True)
            async with session.get(url, headers=headers, allow_redirects=False) as response:
                body = await response.read()
                return response.status, list(response.headers.items()), body

        return fetch_aiohttp, session.close
    if name == "aiosonic":
        import aiosonic

        sonic = aiosonic.HTTPClient()

        async def fetch_sonic(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            response = await sonic.request(
                origin + target, "GET", headers=dict(headers), ssl=context, follow=False
            )
            body = await response.content()
            return response.status_code, list(response.headers.items()), body

        async def close_sonic() -> None:
            await sonic.connector.cleanup()

        return fetch_sonic, close_sonic
    if name == "pyreqwest":
        from pyreqwest.client import ClientBuilder

        builder = ClientBuilder().follow_redirects(False).gzip(False).max_connections(100)
        pem = Path(ca_file).read_bytes()  # noqa: ASYNC240  # once, before any load
        reqwest = builder.add_root_certificate_pem(pem).build()

        async def fetch_reqwest(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            request = reqwest.get(origin + target)
            for key, value in headers:
                request = request.header(key, value)
            response = await request.build().send()
            body = bytes(await response.bytes())
            return response.status, list(response.headers.items()), body

        return fetch_reqwest, reqwest.close
    if name == "curl-cffi":
        from curl_cffi.requests import AsyncSession

        curl = AsyncSession(verify=ca_file, max_clients=100, allow_redirects=False)

        async def fetch_curl(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            response = await curl.request(
                "GET", origin + target, headers=dict(headers), default_headers=False
            )
            return response.status_code, list(response.headers.items()), response.content

        return fetch_curl, curl.close
    if name == "httpr":
        import httpr

        client = httpr.AsyncClient(ca_cert_file=ca_file, follow_redirects=False, cookie_store=False)

        async def fetch_httpr(origin: str, target: str, headers: list[tuple[str, str]]) -> Any:
            response = await client.get(origin + target, headers=dict(headers))
            return response.status_code, list(response.headers.items()), response.content

        async def close_httpr() -> None:
            await client.aclose()

        return fetch_httpr, close_httpr
    raise SystemExit(f"unknown client {name}")


# -- the criteria --------------------------------------------------------------------------------

TARGET = "/a/%7e/./b/../c%2F;p=1?x=%2F&y=caf%C3%A9&z=%zz"
MALFORMED = {
    "TE+CL": b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two CL": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
    "NUL": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nab",
    "HTTP/0.9": b"hello world\r\n",
    "appended answer": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra",
    "body on 204": b"HTTP/1.1 204 No Content\r\n\r\nbody",
    "101": b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
}


async def criteria(name: str) -> dict[str, Any]:
    """Run the criteria for one client; return what passed and what it saw."""
    import trustme

    from tests.support.rawupstream import RawUpstream, answer

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server)
    with tempfile.NamedTemporaryFile(suffix=".pem") as ca_file:
        ca.cert_pem.write_to_path(ca_file.name)
        fetch, close = await make_client(name, ca_file.name)
        result: dict[str, Any] = {}
        try:
            async with RawUpstream(server) as up:
                try:
                    await asyncio.wait_for(fetch(up.origin, TARGET, [("X-A", "1")]), 5)
                    head = up.seen[0].head.decode("latin-1")
                    request_line = head.split("\r\n")[0]
                    names = [line.split(":")[0] for line in head.split("\r\n")[1:] if line]
                    result["target byte-exact"] = request_line == f"GET {TARGET} HTTP/1.1"
                    result["no added headers"] = sorted(n.lower() for n in names) == ["host", "x-a"]
                    result["seen"] = head
                except Exception as exc:
                    result["target byte-exact"] = result["no added headers"] = False
                    result["seen"] = repr(exc)
            redirect = answer(302, b"", "Location: /elsewhere", reason="Found")
            async with RawUpstream(server, lambda head: redirect) as up:
                try:
                    status, _, _ = await asyncio.wait_for(fetch(up.origin, "/r", []), 5)
                    result["no redirects"] = status == 302 and len(up.seen) == 1
                except Exception:
                    result["no redirects"] = False
            packed = gzip.compress(b"hello" * 50)
            zipped = answer(200, packed, "Content-Encoding: gzip")
            async with RawUpstream(server, lambda head: zipped) as up:
                try:
                    _, _, body = await asyncio.wait_for(fetch(up.origin, "/z", []), 5)
                    result["no decompression"] = body == packed
                except Exception:
                    result["no decompression"] = False
            accepted = []
            for case, raw in MALFORMED.items():
                async with RawUpstream(server, lambda head, raw=raw: raw) as up:
                    try:
                        await asyncio.wait_for(fetch(up.origin, "/m", []), 2)
                        # An appended answer may only show on the next request on the connection.
                        await asyncio.wait_for(fetch(up.origin, "/m2", []), 2)
                        accepted.append(case)
                    except Exception:  # noqa: S112  # refused, as it must be
                        continue
            result["strict parser"] = not accepted
            result["accepted"] = accepted
        finally:
            await close()
        return result


# -- the load ------------------------------------------------------------------------------------


async def load(
    name: str, port: int, ca_file: str, seconds: float, concurrency: int
) -> dict[str, float]:
    fetch, close = await make_client(name, ca_file)
    origin = f"https://127.0.0.1:{port}"
    target = "/REST/bench/v1/small.json"
    headers = [("Authorization", "Bearer bench")]
    for _ in range(concurrency):
        await fetch(origin, target, headers)  # warm the pool
    count = 0
    errors = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal count, errors
        while time.monotonic() < stop:
            try:
                status, _, _ = await fetch(origin, target, headers)
                count += status == 200
            except Exception:
                errors += 1

    cpu = resource.getrusage(resource.RUSAGE_SELF)
    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    await close()
    cpu_s = (after.ru_utime - cpu.ru_utime) + (after.ru_stime - cpu.ru_stime)
    return {"rps": count / wall, "cpu_us": cpu_s / max(count, 1) * 1e6, "errors": errors}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--clients", default=",".join(CLIENTS))
    parser.add_argument("--load", nargs=3, metavar=("NAME", "PORT", "CA"), help=argparse.SUPPRESS)
    parser.add_argument("--criteria", metavar="NAME", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    if args.load:
        name, port, ca = args.load
        print(json.dumps(asyncio.run(load(name, int(port), ca, args.seconds, args.c))))
        return
    if args.criteria:
        print(json.dumps(asyncio.run(criteria(args.criteria))))
        return
    names = args.clients.split(",")
    verdicts = {}
    for name in names:
        out = subprocess.run(  # noqa: S603
            [sys.executable, __file__, "--criteria", name], capture_output=True, text=True
        )
        try:
            verdicts[name] = json.loads(out.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            verdicts[name] = {"error": out.stderr.strip().splitlines()[-1:]}
        print(name, json.dumps(verdicts[name]), file=sys.stderr)

    from procs import Processes, free_port
    from stack import start_nginx, upstream_conf, write_files

    with tempfile.TemporaryDirectory(prefix="ksz-clients-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o711)  # nginx workers (unprivileged) must reach www/ inside
        (folder / "logs").mkdir()
        procs = Processes(folder / "logs")
        try:
            keys = write_files(folder)
            port = free_port()
            up = folder / "nginx-upstream"
            start_nginx(procs, "upstream", up, upstream_conf(up, keys, folder / "www", port), port)
            runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    out = subprocess.run(  # noqa: S603
                        [
                            sys.executable,
                            __file__,
                            "--seconds",
                            str(args.seconds),
                            "-c",
                            str(args.c),
                            "--load",
                            name,
                            str(port),
                            str(keys / "ca.pem"),
                        ],
                        capture_output=True,
                        text=True,
                    )
                    try:
                        runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                    except (IndexError, json.JSONDecodeError):
                        print(name, "failed:", out.stderr[-500:], file=sys.stderr)
                    print(name, runs[name][-1:], file=sys.stderr)
        finally:
            procs.stop_all()
    base = statistics.median(x["rps"] for x in runs["aiohttp"]) if runs.get("aiohttp") else None
    print(f"\nc={args.c}, {args.rounds} rounds of {args.seconds:g} s, medians\n")
    print(
        "| client | req/s | vs aiohttp | CPU µs/req | target byte-exact | no added headers "
        "| no redirects | no decompression | strict parser (accepted) |"
    )
    print("|---|---:|---:|---:|---|---|---|---|---|")
    for name in names:
        v = verdicts.get(name, {})
        rps = statistics.median(x["rps"] for x in runs[name]) if runs[name] else 0
        cpu = statistics.median(x["cpu_us"] for x in runs[name]) if runs[name] else 0
        ratio = f"{rps / base:.2f}x" if base else "-"

        def yes(key: str, verdict: dict[str, Any] = v) -> str:
            return "yes" if verdict.get(key) else "**no**"

        strict = "yes" if v.get("strict parser") else f"**no** ({', '.join(v.get('accepted', []))})"
        print(
            f"| {name} | {rps:,.0f} | {ratio} | {cpu:.0f} | {yes('target byte-exact')} | "
            f"{yes('no added headers')} | {yes('no redirects')} | {yes('no decompression')} | "
            f"{strict} |"
        )
    for name in names:
        print(f"\n{name} sent: `{verdicts.get(name, {}).get('seen', '')!r}`")


if __name__ == "__main__":
    main()
