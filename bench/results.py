"""Own the benchmark report: the markdown tables, the extra figures and the target verdicts."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from instructions import WARMUP, Count
from loads import Key, Sample
from stack import LABELS, SMALL_BODY, GiB, Stack


@dataclass(frozen=True, slots=True)
class Verdict:
    """One target of the issue and whether this run met it."""

    name: str
    met: bool
    figure: str


def _median(values: Sequence[float]) -> float:
    return statistics.median(values)


def _added(runs: Sequence[Sample], base: Sequence[Sample], name: str) -> float:
    """Return the median per-round difference of a latency figure against ``base``."""
    return _median([getattr(s, name) - getattr(b, name) for s, b in zip(runs, base, strict=True)])


def _ratios(samples: dict[Key, list[Sample]], a: str, b: str, body: str, c: int) -> list[float]:
    pairs = zip(samples[(a, body, c)], samples[(b, body, c)], strict=True)
    return [x.rps / y.rps for x, y in pairs]


def _ratio_text(values: Sequence[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{_median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def mb(kib: int) -> str:
    """Format KiB as MB (10^6 bytes), the unit of the targets."""
    return f"{kib * 1024 / 1e6:.1f} MB"


def _first_line(argv: Sequence[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(  # noqa: S603  # argv built here, no shell
            list(argv), capture_output=True, text=True, timeout=10, check=False
        )
        lines = (done.stdout + done.stderr).strip().splitlines()
        return lines[0] if lines else "?"
    return "?"


def machine() -> dict[str, str]:
    """Describe the machine and the software measured."""
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    nginx = _first_line([shutil.which("nginx") or "/usr/sbin/nginx", "-v"])
    return {
        "cores": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": version("aiohttp"),
        "uvloop": version("uvloop"),
        "nginx": nginx.replace("nginx version: nginx/", ""),
        "wrk": _first_line([shutil.which("wrk") or "wrk", "--version"]).split(" [")[0],
    }


def render(
    samples: dict[Key, list[Sample]],
    *,
    stack: Stack,
    settings: Any,
    extras: dict[str, Any],
    command: str,
    profile_text: str | None,
) -> tuple[str, list[Verdict]]:
    """Return the markdown report and the target verdicts."""
    info = machine()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    targets = stack.targets
    out = [
        "# ksz-proxy benchmark results",
        "",
        f"Latest run: {now}, `{command}` ({settings.rounds} rounds of {settings.duration} s "
        f"wrk runs{', --quick' if settings.quick else ''}).",
        "",
        f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}. "
        f"Python {info['python']}, aiohttp {info['aiohttp']}, uvloop {info['uvloop']}, "
        f"nginx {info['nginx']}, wrk {info['wrk'].removeprefix('wrk ')}.",
        "",
        "All on 127.0.0.1, sharing the cores with wrk. Upstream: nginx (1 worker, TLS 1.3, "
        f"static documents: a {len(SMALL_BODY)}-byte JSON body and a 64 KiB body). "
        "nginx proxy: 1 worker, plain HTTP in, verified TLS with keep-alive to the upstream, a "
        "static `Authorization` header. Bare aiohttp: bench/bare.py, a pass-through proxy on "
        "uvloop. Floor: bench/floor.py, ksz-proxy's stack and nothing else -- the aiohttp "
        "low-level server on uvloop and ksz-proxy's own upstream client, a static "
        "`Authorization` header, no token, checks, access log or metrics: the ceiling for one "
        "ksz-proxy process on this stack: its µs/req is the stack's share of ksz-proxy's, "
        "ksz/floor the part of the ceiling ksz-proxy's own work leaves. "
        "ksz-proxy: `python -m proxy run`, default settings (body limits raised for "
        "the 1 GiB streams), at the default log level `info` (one JSON access log line per "
        "request, stderr to a file) and at `--log-level warning`. wrk: 1 thread at c=1, "
        "2 threads otherwise, `--latency`.",
        "",
        "Figures are medians over the rounds. Ratios and added latency are computed per round "
        "(the targets run one after the other within a round), then the median is taken; the "
        "range is in parentheses. CPU: cores used during the run by the proxy, the upstream "
        "nginx and wrk; µs/req: the proxy's CPU time per request (independent of how busy "
        "the machine is). SYN drops: connections the kernel dropped because the listener's "
        "accept queue was full (`ListenOverflows`, summed over the rounds); each delays a first "
        "request by about a second, which shows in p99.",
        "",
    ]
    for body in settings.bodies:
        out += [
            f"## {body} body",
            "",
            "| c | target | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms "
            "| CPU proxy/upstream/wrk | proxy µs/req | errors | SYN drops |",
            "|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---:|",
        ]
        for c in settings.concurrencies:
            base = samples[("direct", body, c)]
            for target in targets:
                runs = samples[(target, body, c)]
                added = (
                    ("-", "-")
                    if target == "direct"
                    else (
                        f"{_added(runs, base, 'p50_ms'):+.3f}",
                        f"{_added(runs, base, 'p99_ms'):+.3f}",
                    )
                )
                cpu = "/".join(
                    f"{_median([s.cores[k] for s in runs]):.2f}"
                    for k in ("proxy", "upstream", "wrk")
                )
                per_request = (
                    "-" if target == "direct" else f"{_median([s.proxy_cpu_us for s in runs]):.0f}"
                )
                bad = sum(s.errors + s.non_2xx for s in runs)
                out.append(
                    f"| {c} | {LABELS[target]} | {_median([s.rps for s in runs]):,.0f} "
                    f"| {_median([s.p50_ms for s in runs]):.3f} "
                    f"| {_median([s.p99_ms for s in runs]):.3f} | {added[0]} | {added[1]} "
                    f"| {cpu} | {per_request} | {bad} | {sum(s.overflows for s in runs)} |"
                )
        out.append("")

    pairs = [(t, "nginx") for t in targets if t.startswith(("ksz", "cand"))]
    pairs += [(t, "bare") for t in targets if t.startswith(("ksz", "cand"))]
    pairs += [("bare", "nginx")]
    pairs += [(t, "ksz") for t in targets if t.startswith("cand")]
    # Appended, so the columns above keep their places: one ksz-proxy process against its
    # ceiling (two workers are not bounded by it), then the floor against the references.
    pairs += [(t, "floor") for t in targets if t in stack.ksz and stack.ksz[t].workers == 1]
    pairs += [("floor", "nginx"), ("floor", "bare")]
    out += [
        "## Throughput ratios (same run)",
        "",
        "| body | c | " + " | ".join(f"{a}/{b}" for a, b in pairs) + " |",
        "|---|---:|" + "---:|" * len(pairs),
    ]
    for body in settings.bodies:
        for c in settings.concurrencies:
            cells = [_ratio_text(_ratios(samples, a, b, body, c)) for a, b in pairs]
            out.append(f"| {body} | {c} | " + " | ".join(cells) + " |")
    out.append("")

    instructions = extras.get("instructions")
    if instructions is not None:
        out += [instructions_section(instructions), ""]

    out += ["## Other measurements", ""]
    for name, ksz in stack.ksz.items():
        out.append(
            f"- {LABELS[name]}: start-up to `/readyz` 200 in {ksz.started_s:.2f} s (interpreter, "
            f"imports, keystore, first token); RSS idle {mb(ksz.idle_rss_kib)}, after the load "
            f"{mb(extras['rss_after_load'][name])}."
        )
    stream = extras.get("stream")
    if stream is not None:
        for direction, words in (("down", "down (GET /stream)"), ("up", "up (chunked POST)")):
            d = stream[direction]
            state = "intact" if d["intact"] else f"NOT INTACT (status {d['status']})"
            out.append(
                f"- {stream['bytes'] / GiB:g} GiB {words} through {LABELS['ksz']}: {state}, "
                f"{d['seconds']:.1f} s ({d['mb_per_s']:.0f} MB/s); RSS {mb(d['rss_before_kib'])} "
                f"before, peak {mb(d['rss_peak_kib'])}, growth {mb(d['growth_kib'])}."
            )
    cold = extras.get("cold")
    if cold is not None:
        out.append(
            f"- {cold['requests']} concurrent requests to a fresh ksz-proxy without a token "
            f"(`/readyz` 503 when the burst started: {cold['cold_at_start']}; the fake held the "
            f"token answer {cold['token_delay_s']:g} s): {cold['ok']} answered 200 (statuses "
            f"{cold['statuses']}), first after {cold['first_answer_s']:.2f} s, last after "
            f"{cold['last_answer_s']:.2f} s; token requests: {cold['token_requests_metric']:g} "
            f"(`kszproxy_token_requests_total`), {cold['token_requests_fake']} (seen by the fake)."
        )
    out.append("")

    verdicts = _verdicts(samples, stack=stack, settings=settings, extras=extras)
    out += [
        "## Targets (2-core machine, TLS upstream, small body)",
        "",
        "| target | this run | met |",
        "|---|---:|---|",
    ]
    out += [f"| {v.name} | {v.figure} | {'yes' if v.met else 'NO'} |" for v in verdicts]
    out.append("")
    if profile_text:
        out += ["## Profile", "", profile_text, ""]
    return "\n".join(out), verdicts


def _verdicts(
    samples: dict[Key, list[Sample]], *, stack: Stack, settings: Any, extras: dict[str, Any]
) -> list[Verdict]:
    verdicts: list[Verdict] = []
    variants = [t for t in stack.targets if t.startswith(("ksz", "cand"))]
    # The targets of issue 17: one process >= 2.0x bare and >= 0.40x nginx at c=32, <= 90 us of
    # CPU per request, added p50 at c=1 <= 0.20 ms; two workers >= 0.55x nginx at c=32.
    if "small" in settings.bodies and 32 in settings.concurrencies:
        for v in variants:
            bare = _median(_ratios(samples, v, "bare", "small", 32))
            nginx = _median(_ratios(samples, v, "nginx", "small", 32))
            if stack.ksz[v].workers > 1:
                verdicts.append(
                    Verdict(
                        f"{LABELS[v]}: c=32 throughput >= 0.55x nginx",
                        nginx >= 0.55,
                        f"{nginx:.2f}x",
                    )
                )
                continue
            cpu = _median([s.proxy_cpu_us for s in samples[(v, "small", 32)]])
            verdicts.append(
                Verdict(f"{LABELS[v]}: c=32 throughput >= 2.0x bare", bare >= 2.0, f"{bare:.2f}x")
            )
            verdicts.append(
                Verdict(
                    f"{LABELS[v]}: c=32 throughput >= 0.40x nginx", nginx >= 0.40, f"{nginx:.2f}x"
                )
            )
            verdicts.append(
                Verdict(f"{LABELS[v]}: c=32 CPU <= 90 us per request", cpu <= 90, f"{cpu:.0f} us")
            )
    if "small" in settings.bodies and 1 in settings.concurrencies:
        base = samples[("direct", "small", 1)]
        for v in variants:
            added = _added(samples[(v, "small", 1)], base, "p50_ms")
            verdicts.append(
                Verdict(
                    f"{LABELS[v]}: added p50 at c=1 <= 0.20 ms", added <= 0.20, f"{added:+.3f} ms"
                )
            )
    for v in variants:
        if stack.ksz[v].workers > 1:
            continue  # the target is for one process; the sum over workers is reported above
        idle = stack.ksz[v].idle_rss_kib * 1024 / 1e6
        verdicts.append(Verdict(f"{LABELS[v]}: idle RSS <= 60 MB", idle <= 60, f"{idle:.1f} MB"))
    stream = extras.get("stream")
    if stream is not None:
        growth = max(stream[d]["growth_kib"] for d in ("down", "up")) * 1024 / 1e6
        intact = all(stream[d]["intact"] for d in ("down", "up"))
        size = f"{stream['bytes'] / GiB:g} GiB"
        verdicts.append(
            Verdict(
                f"{size} up and {size} down: RSS growth < 50 MB, bodies intact",
                growth < 50 and intact,
                f"{growth:.1f} MB",
            )
        )
    cold = extras.get("cold")
    if cold is not None:
        one = cold["token_requests_metric"] == 1 and cold["ok"] == cold["requests"]
        verdicts.append(
            Verdict(
                f"{cold['requests']} concurrent cold requests: 1 token request, all answered",
                one,
                f"{cold['token_requests_metric']:g}",
            )
        )
    return verdicts


def instructions_section(counts: dict[str, list[Count]]) -> str:
    """Return the "Instructions per request" section: one row per target, ratios to floor, bare.

    With several counts per target: the median, the range in parentheses; ratios of the medians.
    """
    first = next(iter(counts.values()))
    requests, repeat = first[0].requests, len(first)
    per_request = {t: _median([c.per_request for c in runs]) for t, runs in counts.items()}
    valgrind = _first_line([shutil.which("valgrind") or "valgrind", "--version"])
    counted = "counted" if repeat == 1 else f"counted; {repeat} counts per target, median (range)"
    out = [
        "## Instructions per request",
        "",
        f"User-space instructions per request, counted by callgrind ({valgrind}): each target "
        f"started afresh under valgrind, {WARMUP} sequential GETs of the small body on one "
        f"keep-alive connection, then {requests} more on it {counted}. The kernel's share (the "
        "socket system calls, the same in number for every target) is not counted. Repeatable "
        "to about 0.5 % between runs on a busy machine: compare these when a change is worth a "
        "few per cent.",
        "",
        "| target | instructions/request | /floor | /bare |",
        "|---|---:|---:|---:|",
    ]
    for target, runs in counts.items():
        figure = f"{per_request[target]:,.0f}"
        if repeat > 1:
            values = [c.per_request for c in runs]
            figure += f" ({min(values):,.0f}-{max(values):,.0f})"
        out.append(
            f"| {LABELS[target]} | {figure} | {per_request[target] / per_request['floor']:.2f} "
            f"| {per_request[target] / per_request['bare']:.2f} |"
        )
    return "\n".join(out)


def render_instructions(counts: dict[str, list[Count]], *, command: str) -> str:
    """Return the report of an instructions-only run (``--instructions-only``)."""
    info = machine()
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# ksz-proxy instruction counts",
            "",
            f"Run: {now}, `{command}` (no wrk rounds).",
            "",
            f"Machine: {info['cores']} cores, {info['cpu']}, Linux {info['kernel']}. "
            f"Python {info['python']}, aiohttp {info['aiohttp']}, uvloop {info['uvloop']}, "
            f"nginx {info['nginx']} (the upstream).",
            "",
            instructions_section(counts),
            "",
        ]
    )
