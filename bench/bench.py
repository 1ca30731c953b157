"""Benchmark ksz-proxy on loopback against nginx and a bare aiohttp proxy (see bench/README.md).

The stack (bench/stack.py) runs in processes this script starts and always stops; wrk measures
each target alternately, several rounds, at each concurrency and body size (bench/loads.py); the
markdown report (bench/results.py) goes to stdout and to bench/RESULTS.md. The ratios within one
run are the figures to quote: absolute numbers move with the machine and what else runs on it.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from instructions import Count, measure_instructions
from loads import cold_burst, measure, profile, stream_measure
from procs import Processes
from results import render, render_instructions
from stack import (
    BENCH,
    BODIES,
    LABELS,
    GiB,
    Stack,
    check_targets,
    start_base,
    start_stack,
    tree_rss_kib,
)


def _arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="bench/run.sh",
        description="Benchmark ksz-proxy against nginx and a bare aiohttp proxy, on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="about 2 minutes instead of about 10")
    parser.add_argument("--rounds", type=int, help="rounds of wrk runs (default 4; quick 2)")
    parser.add_argument("--duration", type=int, help="seconds per wrk run (default 3; quick 2)")
    parser.add_argument(
        "-c",
        "--concurrency",
        type=int,
        action="append",
        dest="concurrencies",
        help="wrk connections, repeatable (default 1, 32 and 256; quick 1 and 32)",
    )
    parser.add_argument(
        "--stream-bytes", type=int, default=GiB, help="bytes streamed each way (default 1 GiB)"
    )
    parser.add_argument(
        "--cold-requests", type=int, default=500, help="concurrent cold requests (default 500)"
    )
    parser.add_argument(
        "--body",
        action="append",
        dest="bodies",
        choices=list(BODIES),
        help="body sizes to measure, repeatable (default: all)",
    )
    parser.add_argument(
        "--candidate",
        metavar="DIR",
        action="append",
        default=[],
        dest="candidates",
        help="also measure ksz-proxy imported from DIR (PYTHONPATH=DIR), e.g. a copy with a "
        "change to try; repeatable; reported as candN with its ratio to ksz-proxy (info)",
    )
    parser.add_argument(
        "--profile",
        metavar="PY_SPY",
        help="path of a py-spy binary: also profile ksz-proxy (info) under load",
    )
    parser.add_argument(
        "--profile-target",
        default="ksz",
        help="what py-spy records: ksz (default), ksz-warn, bare, floor, candN",
    )
    parser.add_argument("--profile-seconds", type=int, default=12)
    parser.add_argument("--profile-native", action="store_true", help="py-spy --native")
    parser.add_argument(
        "--profile-out",
        default="/tmp/ksz-proxy-profile.txt",  # noqa: S108  # where the user asked, not a secret
        help="where py-spy's collapsed stacks go (default /tmp/ksz-proxy-profile.txt)",
    )
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="after the wrk rounds, count the instructions per request of bare, floor, ksz, "
        "ksz-warn and each candidate, each started afresh under valgrind (callgrind); "
        "a few minutes",
    )
    parser.add_argument(
        "--instructions-only",
        action="store_true",
        help="only the instruction counts: no wrk rounds, streams, cold burst or profile; the "
        "report is printed, bench/RESULTS.md left as it is",
    )
    parser.add_argument(
        "--instructions-requests",
        type=int,
        default=1000,
        metavar="N",
        help="sequential requests counted per target (default 1000)",
    )
    parser.add_argument(
        "--instructions-repeat",
        type=int,
        default=1,
        metavar="K",
        help="count each target K times, each in a fresh process; the report gives the median "
        "and the range (default 1)",
    )
    parser.add_argument(
        "--instructions-out",
        metavar="DIR",
        help="keep callgrind's files and callgrind_annotate's reading of them per target in DIR "
        "(implies --instructions)",
    )
    parser.add_argument(
        "--no-write", action="store_true", help="print the report only; leave bench/RESULTS.md"
    )
    parser.add_argument(
        "--keep-logs", metavar="DIR", help="copy every process's output to DIR at the end"
    )
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 4)
    args.duration = args.duration or (2 if args.quick else 3)
    args.concurrencies = args.concurrencies or ([1, 32] if args.quick else [1, 32, 256])
    args.bodies = args.bodies or list(BODIES)
    # Checked now rather than after the wrk rounds, where the profile runs. Not ksz-w2: py-spy
    # would record its supervisor, which serves no request.
    profiled = {"ksz", "ksz-warn", "bare", "floor"}
    profiled |= {f"cand{n}" for n in range(1, len(args.candidates) + 1)}
    if args.profile and args.profile_target not in profiled:
        parser.error(f"--profile-target: one of {', '.join(sorted(profiled))}")
    if args.instructions_only and args.profile:
        parser.error("--profile needs the wrk rounds: not with --instructions-only")
    if args.instructions_requests < 1 or args.instructions_repeat < 1:
        parser.error("--instructions-requests and --instructions-repeat: at least 1")
    args.instructions = args.instructions or bool(args.instructions_out)
    # An instructions-only report would replace the full one in bench/RESULTS.md.
    args.no_write = args.no_write or args.instructions_only
    return args


def _instructions(settings: argparse.Namespace, stack: Stack) -> dict[str, list[Count]]:
    print(
        f"Instructions per request under callgrind, {settings.instructions_requests} sequential "
        "requests per target, each started afresh (about 20 s per target) ...",
        flush=True,
    )
    out = Path(settings.instructions_out) if settings.instructions_out else None
    counts = measure_instructions(
        stack,
        settings.candidates,
        settings.instructions_requests,
        repeat=settings.instructions_repeat,
        out=out,
    )
    if out is not None:
        print(f"  callgrind's files and callgrind_annotate's reading of them in {out}", flush=True)
    return counts


def _run_instructions_only(
    settings: argparse.Namespace, procs: Processes, folder: Path, command: str
) -> str:
    print("Starting the upstream and the fakes ...", flush=True)
    stack = start_base(folder, procs)
    return render_instructions(_instructions(settings, stack), command=command)


def _run(settings: argparse.Namespace, procs: Processes, folder: Path, command: str) -> str:
    if settings.instructions_only:
        return _run_instructions_only(settings, procs, folder, command)
    print(
        "Starting the upstream, the fakes, ksz-proxy, nginx, the bare and floor proxies ...",
        flush=True,
    )
    stack = start_stack(folder, procs, settings.candidates)
    asyncio.run(check_targets(stack))
    for name, ksz in stack.ksz.items():
        print(
            f"  {LABELS[name]}: ready in {ksz.started_s:.2f} s, idle RSS "
            f"{ksz.idle_rss_kib / 1024:.1f} MiB",
            flush=True,
        )
    print("wrk runs (CPU in cores: proxy/upstream/wrk):", flush=True)
    samples = measure(
        stack,
        rounds=settings.rounds,
        duration_s=settings.duration,
        concurrencies=settings.concurrencies,
        bodies=settings.bodies,
    )
    extras: dict[str, Any] = {
        "rss_after_load": {name: tree_rss_kib(ksz.proc) for name, ksz in stack.ksz.items()}
    }
    profile_text = None
    if settings.profile:
        print(f"Profiling {LABELS[settings.profile_target]} with py-spy ...", flush=True)
        profile_text = profile(
            stack,
            settings.profile,
            settings.profile_target,
            settings.profile_seconds,
            Path(settings.profile_out),
            native=settings.profile_native,
        )
    if settings.instructions:
        extras["instructions"] = _instructions(settings, stack)
    if settings.stream_bytes:
        print(f"Streaming {settings.stream_bytes / GiB:g} GiB down, then up ...", flush=True)
        extras["stream"] = asyncio.run(stream_measure(stack.ksz["ksz"], settings.stream_bytes))
    if settings.cold_requests:
        print(f"{settings.cold_requests} concurrent requests to a cold ksz-proxy ...", flush=True)
        extras["cold"] = cold_burst(stack, settings.cold_requests, delay_s=2.0)
    text, _verdicts = render(
        samples,
        stack=stack,
        settings=settings,
        extras=extras,
        command=command,
        profile_text=profile_text,
    )
    return text


CLIENTS_HEADING = "## Upstream client comparison"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the report and write bench/RESULTS.md; return the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    settings = _arguments(args)
    command = "make bench" + (f" BENCH_ARGS={shlex.quote(shlex.join(args))}" if args else "")
    # SIGTERM ends the run like Ctrl-C: through the finally clause that stops every process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ksz-proxy-bench-") as tmp:
        folder = Path(tmp)
        folder.chmod(0o711)  # nginx workers (unprivileged) must reach www/ inside
        (folder / "logs").mkdir()
        procs = Processes(folder / "logs")
        try:
            text = _run(settings, procs, folder, command)
        except BaseException:
            for proc in procs.running:
                tail = proc.tail()
                if tail:
                    print(f"--- last lines of {proc.name}:\n{tail}", file=sys.stderr)
            raise
        finally:
            procs.stop_all()
            if settings.keep_logs:
                shutil.copytree(folder / "logs", settings.keep_logs, dirs_exist_ok=True)
    elapsed = time.monotonic() - started
    text += f"\nThe harness took {elapsed:.0f} s.\n"
    print("\n" + text)
    if not settings.no_write:
        results = BENCH / "RESULTS.md"
        # The upstream client comparison (bench/clients.py, run by hand) is kept as it was.
        old = results.read_text() if results.exists() else ""
        if CLIENTS_HEADING in old:
            text += "\n" + old[old.index(CLIENTS_HEADING) :]
        results.write_text(text)
        print("Written to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
