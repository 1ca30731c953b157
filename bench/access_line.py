"""Micro-benchmark of one access line: ``ProxyHandler._log_access`` as the handler calls it.

    .venv/bin/python bench/access_line.py [LINES]             # µs per line (wall and CPU)
    valgrind --tool=callgrind .venv/bin/python bench/access_line.py 20000   # and 40000:
        the difference of the two instruction totals / 20000 = instructions per line

Run from the repository root. The lines go to /dev/null through the handler ``logs.setup``
installs, 32 per event-loop turn (a busy proxy at c=32), with a ``worker`` context field. Not
part of the test suite; it reports, it asserts nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from pathlib import Path
from typing import TextIO

import uvloop
from aiohttp.test_utils import make_mocked_request

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from proxy import logs
from proxy.forward import Exchange
from proxy.handler import ProxyHandler

PER_TURN = 32


async def main(lines: int, devnull: TextIO) -> None:
    logs.setup("info", "json", devnull)
    logs.set_context(worker=1)
    request = make_mocked_request("GET", "/REST/bench/v1/small.json?x=1")
    exchange = Exchange(upstream_status=200, bytes_out=105)
    trace_id = "0b1f7a42-8e1c-4f5e-9d3a-2f6b7c8d9e0f"
    log = ProxyHandler._log_access
    started, cpu = time.perf_counter(), time.process_time()
    for _ in range(lines // PER_TURN):
        for _ in range(PER_TURN):
            log(request, trace_id, "/REST/bench/v1", 200, 0.000234567, exchange, None)
        await asyncio.sleep(0)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    logging.getLogger().handlers[0].flush()
    print(f"{wall / lines * 1e6:.2f} µs/line wall, {cpu / lines * 1e6:.2f} µs/line CPU")


if __name__ == "__main__":
    with open(os.devnull, "w") as out:
        uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000, out))
