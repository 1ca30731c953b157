"""Own the admin listener: ``/livez``, ``/readyz``, ``/health``, ``/metrics``, in both forms.

- One process (``listen.workers = 1``, or each worker): the answers come from this process's
  token providers (one per client), drain and metrics, found under the typed ``AppKey``s below
  (``server.py`` creates the resources under them, and a reload swaps them: ``LIVE``,
  ``CLIENT_TOKENS``).
- The supervisor of ``listen.workers`` > 1: the answers are the workers' own, asked over their
  admin sockets and merged: ``/metrics`` is every worker's metrics with a ``worker`` label added,
  ``/readyz`` is ready when every worker is, ``/health`` reports the worst worker at the top
  level and every worker under ``workers``, ``/livez`` is up while every worker runs.

Each endpoint's two forms stand side by side below.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiohttp import web
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from proxy.config import Config
from proxy.drain import Drain
from proxy.egress import describe_destinations
from proxy.errors import NotReady
from proxy.forward import Forwarder
from proxy.health import ClientState, assess_clients
from proxy.metrics import Metrics, scope_label
from proxy.problems import problem_response
from proxy.reload import ReloadStatus
from proxy.tokens import TokenProvider

CONFIG: Final = web.AppKey("config", Config)  # as started; the one in use is LIVE's
DRAIN: Final = web.AppKey("drain", Drain)
TOKENS: Final = web.AppKey("tokens", TokenProvider)  # the default client's, as started
# Every client's provider by client name, as in use: a reload (SIGHUP) updates this very dict.
# A route gets tokens from its own client's only.
CLIENT_TOKENS: Final = web.AppKey("client_tokens", dict[str, TokenProvider])
# Why a client's last reload kept its running credentials (no secret), by client name.
RELOAD_ERRORS: Final = web.AppKey("reload_errors", dict[str, str])
FORWARDER: Final = web.AppKey("forwarder", Forwarder)
METRICS: Final = web.AppKey("metrics", Metrics)


@dataclass(slots=True)
class Live:
    """What the per-process admin routes read besides the providers; a reload replaces it."""

    config: Config
    reloads: ReloadStatus


LIVE: Final = web.AppKey("live", Live)

# The text format generate_latest writes, as answered since the first release. Not
# CONTENT_TYPE_LATEST: since prometheus-client 0.23 that names format 1.0.0, a change of answer.
METRICS_CONTENT_TYPE: Final = CONTENT_TYPE_PLAIN_0_0_4
_HEALTH_RANK: Final = {"UP": 0, "DEGRADED": 1, "DOWN": 2}
_SAMPLE_NAME: Final = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")

Answer = tuple[int, bytes] | None


class WorkerView(Protocol):
    """What the merged answers need to know of one worker process."""

    @property
    def index(self) -> int: ...

    @property
    def pid(self) -> int: ...


class Fleet(Protocol):
    """What the merged answers need to know of the workers (``workers.Supervisor``)."""

    @property
    def stopping(self) -> bool: ...

    @property
    def workers(self) -> Sequence[WorkerView]: ...

    def running(self) -> Sequence[WorkerView]: ...

    async def ask_all(self, path: str) -> Sequence[tuple[WorkerView, Answer]]: ...


FLEET: Final[web.AppKey[Fleet]] = web.AppKey("fleet")

Route = tuple[str, Callable[[web.Request], Awaitable[web.Response]]]


def not_ready(reason: str, detail: str, *, instance: str = "/readyz") -> web.Response:
    """Return an admin path's 503 problem answer, asking to come back in a second."""
    error = NotReady(detail, reason=reason)
    return problem_response(error, instance=instance, trace_id="-")


# -- /livez -------------------------------------------------------------------------------------


async def _livez(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "UP"})


