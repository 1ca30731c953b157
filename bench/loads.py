"""Own the measurements: wrk rounds, 1 GiB streams, the cold burst and the optional profile."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import resource
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from procs import (
    RssSampler,
    cpu_seconds,
    http_call,
    listen_overflows,
    port_open,
    reset_peak_rss,
    rss_kib,
    wait_until,
)
from stack import API, BENCH, BODIES, LABELS, STREAM_API, KszProxy, Stack, start_ksz

from proxy.sandbox.upstream import stream_chunks, stream_sha256

MiB = 1 << 20
_RESULT = re.compile(r"BENCH-RESULT (.*)")


@dataclass(frozen=True, slots=True, kw_only=True)
class Sample:
    """One wrk run, with the CPU each side used during it."""

    rps: float
    p50_ms: float
    p99_ms: float
    p90_ms: float = 0.0
    max_ms: float = 0.0
    requests: int
    errors: int  # socket errors: connect, read, write, timeout
    non_2xx: int
    cores: dict[str, float] = field(default_factory=dict)  # proxy, upstream, wrk
    proxy_cpu_us: float = 0.0  # the proxy's CPU time per request
    proxy_rss_kib: int = 0  # the proxy's RSS right after the run (its main process)
    # Connections the kernel dropped because a listener's accept queue was full (system-wide,
    # so anything else connecting on this machine during the run counts too).
    overflows: int = 0

    def __post_init__(self) -> None:
        if self.requests <= 0:
            raise ValueError("a wrk run answered no request")


def run_wrk(
    url: str, connections: int, duration_s: int, watch: dict[str, list[int]] | None = None
) -> Sample:
    """Run wrk (1 thread at c=1, 2 otherwise); also measure the CPU of the ``watch`` groups."""
    threads = 1 if connections == 1 else 2
    argv = [
        shutil.which("wrk") or "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{duration_s}s",
        "--timeout",
        "10s",
        "--latency",
        "-s",
        str(BENCH / "wrk_report.lua"),
        url,
    ]
    watch = watch or {}
    cpu_before = {name: cpu_seconds(pids) for name, pids in watch.items()}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    overflows_before = listen_overflows()
    started = time.perf_counter()
    done = subprocess.run(  # noqa: S603  # argv built here, no shell
        argv, capture_output=True, text=True, timeout=duration_s + 60, check=False
    )
    wall_s = time.perf_counter() - started
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    overflows = listen_overflows() - overflows_before
    match = _RESULT.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed on {url}:\n{done.stdout}\n{done.stderr}")
    values = {k: int(v) for k, v in (item.split("=") for item in match.group(1).split())}
    used = {name: cpu_seconds(pids) - cpu_before[name] for name, pids in watch.items()}
    cores = {name: seconds / wall_s for name, seconds in used.items()}
    cores["wrk"] = (
        children_after.ru_utime
        + children_after.ru_stime
        - children_before.ru_utime
        - children_before.ru_stime
    ) / wall_s
    return Sample(
        rps=values["requests"] / (values["duration_us"] / 1e6),
        p50_ms=values["p50_us"] / 1000,
        p99_ms=values["p99_us"] / 1000,
        p90_ms=values["p90_us"] / 1000,
        max_ms=values["max_us"] / 1000,
        requests=values["requests"],
        errors=values["connect"] + values["read"] + values["write"] + values["timeout"],
        non_2xx=values["status"],
        cores=cores,
        proxy_cpu_us=1e6 * used.get("proxy", 0.0) / max(values["requests"], 1),
        proxy_rss_kib=_rss_or_zero(watch.get("proxy", [])),
        overflows=overflows,
    )


def _rss_or_zero(pids: Sequence[int]) -> int:
    try:
        return rss_kib(pids[0]) if pids else 0
    except (OSError, RuntimeError):
        return 0


def describe(sample: Sample) -> str:
    """Return one progress line's worth of a wrk run."""
    text = (
        f"{sample.rps:7.0f} req/s  p50 {sample.p50_ms:.3f} p90 {sample.p90_ms:.3f} "
        f"p99 {sample.p99_ms:.3f} max {sample.max_ms:.0f} ms  cpu "
        + "/".join(f"{sample.cores.get(k, 0):.2f}" for k in ("proxy", "upstream", "wrk"))
    )
    if sample.proxy_rss_kib:
        text += f"  rss {sample.proxy_rss_kib / 1024:.0f} MiB"
    if sample.errors or sample.non_2xx:
        text += f"  errors {sample.errors}  non-2xx {sample.non_2xx}"
    if sample.overflows:
        text += f"  accept-queue drops {sample.overflows}"
    return text


