"""Several proxy processes on one port (``listen.workers`` > 1): a supervisor and its workers.

One Python process forwards about as much as one core allows. With ``listen.workers = N`` the
``run`` process becomes a supervisor that forks N workers before it starts an event loop. Every
worker is the whole proxy of ``listen.workers = 1`` -- its own token cache, upstream connection
pool, limits and metrics -- and binds ``listen.port`` with ``SO_REUSEPORT``, so the kernel
spreads new connections over the workers. Decisions, as documented in docs/operations.md
("Workers"):

- Tokens are per worker: N workers make N token requests at start and N per refresh period,
  and hold N valid tokens at a time (client-credentials tokens are independent of each other).
  Single flight holds within each worker, so a cold burst makes at most N token requests.
- Each worker serves its admin application on a private Unix socket in a temporary directory
  only the proxy's user can enter. The supervisor alone listens on ``admin.port`` and answers
  from the workers: ``/metrics`` is every worker's metrics with a ``worker`` label added (sum
  over it in queries), ``/readyz`` is ready when every worker is, ``/health`` reports the worst
  worker at the top level and every worker under ``workers``, ``/livez`` is up while every
  worker runs.
- SIGTERM/SIGINT: the supervisor turns readiness off and passes SIGTERM on; every worker drains
  as a single proxy would. SIGHUP is passed on: every worker reloads its credentials.
- A worker that exits on its own stops the whole proxy (the others are drained), and the
  supervisor exits non-zero (2 when the worker's configuration was refused, e.g. the port is
  taken): the service manager restarts it, and the failure is not hidden behind a respawn loop.
- A worker whose supervisor is gone stops too (checked every second).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from proxy import logs
from proxy.admin import Answer, make_merged_admin_app
from proxy.config import Config, load_config
from proxy.errors import EXIT_FAILURE, EXIT_USAGE, ConfigError
from proxy.server import WorkerSetup, authority, bound_port, listen

# The `run` command's own lines, as with one process (docs/operations.md, "Logs").
log = logging.getLogger("ksz_proxy.cli")

# How long a worker gets to start listening before the supervisor gives up on it.
START_TIMEOUT_S: Final = 30.0
# Beyond the drain time, how long stopping workers get before they are killed.
STOP_GRACE_S: Final = 5.0
# A worker's admin answer (over its Unix socket) must come within this.
ASK_TIMEOUT_S: Final = 2.0


@dataclass(slots=True)
class Worker:
    """One forked worker process."""

    index: int
    pid: int
    socket: Path
    exit_code: int | None = None


@dataclass(slots=True)
class Supervisor:
    """The workers and what the supervisor knows about them."""

    config: Config
    workers: list[Worker]
    runtime: Path
    # Set when the supervisor must stop: a signal, or a worker that exited on its own.
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int = 0
    # Why the supervisor refused to run (its admin port is taken), for the command line to say.
    refused: ConfigError | None = None
    sessions: dict[int, aiohttp.ClientSession] = field(default_factory=dict)
    # How long the workers drain on SIGTERM: listen.drain_timeout_s of the configuration the
    # workers run, re-read on every SIGHUP (``_signal_workers``); 0 until __post_init__.
    drain_s: float = 0.0

    def __post_init__(self) -> None:
        self.drain_s = self.config.listen.drain_timeout_s

    @property
    def stopping(self) -> bool:
        """Return True once the proxy is stopping (readiness then says draining)."""
        return self.stop.is_set()

    def running(self) -> list[Worker]:
        """Return the workers that have not exited."""
        return [w for w in self.workers if w.exit_code is None]

    async def ask_all(self, path: str) -> list[tuple[Worker, Answer]]:
        """GET ``path`` from every worker's admin socket; None for those that do not answer."""
        answers = await asyncio.gather(*(_ask(self, w, path) for w in self.workers))
        return list(zip(self.workers, answers, strict=True))


def fork_workers(config: Config, run_worker: Callable[[WorkerSetup], int]) -> Supervisor:
    """Fork ``listen.workers`` workers; each ends its process with ``run_worker(setup)``'s code.

    Called before any event loop or thread exists in this process, so a fork is safe. In a
    worker this never returns: the worker's exit code ends its process.
    """
    runtime = Path(tempfile.mkdtemp(prefix="ksz-proxy-"))  # mode 0700: the admin sockets
    workers: list[Worker] = []
    supervisor_pid = os.getpid()
    for index in range(config.listen.workers):
        socket = runtime / f"worker-{index}.sock"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = EXIT_FAILURE
            logs.set_context(worker=index)  # every line of this worker says which it is
            try:
                code = run_worker(
                    WorkerSetup(index=index, admin_socket=socket, supervisor_pid=supervisor_pid)
                )
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        workers.append(Worker(index=index, pid=pid, socket=socket))
    return Supervisor(config=config, workers=workers, runtime=runtime)


# -- the supervisor's event loop ------------------------------------------------------------------