async def _merged_livez(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    if len(fleet.running()) != len(fleet.workers):
        return not_ready("worker_down", "A worker process has exited.", instance="/livez")
    return web.json_response({"status": "UP"})


# -- /readyz ------------------------------------------------------------------------------------


async def _readyz(request: web.Request) -> web.Response:
    app = request.app
    if app[DRAIN].draining:
        return not_ready("draining", "The proxy is shutting down.")
    for provider in app[CLIENT_TOKENS].values():
        for scopes in provider.scope_sets:  # those of the configuration in use
            if provider.peek(scopes) is None:
                return not_ready(
                    "no_token", "No usable token yet for every client and configured scope set."
                )
    return web.json_response({"status": "UP"})


async def _merged_readyz(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    if fleet.stopping:
        return not_ready("draining", "The proxy is shutting down.")
    for worker, answer in await fleet.ask_all("/readyz"):
        if answer is None:
            return not_ready("worker_down", f"Worker {worker.index} does not answer.")
        status, body = answer
        if status != 200:
            reason = _json_field(body, "reason") or "not_ready"
            detail = _json_field(body, "detail") or "Not ready."
            return not_ready(reason, f"Worker {worker.index}: {detail}")
    return web.json_response({"status": "UP"})


# -- /health ------------------------------------------------------------------------------------


async def _health(request: web.Request) -> web.Response:
    app = request.app
    reload_errors = app[RELOAD_ERRORS]
    verdict = assess_clients(
        [
            ClientState(
                name=name,
                client_id=provider.client.id,
                scope_sets=provider.scope_sets,
                tokens=tuple(provider.status()),
                certificate_not_after=provider.credentials.not_after,
                reload_error=reload_errors.get(name),
            )
            for name, provider in app[CLIENT_TOKENS].items()
        ],
        draining=app[DRAIN].draining,
    )
    live = app[LIVE]
    details = {
        **verdict.details,
        # How each destination is reached (never with proxy credentials).
        "egress": describe_destinations(live.config),
        # A refused reload shows here; the status stays as it is: the running config still serves.
        "config": live.reloads.details(),
    }
    return web.json_response(
        {"status": verdict.status, "details": details},
        status=verdict.http_status,
        headers={"Cache-Control": "no-store"},
    )


async def _merged_health(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    documents: list[dict[str, Any]] = []
    for worker, answer in await fleet.ask_all("/health"):
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
    status = "DOWN" if fleet.stopping else worst["status"]
    body = {"status": status, "details": worst["details"], "workers": documents}
    return web.json_response(
        body, status=503 if status == "DOWN" else 200, headers={"Cache-Control": "no-store"}
    )


# -- /metrics -----------------------------------------------------------------------------------


async def _metrics(request: web.Request) -> web.Response:
    app = request.app
    metrics = app[METRICS]
    # Gauges that describe state are read at scrape time, off the request path.
    for name, provider in app[CLIENT_TOKENS].items():
        for status in provider.status():
            metrics.token_expiry.labels(client=name, scopes=scope_label(status.scopes)).set(
                status.expires_at_wall or 0
            )
        metrics.certificate_expiry.labels(client=name).set(
            provider.credentials.not_after.timestamp()
        )
    providers = app[CLIENT_TOKENS]
    skew = providers[app[LIVE].config.client.name].clock_skew_s
    if skew is not None:
        metrics.clock_skew.set(skew)
    metrics.in_flight.set(app[DRAIN].in_flight)
    return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})


async def _merged_metrics(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    texts: list[tuple[int, str]] = []
    for worker, answer in await fleet.ask_all("/metrics"):
        if answer is not None and answer[0] == 200:
            texts.append((worker.index, answer[1].decode("utf-8")))
    body = merge_metrics(texts) + (
        "# HELP kszproxy_workers_running Worker processes running.\n"
        "# TYPE kszproxy_workers_running gauge\n"
        f"kszproxy_workers_running {len(fleet.running())}\n"
        "# HELP kszproxy_workers_configured Worker processes configured (listen.workers).\n"
        "# TYPE kszproxy_workers_configured gauge\n"
        f"kszproxy_workers_configured {len(fleet.workers)}\n"
    )
    return web.Response(body=body.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


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


# -- the two applications -----------------------------------------------------------------------

_ROUTES: Final[Sequence[Route]] = (
    ("/livez", _livez),
    ("/readyz", _readyz),
    ("/health", _health),
    ("/metrics", _metrics),
)
_MERGED_ROUTES: Final[Sequence[Route]] = (
    ("/livez", _merged_livez),
    ("/readyz", _merged_readyz),
    ("/health", _merged_health),
    ("/metrics", _merged_metrics),
)


def make_admin_app(config: Config, drain: Drain) -> web.Application:
    """Return one process's admin application; ``server.py`` adds the resources it reads."""
    app = web.Application(handler_args={"auto_decompress": False})
    app[CONFIG] = config
    app[LIVE] = Live(config=config, reloads=ReloadStatus())
    app[DRAIN] = drain
    app[METRICS] = Metrics(
        (r.prefix for r in config.routes), config.token_keys, config.clients_by_name
    )
    app[RELOAD_ERRORS] = {}
    _add_routes(app, _ROUTES)
    return app


def make_merged_admin_app(fleet: Fleet) -> web.Application:
    """Return the supervisor's admin application: the workers' answers, merged."""
    app = web.Application()
    app[FLEET] = fleet
    _add_routes(app, _MERGED_ROUTES)
    return app


def _add_routes(app: web.Application, routes: Sequence[Route]) -> None:
    for path, handler in routes:
        app.router.add_get(path, handler)


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