Key = tuple[str, str, int]  # (target, body, connections)


def measure(
    stack: Stack,
    *,
    rounds: int,
    duration_s: int,
    concurrencies: Sequence[int],
    bodies: Sequence[str],
) -> dict[Key, list[Sample]]:
    """Run wrk on every target alternately, ``rounds`` times per body and concurrency."""
    targets = stack.targets
    for target in targets:  # warm up: pools, caches, the allocator
        run_wrk(stack.url(target, "small"), 32, 1)
    samples: dict[Key, list[Sample]] = {}
    total = rounds * len(bodies) * len(concurrencies) * len(targets)
    done = 0
    for round_no in range(rounds):
        # Another target goes first each round, so drift over time favours none of them.
        shift = round_no % len(targets)
        order = targets[shift:] + targets[:shift]
        for body in bodies:
            for connections in concurrencies:
                for target in order:
                    watch = {"proxy": stack.proxy_pids(target), "upstream": stack.upstream_pids()}
                    sample = run_wrk(stack.url(target, body), connections, duration_s, watch)
                    samples.setdefault((target, body, connections), []).append(sample)
                    done += 1
                    where = f"[{done}/{total}] round {round_no + 1} {body:>5} c={connections:<3}"
                    print(f"  {where} {LABELS[target]:<20} {describe(sample)}", flush=True)
    return samples


# -- streams ---------------------------------------------------------------------------------------


async def _chunks(size: int) -> AsyncIterator[bytes]:
    for chunk in stream_chunks(size):
        yield chunk


async def stream_measure(ksz: KszProxy, size: int) -> dict[str, Any]:
    """Stream ``size`` bytes down, then up, through ksz-proxy; return RSS and speed figures.

    The peak RSS is the larger of a 10 ms sampler and VmHWM after resetting it (when the
    kernel allows), so a short spike between two samples still counts.
    """
    pid = ksz.proc.pid
    expected = stream_sha256(size)
    base = f"http://127.0.0.1:{ksz.port}{STREAM_API}"
    result: dict[str, Any] = {"bytes": size}
    timeout = aiohttp.ClientTimeout(total=900)
    async with aiohttp.ClientSession(
        timeout=timeout, auto_decompress=False, trust_env=False
    ) as session:
        for direction in ("down", "up"):
            before = rss_kib(pid)
            hwm = reset_peak_rss(pid)
            started = time.perf_counter()
            with RssSampler(pid) as sampler:
                if direction == "down":
                    digest = hashlib.sha256()
                    async with session.get(f"{base}/stream?bytes={size}") as response:
                        status = response.status
                        async for chunk in response.content.iter_chunked(MiB):
                            digest.update(chunk)
                    intact = status == 200 and digest.hexdigest() == expected
                else:
                    async with session.post(f"{base}/upload", data=_chunks(size)) as response:
                        status = response.status
                        echo = await response.json()
                    intact = (
                        status == 200
                        and echo.get("body_bytes") == size
                        and echo.get("body_sha256") == expected
                    )
            elapsed = time.perf_counter() - started
            peak = max(sampler.peak_kib, rss_kib(pid, "VmHWM") if hwm else 0)
            result[direction] = {
                "status": status,
                "intact": intact,
                "seconds": elapsed,
                "mb_per_s": size / elapsed / 1e6,
                "rss_before_kib": before,
                "rss_peak_kib": peak,
                "rss_after_kib": rss_kib(pid),
                "growth_kib": peak - before,
            }
    return result


# -- the cold burst --------------------------------------------------------------------------------


def control(stack: Stack, method: str, path: str) -> dict[str, Any]:
    """Call the fakes' control listener."""
    port = int(stack.fakes["control"].rsplit(":", 1)[1])
    status, body = http_call(port, path, method)
    if status != 200:
        raise RuntimeError(f"fakes control {method} {path}: {status}")
    data: dict[str, Any] = json.loads(body)
    return data


