"""Several proxy processes on one port (``listen.workers`` > 1): a supervisor and its workers.

One Python process forwards about as much as one core allows. With ``listen.workers = N`` the
``run`` process becomes a supervisor that forks N workers before it starts an event loop. Every
worker is the whole proxy of ``listen.workers = 1`` -- its own token cache, upstream connection
pool, limits and metrics -- and binds ``listen.port`` with ``SO_REUSEPORT``, so the kernel
spreads new connections over the workers. Decisions, as documented in the README:

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
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from proxy.app import authority, bound_port, not_ready
from proxy.config import Config
from proxy.credentials import Credentials
from proxy.errors import ConfigError

# The `run` command's own lines, as with one process (README, "Logs").
log = logging.getLogger("ksz_proxy.cli")

EXIT_FAILURE: Final = 1
EXIT_USAGE: Final = 2
# How long a worker gets to start listening before the supervisor gives up on it.
START_TIMEOUT_S: Final = 30.0
# Beyond the drain time, how long stopping workers get before they are killed.
STOP_GRACE_S: Final = 5.0
# A worker's admin answer (over its Unix socket) must come within this.
ASK_TIMEOUT_S: Final = 2.0
_HEALTH_RANK: Final = {"UP": 0, "DEGRADED": 1, "DOWN": 2}
_SAMPLE_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


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
    sessions: dict[int, aiohttp.ClientSession] = field(default_factory=dict)

    @property
    def stopping(self) -> bool:
        """Return True once the proxy is stopping (readiness then says draining)."""
        return self.stop.is_set()

    def running(self) -> list[Worker]:
        """Return the workers that have not exited."""
        return [w for w in self.workers if w.exit_code is None]


SUPERVISOR: Final = web.AppKey("supervisor", Supervisor)


def fork_workers(
    config: Config,
    credentials: Credentials,
    serve: Callable[..., Coroutine[Any, Any, int]],
    loop_run: Callable[[Coroutine[Any, Any, int]], int],
) -> Supervisor:
    """Fork ``listen.workers`` workers; each runs ``loop_run(serve(config, credentials, ...))``.

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
            try:
                code = loop_run(
                    serve(
                        config,
                        credentials,
                        worker=WorkerSetup(
                            index=index, admin_socket=socket, supervisor_pid=supervisor_pid
                        ),
                    )
                )
            except ConfigError as exc:
                print(f"ksz-proxy: worker {index}: {exc.detail}", file=sys.stderr)
                code = EXIT_USAGE
            except KeyboardInterrupt:
                pass  # Ctrl-C during start-up, before the worker's own handlers: exit 1 quietly
            except BaseException:
                log.exception("worker failed", extra={"worker": index})
            finally:
                logging.shutdown()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        workers.append(Worker(index=index, pid=pid, socket=socket))
    return Supervisor(config=config, workers=workers, runtime=runtime)


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerSetup:
    """What a worker needs to know about its place: index, admin socket, supervisor."""

    index: int
    admin_socket: Path
    supervisor_pid: int


async def watch_supervisor(setup: WorkerSetup, stop: asyncio.Event) -> None:
    """Set ``stop`` once the supervisor is gone (this worker was re-parented)."""
    while not stop.is_set():
        if os.getppid() != setup.supervisor_pid:
            log.error("supervisor gone; stopping", extra={"worker": setup.index})
            stop.set()
            return
        await asyncio.sleep(1.0)


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
        app = make_admin_app(supervisor)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, config.admin.host, config.admin.port)
        try:
            await site.start()
        except OSError as exc:
            raise ConfigError(
                f"admin.port: cannot listen on {config.admin.host}:{config.admin.port} "
                f"({exc.strerror or exc})"
            ) from None
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
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        supervisor.exit_code = EXIT_USAGE
    finally:
        supervisor.stop.set()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
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
            extra={"signal": sig.name, "drain_s": supervisor.config.listen.drain_timeout_s},
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
    deadline = time.monotonic() + supervisor.config.listen.drain_timeout_s + STOP_GRACE_S
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


async def _ask(supervisor: Supervisor, worker: Worker, path: str) -> tuple[int, bytes] | None:
    """GET ``path`` from a worker's admin socket; None when it does not answer."""
    session = supervisor.sessions[worker.index]
    try:
        async with session.get(f"http://worker{path}", allow_redirects=False) as response:
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None


async def _ask_all(
    supervisor: Supervisor, path: str
) -> list[tuple[Worker, tuple[int, bytes] | None]]:
    answers = await asyncio.gather(*(_ask(supervisor, w, path) for w in supervisor.workers))
    return list(zip(supervisor.workers, answers, strict=True))


