"""Own the soak's load generator: a child process with its own event loop (tests/test_soak.py).

Run as ``python -m tests.support.soakload --url http://127.0.0.1:PORT --route /REST/demo/v1 ...``
from the repository root. Workers send mixed requests through the proxy -- GET, downloads of up to 1
MiB, small and 2 MiB POSTs, chunked PUTs -- and check every answer completely (status, and the
SHA-256 of every body either way), keeping their keep-alive connections between runs.

It is steered by lines on standard input:

- ``run``: start the workers (a new tally, new seeds);
- ``stop``: let each worker finish its request, then print the tally as one JSON line;
- end of input: stop as above if running, close the connections and exit 0.

It prints ``{"event": "ready"}`` once it can take commands.

A run also stops by itself after ``--max-run-s``, and the process exits once its input is gone
or after ``--max-life-s``, so a lost parent never leaves load running. Only 127.0.0.1 URLs are
accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import random
import sys
import time
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from proxy.sandbox.upstream import stream_chunks, stream_sha256

KIB: Final = 1024
MIB: Final = 1024 * KIB
MAX_FAILURES_KEPT: Final = 50
KINDS: Final = ("get", "download", "post-small", "post-large", "put-chunked")


@dataclass(slots=True)
class Tally:
    """What the workers of one run sent, what went wrong, and how long answers took."""

    sent: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    failure_count: int = 0
    failures: list[str] = field(default_factory=list)  # the first MAX_FAILURES_KEPT
    latencies: list[float] = field(default_factory=list)
    stopped_by: str = ""

    def fail(self, text: str) -> None:
        """Count a failure and keep its description while there is room."""
        self.failure_count += 1
        if len(self.failures) < MAX_FAILURES_KEPT:
            self.failures.append(text)

    def report(self) -> dict[str, Any]:
        """Return the tally as printed: counts, failures and latency in seconds."""
        ordered = sorted(self.latencies)
        return {
            "event": "tally",
            "sent": self.sent,
            "by_kind": self.by_kind,
            "failure_count": self.failure_count,
            "failures": self.failures,
            "latency_max_s": round(ordered[-1], 3) if ordered else 0.0,
            "latency_p99_s": round(ordered[int(len(ordered) * 0.99)], 3) if ordered else 0.0,
            "stopped_by": self.stopped_by,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Where to send the load and how much of it."""

    url: str
    routes: tuple[str, ...]
    workers: int
    seed: int
    max_run_s: float
    max_life_s: float


async def one_request(
    session: aiohttp.ClientSession,
    settings: Settings,
    rng: random.Random,
    tally: Tally,
    started: float,
) -> None:
    """Send one request of a random kind and check its answer completely."""
    route = rng.choice(settings.routes)
    roll = rng.random()
    kind = "error"
    began = time.monotonic()
    tally.sent += 1

    def target(path: str) -> URL:
        return URL(settings.url + route + path, encoded=True)  # sent byte-exact

    try:
        if roll < 0.40:
            kind = "get"
            async with session.get(target(f"/persons/{rng.randrange(10**6)}")) as r:
                ok = r.status == 200 and (await r.json())["method"] == "GET"
        elif roll < 0.55:
            kind, size = "download", rng.choice((64 * KIB, 256 * KIB, 1 * MIB))
            async with session.get(target(f"/stream?bytes={size}")) as r:
                ok = r.status == 200 and hashlib.sha256(await r.read()).hexdigest() == (
                    stream_sha256(size)
                )
        elif roll < 0.90:
            kind = "post-small" if roll < 0.78 else "post-large"
            body = rng.randbytes(1 * KIB if kind == "post-small" else 2 * MIB)
            # Large bytes go as a file object: aiohttp warns about a big bytes body.
            data = io.BytesIO(body) if len(body) > MIB else body
            async with session.post(target("/orders"), data=data) as r:
                echo = await r.json() if r.status == 200 else {}
                ok = echo.get("body_sha256") == hashlib.sha256(body).hexdigest()
        else:
            kind, size = "put-chunked", 512 * KIB

            async def upload() -> AsyncIterator[bytes]:
                for chunk in stream_chunks(size):
                    yield chunk

            async with session.put(target("/documents/1"), data=upload()) as r:
                echo = await r.json() if r.status == 200 else {}
                ok = echo.get("body_sha256") == stream_sha256(size)
        if not ok:
            tally.fail(f"{began - started:.1f}s {kind} {route}: HTTP {r.status}")
    except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
        tally.fail(f"{began - started:.1f}s {kind} {route}: {type(exc).__name__} {exc}")
        kind = "error"
    tally.latencies.append(time.monotonic() - began)
    tally.by_kind[kind] = tally.by_kind.get(kind, 0) + 1


