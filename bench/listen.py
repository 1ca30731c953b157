"""Serve a reference proxy of the benchmark (bare.py, floor.py) on loopback until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web


async def serve_until_signal(server: web.Server, port: int) -> None:
    """Listen on 127.0.0.1:``port`` with ``server``; return after SIGTERM or SIGINT, closed."""
    runner = web.ServerRunner(server, handle_signals=False)
    await runner.setup()
    # nginx listens with a backlog of 511; aiohttp's default of 128 drops connections at c=256.
    await web.TCPSite(runner, "127.0.0.1", port, backlog=1024).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