# -- the merged admin application ----------------------------------------------------------------


def make_admin_app(supervisor: Supervisor) -> web.Application:
    """Return the supervisor's admin application: the workers' answers, merged."""
    app = web.Application()
    app[SUPERVISOR] = supervisor
    app.router.add_get("/livez", _livez)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    return app


async def _livez(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    if len(supervisor.running()) != len(supervisor.workers):
        return not_ready("worker_down", "A worker process has exited.", instance="/livez")
    return web.json_response({"status": "UP"})


async def _readyz(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    if supervisor.stopping:
        return not_ready("draining", "The proxy is shutting down.")
    for worker, answer in await _ask_all(supervisor, "/readyz"):
        if answer is None:
            return not_ready("worker_down", f"Worker {worker.index} does not answer.")
        status, body = answer
        if status != 200:
            reason = _json_field(body, "reason") or "not_ready"
            detail = _json_field(body, "detail") or "Not ready."
            return not_ready(reason, f"Worker {worker.index}: {detail}")
    return web.json_response({"status": "UP"})


async def _health(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    documents: list[dict[str, Any]] = []
    for worker, answer in await _ask_all(supervisor, "/health"):
        document: dict[str, Any] = {"status": "DOWN", "details": {"worker": "not answering"}}
        if answer is not None:
            with contextlib.suppress(ValueError):
                parsed = _json(answer[1])
                if isinstance(parsed.get("status"), str) and isinstance(
                    parsed.get("details"), dict
                ):
                    document = parsed
        documents.append({"worker": worker.index, "pid": worker.pid, **document})
    worst = max(documents, key=_rank)  # the first of the worst: worker 0 when all are equal
    status = "DOWN" if supervisor.stopping else worst["status"]
    body = {"status": status, "details": worst["details"], "workers": documents}
    return web.json_response(
        body, status=503 if status == "DOWN" else 200, headers={"Cache-Control": "no-store"}
    )


async def _metrics(request: web.Request) -> web.Response:
    supervisor = request.app[SUPERVISOR]
    texts: list[tuple[int, str]] = []
    for worker, answer in await _ask_all(supervisor, "/metrics"):
        if answer is not None and answer[0] == 200:
            texts.append((worker.index, answer[1].decode("utf-8")))
    body = merge_metrics(texts) + (
        "# HELP kszproxy_workers_running Worker processes running.\n"
        "# TYPE kszproxy_workers_running gauge\n"
        f"kszproxy_workers_running {len(supervisor.running())}\n"
        "# HELP kszproxy_workers_configured Worker processes configured (listen.workers).\n"
        "# TYPE kszproxy_workers_configured gauge\n"
        f"kszproxy_workers_configured {len(supervisor.workers)}\n"
    )
    return web.Response(
        body=body.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
    )


def merge_metrics(texts: list[tuple[int, str]]) -> str:
    """Merge Prometheus text expositions, adding ``worker="N"`` to every sample.

    A family's samples must stay together in the text format: its HELP and TYPE lines come from
    the first exposition naming it, then every worker's samples follow.
    """
    headers: dict[str, dict[str, str]] = {}
    samples: dict[str, list[str]] = {}
    for index, text in texts:
        family: str | None = None
        for line in text.splitlines():
            parts = line.split(" ", 3)
            if line.startswith("# ") and len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                family = parts[2]
                headers.setdefault(family, {}).setdefault(parts[1], line)
                samples.setdefault(family, [])
                continue
            match = _SAMPLE_NAME.match(line)
            if match is None or family is None:
                continue  # a blank line or another comment
            name, rest = match.group(), line[match.end() :]
            label = f'worker="{index}"'
            if rest.startswith("{}"):
                rest = rest[2:]
            if rest.startswith("{"):
                samples[family].append(f"{name}{{{label},{rest[1:]}")
            else:
                samples[family].append(f"{name}{{{label}}}{rest}")
    lines: list[str] = []
    for family, header in headers.items():
        lines.extend(header[kind] for kind in ("HELP", "TYPE") if kind in header)
        lines.extend(samples[family])
    return "".join(line + "\n" for line in lines)


def _rank(document: dict[str, Any]) -> int:
    return _HEALTH_RANK.get(str(document.get("status")), 2)


def _json(body: bytes) -> dict[str, Any]:
    parsed = json.loads(body)
    if not isinstance(parsed, dict):
        raise ValueError("not an object")
    return parsed


def _json_field(body: bytes, name: str) -> str | None:
    try:
        value = _json(body).get(name)
    except ValueError:
        return None
    return value if isinstance(value, str) else None