async def worker(
    session: aiohttp.ClientSession,
    settings: Settings,
    rng: random.Random,
    stop: asyncio.Event,
    tally: Tally,
    started: float,
) -> None:
    """Send requests one after the other until told to stop."""
    while not stop.is_set():
        await one_request(session, settings, rng, tally, started)


async def one_run(
    session: aiohttp.ClientSession, settings: Settings, number: int, stop: asyncio.Event
) -> Tally:
    """Run every worker until ``stop`` is set or ``max_run_s`` is over; return the tally."""
    tally = Tally()
    started = time.monotonic()
    # String seeds are hashed deterministically: each run and worker has a stream of its own.
    rngs = [random.Random(f"{settings.seed}:{number}:{i}") for i in range(settings.workers)]
    workers = [
        asyncio.create_task(worker(session, settings, rng, stop, tally, started)) for rng in rngs
    ]
    try:
        await asyncio.wait_for(stop.wait(), settings.max_run_s)
        tally.stopped_by = "command"
    except TimeoutError:
        tally.stopped_by = "deadline"
        stop.set()
    await asyncio.gather(*workers)
    return tally


async def read_commands(queue: asyncio.Queue[str]) -> None:
    """Put each line of standard input on ``queue``, then ``""`` at its end."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(
        lambda: asyncio.StreamReaderProtocol(reader), sys.stdin
    )
    try:
        while line := await reader.readline():
            await queue.put(line.decode("ascii", "replace").strip())
    finally:
        transport.close()
        await queue.put("")


def emit(report: dict[str, Any]) -> None:
    """Print one JSON line for the parent and flush it."""
    sys.stdout.write(json.dumps(report) + "\n")
    sys.stdout.flush()


async def serve_commands(settings: Settings) -> int:
    """Obey ``run`` / ``stop`` / end of input (module docstring); return the exit status."""
    commands: asyncio.Queue[str] = asyncio.Queue()
    reading = asyncio.create_task(read_commands(commands))
    # Generous: a stuck answer must show up as a failure, not as a hung soak.
    timeout = aiohttp.ClientTimeout(total=90)
    runs = 0
    try:
        async with asyncio.timeout(settings.max_life_s):
            emit({"event": "ready"})
            while True:
                command = await commands.get()
                if command == "":
                    return 0
                if command != "run":
                    continue  # "stop" while idle, or noise: nothing to do
                stop = asyncio.Event()
                # A session per run, closed with it: between runs this process holds no
                # connection, so the proxy's task and descriptor counts measured then do not
                # depend on which connections the last requests left open (a chunked upload's
                # connection is closed by the proxy, a GET's is kept).
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=settings.workers),
                    timeout=timeout,
                    auto_decompress=False,
                ) as session:
                    running = asyncio.create_task(one_run(session, settings, runs, stop))
                    runs += 1
                    while not running.done():
                        getting = asyncio.create_task(commands.get())
                        await asyncio.wait({running, getting}, return_when=asyncio.FIRST_COMPLETED)
                        if getting.done():
                            if getting.result() in ("stop", ""):
                                stop.set()
                            if getting.result() == "":
                                commands.put_nowait("")  # seen again once the tally is out
                        else:
                            getting.cancel()
                emit(running.result().report())
    finally:
        reading.cancel()
        await asyncio.gather(reading, return_exceptions=True)


def parse_args(argv: Sequence[str]) -> Settings:
    """Return the settings named on the command line (127.0.0.1 URLs only)."""
    parser = argparse.ArgumentParser(prog="python -m tests.support.soakload", description=__doc__)
    parser.add_argument("--url", required=True, help="the proxy, http://127.0.0.1:PORT")
    parser.add_argument("--route", action="append", required=True, help="a route prefix")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-run-s", type=float, default=300.0)
    parser.add_argument("--max-life-s", type=float, default=900.0)
    args = parser.parse_args(argv)
    if urlsplit(args.url).hostname != "127.0.0.1":
        parser.error("--url must point at 127.0.0.1")
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be between 1 and 64")
    return Settings(
        url=args.url.rstrip("/"),
        routes=tuple(args.route),
        workers=args.workers,
        seed=args.seed,
        max_run_s=args.max_run_s,
        max_life_s=args.max_life_s,
    )


def run(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on uvloop where there is one: the less CPU the load takes, the better."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return int(uvloop.run(coro))


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and serve commands until the input ends."""
    return run(serve_commands(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