async def supervise(supervisor: Supervisor, summary: dict[str, Any]) -> int:
    """Serve the merged admin listener, pass signals on, and stop with the workers."""
    loop = asyncio.get_running_loop()
    config = supervisor.config
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, _stop_requested, supervisor, sig)
    loop.add_signal_handler(signal.SIGHUP, _signal_workers, supervisor, signal.SIGHUP)
    reaper = asyncio.create_task(_reap(supervisor))
    runner: web.AppRunner | None = None
    try:
        for worker in supervisor.workers:
            connector = aiohttp.UnixConnector(path=str(worker.socket))
            supervisor.sessions[worker.index] = aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=ASK_TIMEOUT_S)
            )
        await _wait_listening(supervisor)
        if supervisor.stop.is_set():
            return supervisor.exit_code
        app = make_merged_admin_app(supervisor)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, config.admin.host, config.admin.port)
        await listen(site, "admin", config.admin.host, config.admin.port)
        admin_port = bound_port(runner)
        log.info(
            "ksz-proxy started",
            extra={
                **summary,
                "admin": f"http://{authority(config.admin.host, admin_port)}",
                "workers": len(supervisor.workers),
                "pids": " ".join(str(w.pid) for w in supervisor.workers),
            },
        )
        await supervisor.stop.wait()
    except ConfigError as exc:
        supervisor.refused = exc
        supervisor.exit_code = EXIT_USAGE
    finally:
        supervisor.stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        # Not removed: SIGHUP's default action would end the supervisor while workers drain.
        loop.add_signal_handler(signal.SIGHUP, lambda: None)
        await _stop_workers(supervisor)
        reaper.cancel()
        await asyncio.gather(reaper, return_exceptions=True)
        if runner is not None:
            await runner.cleanup()
        for session in supervisor.sessions.values():
            await session.close()
        shutil.rmtree(supervisor.runtime, ignore_errors=True)
    log.info("ksz-proxy stopped", extra={"exit_code": supervisor.exit_code})
    return supervisor.exit_code


def _stop_requested(supervisor: Supervisor, sig: signal.Signals) -> None:
    if not supervisor.stop.is_set():
        log.info(
            "stopping: workers drain in-flight requests",
            extra={"signal": sig.name, "drain_s": supervisor.drain_s},
        )
    supervisor.stop.set()


def _signal_workers(supervisor: Supervisor, sig: signal.Signals) -> None:
    for worker in supervisor.running():
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, sig)
    if sig == signal.SIGHUP:
        log.info(
            "credential reload passed on to the workers",
            extra={"workers": len(supervisor.running())},
        )
        _reread_drain_timeout(supervisor)


def _reread_drain_timeout(supervisor: Supervisor) -> None:
    """Wait as long on SIGTERM as the workers' reloaded ``listen.drain_timeout_s`` lets them drain.

    The workers reload the whole configuration; the supervisor reads the same file for this one
    key, which decides when it kills a worker that is still draining. A file the workers refuse
    is refused here too, and the old value stays.
    """
    source = supervisor.config.source
    if source is None:
        return
    try:
        drain_s = load_config(source, os.environ).listen.drain_timeout_s
    except (ConfigError, OSError):
        return  # the workers log why; they keep their configuration, and so does this
    if drain_s != supervisor.drain_s:
        log.info(
            "drain timeout changed by the reload",
            extra={"drain_s": drain_s, "was_s": supervisor.drain_s},
        )
        supervisor.drain_s = drain_s


async def _reap(supervisor: Supervisor) -> None:
    """Notice workers that exit; one exiting on its own stops the whole proxy."""
    while supervisor.running():
        for worker in supervisor.running():
            if not _collect(worker) or supervisor.stopping:
                continue
            log.error(
                "worker exited; stopping every worker",
                extra={"worker": worker.index, "pid": worker.pid, "exit_code": worker.exit_code},
            )
            supervisor.exit_code = EXIT_USAGE if worker.exit_code == EXIT_USAGE else EXIT_FAILURE
            supervisor.stop.set()
        await asyncio.sleep(0.1)


def _collect(worker: Worker) -> bool:
    """Record the worker's exit code if it has exited (without waiting); return whether it has."""
    if worker.exit_code is None:
        try:
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:  # already collected elsewhere
            worker.exit_code = EXIT_FAILURE
            return True
        if pid != 0:
            worker.exit_code = os.waitstatus_to_exitcode(status)
    return worker.exit_code is not None


async def _wait_listening(supervisor: Supervisor) -> None:
    """Return once every worker answers on its admin socket (or the proxy is stopping)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = list(supervisor.workers)
    while waiting and not supervisor.stop.is_set():
        for worker in list(waiting):
            if await _ask(supervisor, worker, "/livez") is not None:
                waiting.remove(worker)
        if time.monotonic() > deadline:
            log.error(
                "workers did not start in time",
                extra={"workers": " ".join(str(w.index) for w in waiting)},
            )
            supervisor.exit_code = EXIT_FAILURE
            supervisor.stop.set()
            return
        if waiting:
            await asyncio.sleep(0.05)


async def _stop_workers(supervisor: Supervisor) -> None:
    """SIGTERM every running worker, wait for the drain, then kill what is left."""
    _signal_workers(supervisor, signal.SIGTERM)
    deadline = time.monotonic() + supervisor.drain_s + STOP_GRACE_S
    await _wait_exited(supervisor.workers, deadline)
    left = supervisor.running()
    for worker in left:
        log.error("worker did not stop in time; killing it", extra={"worker": worker.index})
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
    await _wait_exited(left, None)


async def _wait_exited(workers: list[Worker], deadline: float | None) -> None:
    """Return once every one of ``workers`` has exited, or at ``deadline`` (monotonic)."""
    while True:
        exited = [_collect(w) for w in workers]  # every one, not up to the first running
        if all(exited) or (deadline is not None and time.monotonic() >= deadline):
            return
        await asyncio.sleep(0.05)


async def _ask(supervisor: Supervisor, worker: Worker, path: str) -> Answer:
    """GET ``path`` from a worker's admin socket; None when it does not answer."""
    session = supervisor.sessions[worker.index]
    try:
        async with session.get(f"http://worker{path}", allow_redirects=False) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
