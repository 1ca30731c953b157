"""Own the benchmark's processes and what is read from /proc about them.

Every process is started here, in a process group of its own and with a parent-death signal,
and stopped here by its own id: SIGTERM, then SIGKILL to its group (an nginx master's workers
are in its group). Nothing the harness started outlives it, even when it is killed.
"""

from __future__ import annotations

import contextlib
import ctypes
import http.client
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the harness dies, so nothing outlives a killed run."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass(slots=True)
class Proc:
    """A process the harness started, in a process group of its own."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """Return the process id (also its process group id)."""
        return self.popen.pid

    def tree(self) -> list[int]:
        """Return the process and its children (an nginx master and its workers)."""
        return [self.pid, *children(self.pid)]

    def tail(self, lines: int = 15) -> str:
        """Return the last lines of the process's output."""
        with contextlib.suppress(OSError):
            text = self.log.read_text(encoding="utf-8", errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""


class Processes:
    """Start processes and stop every one of them, whatever happens in between."""

    def __init__(self, logs: Path) -> None:
        self._logs = logs
        self.running: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Proc:
        """Start ``argv`` with its output in ``<logs>/<name>.log``."""
        log = self._logs / f"{name}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(  # noqa: S603  # argv built by the harness, no shell
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=None if env is None else dict(env),
                start_new_session=True,
                # Safe here: the harness starts processes only while no other thread runs.
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name=name, popen=popen, log=log)
        self.running.append(proc)
        return proc

    def stop(self, proc: Proc, timeout_s: float = 10.0) -> None:
        """Stop ``proc`` (SIGTERM, then SIGKILL to its process group) and wait for it."""
        if proc in self.running:
            self.running.remove(proc)
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.popen.wait(timeout_s)
        # Whatever is left in the group (an nginx worker whose master died) goes too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def stop_all(self) -> None:
        """Stop every process still running, the last started first."""
        for proc in reversed(list(self.running)):
            self.stop(proc)


def children(pid: int) -> list[int]:
    """Return the direct children of ``pid``."""
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(p) for p in text.split()]
    return []


def cpu_seconds(pids: Sequence[int]) -> float:
    """Return the CPU time (user + system) the processes have used so far."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            # The command name (field 2) may hold spaces; the fields after it do not.
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICKS_PER_S


def listen_overflows() -> int:
    """Return the kernel's count of connections dropped by full accept queues (TcpExt)."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=False))["ListenOverflows"])
    return 0


def rss_kib(pid: int, field_name: str = "VmRSS") -> int:
    """Return a /proc/PID/status memory field (VmRSS, VmHWM) in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field_name} not found for pid {pid}")


def reset_peak_rss(pid: int) -> bool:
    """Reset the process's VmHWM to its current RSS (Linux >= 4.0); False when refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Sample a process's RSS every few milliseconds in a thread; keep the maximum."""

    def __init__(self, pid: int, interval_s: float = 0.01) -> None:
        self._pid = pid
        self._interval_s = interval_s
        self._stop = threading.Event()
        self.peak_kib = 0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, RuntimeError):
                self.peak_kib = max(self.peak_kib, rss_kib(self._pid))
            self._stop.wait(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int) -> bool:
    """Return True when something accepts connections on 127.0.0.1:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_call(
    port: int, path: str, method: str = "GET", timeout_s: float = 5.0
) -> tuple[int, bytes]:
    """Call ``http://127.0.0.1:port/path``; return (status, body). No proxy variables apply."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_until(check: Callable[[], bool], what: str, proc: Proc, timeout_s: float = 30.0) -> None:
    """Poll ``check`` every 5 ms until it is true; fail naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException):
            if check():
                return
        time.sleep(0.005)
    raise RuntimeError(f"{what}: not within {timeout_s:g} s\n{proc.tail()}")