def token_requests_metric(admin_port: int) -> float:
    """Return kszproxy_token_requests_total summed over outcomes, from /metrics."""
    status, body = http_call(admin_port, "/metrics")
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in body.decode().splitlines()
        if line.startswith("kszproxy_token_requests_total{")
    )


async def _burst(url: str, count: int) -> tuple[list[int], list[float]]:
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, trust_env=False
    ) as session:
        started = time.perf_counter()

        async def one() -> tuple[int, float]:
            async with session.get(url) as response:
                await response.read()
                return response.status, time.perf_counter() - started

        results = await asyncio.gather(*(one() for _ in range(count)))
    return [status for status, _ in results], [seconds for _, seconds in results]


def cold_burst(stack: Stack, count: int, delay_s: float) -> dict[str, Any]:
    """Send ``count`` concurrent requests to a fresh ksz-proxy that holds no token yet."""
    control(stack, "POST", "/reset")
    # The first token request waits at the fake, so the whole burst meets an empty cache.
    control(stack, "POST", f"/delay?seconds={delay_s}")
    cold = start_ksz(
        stack, "ksz-cold", "warning", max_in_flight=max(1024, 2 * count), wait_ready=False
    )
    try:
        wait_until(lambda: port_open(cold.port), "cold ksz-proxy listening", cold.proc)
        no_token = http_call(cold.admin_port, "/readyz")[0] == 503
        url = f"http://127.0.0.1:{cold.port}{API}/{BODIES['small'][0]}"
        statuses, seconds = asyncio.run(_burst(url, count))
        return {
            "requests": count,
            "ok": sum(1 for s in statuses if s == 200),
            "statuses": sorted(set(statuses)),
            "cold_at_start": no_token,
            "first_answer_s": min(seconds),
            "last_answer_s": max(seconds),
            "token_delay_s": delay_s,
            "token_requests_metric": token_requests_metric(cold.admin_port),
            "token_requests_fake": control(stack, "GET", "/counts")["token_requests"],
        }
    finally:
        stack.procs.stop(cold.proc)


# -- profile (optional) ----------------------------------------------------------------------------


def profile(
    stack: Stack, py_spy: str, target: str, seconds: int, raw: Path, *, native: bool
) -> str:
    """Record ksz-proxy with py-spy under wrk (small body, c=32); return a markdown summary."""
    argv = [
        py_spy,
        "record",
        "--pid",
        str(stack.proxy_pids(target)[0]),
        "--duration",
        str(seconds),
        "--rate",
        "250",
        "--format",
        "raw",
        "--output",
        str(raw),
    ]
    if native:
        argv.append("--native")
    recorder = subprocess.Popen(  # noqa: S603  # argv built here, no shell
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        time.sleep(1.0)  # py-spy attaches
        watch = {"proxy": stack.proxy_pids(target), "upstream": stack.upstream_pids()}
        sample = run_wrk(stack.url(target, "small"), 32, max(1, seconds - 2), watch)
    finally:
        _, err = recorder.communicate(timeout=seconds + 60)
    if recorder.returncode != 0 or not raw.exists():
        return f"py-spy failed ({recorder.returncode}): {err.decode(errors='replace')[-500:]}"
    return summarise_profile(raw, sample, target)


_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame)
    if match is None:
        return frame
    path = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match.group('func')} ({path})"


def summarise_profile(raw: Path, sample: Sample, target: str, top: int = 30) -> str:
    """Summarise py-spy's collapsed stacks: self and inclusive share per function."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [
            _frame_name(f) for f in stack.split(";") if not f.startswith(("process ", "thread "))
        ]
        if not frames:
            continue
        total += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for name in set(frames):
            inclusive[name] = inclusive.get(name, 0) + count
    lines = [
        f"py-spy on {LABELS[target]} under wrk c=32, small body: {sample.rps:.0f} req/s while "
        f"sampled, proxy CPU {sample.cores.get('proxy', 0):.2f} cores, {total} busy samples.",
        "",
        "| self % | function |",
        "|---:|---|",
    ]
    for name, count in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {100 * count / total:.1f} | `{name}` |")
    lines += ["", "| inclusive % | function |", "|---:|---|"]
    for name, count in sorted(inclusive.items(), key=lambda kv: -kv[1])[: top + 10]:
        lines.append(f"| {100 * count / total:.1f} | `{name}` |")
    return "\n".join(lines)
