"""Own the instruction counts: each target started afresh under callgrind, requests counted.

A wrk round's CPU time per request moves by about 15 % between runs on a shared machine, more
than the few per cent a change to the hot path is worth. Callgrind counts the instructions a
process executes in user space exactly, whatever else the machine does; the same build answering
the same requests gives the same count to about 0.1 %.

Each target (bare, floor, ksz-proxy at info and at warning, each ``--candidate``) is started anew
under ``valgrind --tool=callgrind --instr-atstart=no``: nothing is counted while it starts. Then,
on one keep-alive connection, ``WARMUP`` sequential GETs of the small document (pools, caches, the
interpreter's specialisation), counting switched on (``vgdb ... instrumentation on``), ``requests``
more GETs, counting off, and the counts dumped: callgrind's ``totals`` divided by ``requests``.
Sequential requests on one connection are enough, and they are what keeps the figure repeatable:
at a higher concurrency the number of event-loop turns per request depends on timing. The kernel's
share (the socket system calls, the same in number for every target) is not counted.
"""

from __future__ import annotations

import http.client
import re
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from procs import Proc, free_port
from stack import API, BODIES, LABELS, Stack, label_candidates, start_bare, start_floor, start_ksz

WARMUP = 200  # requests before counting starts, on the connection that is then counted
# Start-up under valgrind takes 10-20 s on an idle machine (interpreter, imports, the keystore,
# the first token); several times that on a busy one.
START_TIMEOUT_S = 300.0
REQUEST_TIMEOUT_S = 120.0  # one request; the first ones after start-up translate a lot of code
_TOTALS = re.compile(rb"^totals:\s*(\d+)", re.MULTILINE)


@dataclass(frozen=True, slots=True)
class Count:
    """The instructions one target executed for ``requests`` requests."""

    target: str
    requests: int
    instructions: int
    start_s: float  # from spawn under valgrind to ready
    counted_s: float  # how long the counted requests took under callgrind
    dump: Path  # callgrind's file

    @property
    def per_request(self) -> float:
        """Return the instructions per request."""
        return self.instructions / self.requests


def instruction_targets(candidates: Sequence[str]) -> dict[str, str | None]:
    """Return the targets counted, each with its source tree (``None``: the harness's own)."""
    targets: dict[str, str | None] = {"bare": None, "floor": None, "ksz": None, "ksz-warn": None}
    targets.update(zip(label_candidates(candidates), candidates, strict=True))
    return targets


def measure_instructions(
    stack: Stack,
    candidates: Sequence[str],
    requests: int,
    *,
    repeat: int = 1,
    out: Path | None = None,
) -> dict[str, list[Count]]:
    """Count the instructions per request of every target, ``repeat`` times each.

    Each count starts its target afresh; the targets take turns, so a slow spell of the machine
    does not fall on one of them. ``out`` keeps callgrind's files of the first count of each.
    """
    folder = stack.folder / "callgrind"
    folder.mkdir(exist_ok=True)
    counts: dict[str, list[Count]] = {}
    for run in range(1, repeat + 1):
        for target, source in instruction_targets(candidates).items():
            count = _count(stack, target, source, requests, folder / f"{target}-{run}")
            counts.setdefault(target, []).append(count)
            print(
                f"  [{run}/{repeat}] {LABELS[target]:<36} {count.per_request:>10,.0f} "
                f"instructions/request (ready in {count.start_s:.0f} s; {requests} requests "
                f"counted in {count.counted_s:.0f} s)",
                flush=True,
            )
            if out is not None and run == 1:
                keep(count.dump, out, target)
    return counts


def _count(stack: Stack, target: str, source: str | None, requests: int, base: Path) -> Count:
    """Start ``target`` under callgrind, send the requests, return what they cost.

    Callgrind writes the counts to ``<base>.out.1`` when told to dump (``<base>.out`` at exit,
    with nothing counted since).
    """
    prefix = base.parent / "vgdb"
    wrap = [
        # One string hash seed for every target and run: dict and set layouts, and so the
        # instructions spent probing them, would otherwise differ from one run to the next.
        "env",
        "PYTHONHASHSEED=0",
        shutil.which("valgrind") or "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={base}.out",
        "--vgdb=yes",
        f"--vgdb-prefix={prefix}",
    ]
    started = time.perf_counter()
    proc, port = _start(stack, target, source, wrap, f"callgrind-{base.name}")
    try:
        start_s = time.perf_counter() - started
        path = f"{API}/{BODIES['small'][0]}"
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=REQUEST_TIMEOUT_S)
        try:
            _get(conn, path, WARMUP, target)
            _monitor(prefix, proc, "instrumentation on")
            counting = time.perf_counter()
            _get(conn, path, requests, target)
            counted_s = time.perf_counter() - counting
            _monitor(prefix, proc, "instrumentation off")
            _monitor(prefix, proc, "dump")
        finally:
            conn.close()
    finally:
        stack.procs.stop(proc, timeout_s=60)
    dump = base.with_name(base.name + ".out.1")
    match = _TOTALS.search(dump.read_bytes())
    if match is None:
        raise RuntimeError(f"{target}: no totals in callgrind's dump {dump}")
    return Count(target, requests, int(match.group(1)), start_s, counted_s, dump)


def _start(
    stack: Stack, target: str, source: str | None, wrap: Sequence[str], name: str
) -> tuple[Proc, int]:
    """Start a fresh ``target`` under ``wrap``; return it and its port once it is ready."""
    if target in ("bare", "floor"):
        port = free_port()
        start = start_bare if target == "bare" else start_floor
        proc = start(
            stack.procs,
            port,
            stack.origin,
            stack.keys,
            name=name,
            wrap=wrap,
            timeout_s=START_TIMEOUT_S,
        )
        return proc, port
    ksz = start_ksz(
        stack,
        name,
        "warning" if target == "ksz-warn" else "info",
        pythonpath=source,
        wrap=wrap,
        ready_timeout_s=START_TIMEOUT_S,
    )
    return ksz.proc, ksz.port


def _get(conn: http.client.HTTPConnection, path: str, count: int, target: str) -> None:
    """Send ``count`` sequential GETs on ``conn``; fail unless each answers the document."""
    expected = BODIES["small"][1]
    for _ in range(count):
        conn.request("GET", path)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200 or body != expected:
            raise RuntimeError(
                f"{target}: status {response.status}, {len(body)} bytes instead of {len(expected)}"
            )


def _monitor(prefix: Path, proc: Proc, command: str) -> None:
    """Send a callgrind monitor command (what ``callgrind_control`` does) to ``proc``."""
    argv = [
        shutil.which("vgdb") or "vgdb",
        f"--vgdb-prefix={prefix}",
        f"--pid={proc.pid}",
        *command.split(),
    ]
    done = subprocess.run(  # noqa: S603  # argv built here, no shell
        argv, capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"vgdb {command} to {proc.name}: {done.stdout}{done.stderr}")


def keep(dump: Path, out: Path, target: str) -> None:
    """Copy callgrind's dump to ``out``, with ``callgrind_annotate``'s reading of it.

    By function: ``<target>.self.txt`` counts the instructions in the function itself,
    ``<target>.inclusive.txt`` with everything it calls; ``<target>.callgrind.out`` opens in
    KCachegrind.
    """
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(dump, out / f"{target}.callgrind.out")
    annotate = shutil.which("callgrind_annotate") or "callgrind_annotate"
    for kind, extra in (("self", []), ("inclusive", ["--inclusive=yes"])):
        done = subprocess.run(  # noqa: S603  # argv built here, no shell
            [annotate, "--auto=no", *extra, str(dump)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        (out / f"{target}.{kind}.txt").write_text(done.stdout + done.stderr)
