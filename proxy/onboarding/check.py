"""Own ``ksz-proxy check``: walk the KSZ onboarding steps and report each one, cause and fix.

The steps follow a connection as it is made, so the first failure is the one to fix
(../shared/KSZ.md, "Onboarding steps"):

1. configuration and credentials load (the certificate is valid now, the key matches it), for
   every client (``[client]`` and each ``[[clients]]`` entry) or the one ``--client`` names;
2. DNS: the token endpoint and every REST host resolve;
3. TCP: each one accepts a connection -- on the extranet a timeout means the firewall flow is
   not open yet;
4. TLS: the handshake succeeds with the trust (and client certificate) the proxy uses;
5. token: one token per client and scope set from the token endpoint, as the proxy gets them;
6. health: ``GET <api>/health`` through a proxy started in-process from the same configuration
   on ephemeral loopback ports, so the request takes the proxy's real path.

Steps 2 to 4 run once per destination whatever the number of clients. Steps 2 to 4 live in
``probes.py``, steps 5 and 6 in ``steps.py``; this module runs them in order,
renders the checklist (or JSON) and decides the exit code: 0 when every step passed, 1 otherwise,
2 when the configuration itself does not load.

A failed step stops the steps that depend on it: they are reported ``skipped``. Nothing secret is
printed: tokens, assertions and passwords never leave the objects that hold them, and of an
answer body only the Belgif ``status`` field is shown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from proxy.clients import check_identities, load_checked
from proxy.config import ClientConfig, Config, Route, load_config
from proxy.credentials import Credentials
from proxy.errors import ConfigError, CredentialError
from proxy.onboarding.probes import ESB, CheckSettings, StepResult, endpoints, network, skip
from proxy.onboarding.steps import check_health, check_tokens

TITLES: Final = {
    1: "configuration",
    2: "DNS",
    3: "TCP connect",
    4: "TLS handshake",
    5: "token",
    6: "health",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Report:
    """Every step result, in checklist order."""

    config_path: Path
    results: tuple[StepResult, ...]
    config_failed: bool = False

    @property
    def exit_code(self) -> int:
        """Return 0 when every step passed, 2 when the configuration failed, else 1."""
        if self.config_failed:
            return 2
        return 0 if all(r.passed for r in self.results) else 1

    def to_json(self) -> dict[str, Any]:
        """Return the report as a JSON-ready dict."""
        return {
            "config": str(self.config_path),
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "steps": [
                {
                    "step": r.number,
                    "name": r.name,
                    "target": r.target,
                    "status": r.status,
                    "detail": r.detail,
                    "cause": r.cause,
                    "fix": r.fix,
                }
                for r in self.results
            ],
        }


# -- entry points ------------------------------------------------------------------------------


def check(
    *,
    config: Path,
    api: str | None,
    as_json: bool,
    environ: Mapping[str, str],
    out: TextIO,
    client: str | None = None,
) -> int:
    """Run ``ksz-proxy check`` and print the checklist (or JSON); return the exit code."""
    report = asyncio.run(run_checks(config, environ, api=api, client=client))
    if as_json:
        print(json.dumps(report.to_json(), indent=2, ensure_ascii=False), file=out)
    else:
        render(report, out)
    return report.exit_code


async def run_checks(
    path: Path,
    environ: Mapping[str, str],
    *,
    api: str | None = None,
    settings: CheckSettings | None = None,
    client: str | None = None,
) -> Report:
    """Walk every step and return the report.

    ``client`` limits the walk to one client; ConfigError when it names none, or when ``api``
    matches no route (of that client).
    """
    settings = settings or CheckSettings()
    try:
        config = load_config(path, environ)
    except ConfigError as exc:
        return _nothing_loaded(path, [_step1_failure(str(path), exc)])
    chosen = chosen_clients(config, client)
    several = len(config.clients) > 1
    first_results: list[StepResult] = []
    keyring: dict[str, Credentials] = {}
    for c in chosen:
        target = _client_target(path, c, several)
        try:
            keyring[c.name] = load_checked(c)
        except (ConfigError, CredentialError) as exc:
            first_results.append(_step1_failure(target, exc))
        else:
            first_results.append(_config_result(target, config, c, keyring[c.name]))
    try:
        check_identities(tuple(c for c in chosen if c.name in keyring), keyring)
    except ConfigError as exc:
        first_results.append(_step1_failure(str(path), exc))
        keyring.clear()
    if not keyring:
        return _nothing_loaded(path, first_results)
    targets = health_targets(config, api, [c.name for c in chosen])
    results = list(first_results)
    hosts = endpoints(config, [route for route, _ in targets])
    # One TLS identity per destination: with upstream.client_certificate there is one client.
    any_credentials = next(iter(keyring.values()))
    probed = await asyncio.gather(*(network(e, any_credentials, settings) for e in hosts))
    for step in range(3):
        results.extend(steps[step] for steps in probed)
    # A host is usable when its last probe (TLS) passed; hosts[0] is the token endpoint.
    reachable = {e.url: steps[2].passed for e, steps in zip(hosts, probed, strict=True)}
    token_results: dict[tuple[str, frozenset[str]], StepResult] = {}
    for c in chosen:
        if c.name not in keyring:
            continue
        wanted = [route.scopes for route, _ in targets if route.client == c.name]
        per_client, remarks = await check_tokens(
            config,
            keyring[c.name],
            wanted,
            reachable[hosts[0].url],
            client=c,
            label=f"client {c.name}, " if several else "",
        )
        token_results.update({(c.name, scopes): r for scopes, r in per_client.items()})
        results.extend(per_client.values())
        results.extend(remarks)
    results.extend(await check_health(config, keyring, targets, reachable, token_results, settings))
    return Report(config_path=path, results=tuple(results))


def chosen_clients(config: Config, name: str | None) -> list[ClientConfig]:
    """Return every client, or the one ``--client`` names (ConfigError when none has it)."""
    if name is None:
        return list(config.clients)
    client = config.clients_by_name.get(name)
    if client is None:
        known = ", ".join(config.clients_by_name)
        raise ConfigError(f'--client: no client is named "{name}" (known: {known})')
    return [client]


def health_targets(
    config: Config, api: str | None, clients: list[str] | None = None
) -> list[tuple[Route, str]]:
    """Return (route, health path) for every route, or for the route holding ``api``.

    With ``clients``, only the routes bound to one of them.
    """
    routes = [r for r in config.routes if clients is None or r.client in clients]
    if api is None:
        return [(route, route.prefix + "/health") for route in routes]
    path = api.rstrip("/")
    if not path.startswith("/"):
        raise ConfigError(f'--api: {api} must be a path starting with "/"')
    for route in routes:  # longest prefix first, as the proxy matches them
        if route.matches(path):
            return [(route, path + "/health")]
    prefixes = ", ".join(sorted(r.prefix for r in routes))
    raise ConfigError(f"--api: {api} is under no configured route ({prefixes})")


def _client_target(path: Path, client: ClientConfig, several: bool) -> str:
    return f"{path} (client {client.name})" if several else str(path)


def _step1_failure(target: str, exc: ConfigError | CredentialError) -> StepResult:
    return StepResult(
        number=1,
        target=target,
        status="failed",
        detail=exc.detail,
        cause="the configuration or the partner credentials cannot be used",
        fix="correct the key or file named above; `ksz-proxy cert-info FILE` shows what a "
        "keystore or certificate holds",
    )


def _nothing_loaded(path: Path, first: list[StepResult]) -> Report:
    rest = [skip(n, "", "the configuration did not load") for n in range(2, 7)]
    return Report(config_path=path, results=(*first, *rest), config_failed=True)


# -- rendering ---------------------------------------------------------------------------------


def render(report: Report, out: TextIO) -> None:
    """Print the checklist for people: one line per step and target, then cause and fix."""
    marks = _marks(out)
    print(f"ksz-proxy check: {report.config_path}", file=out)
    for r in report.results:
        what = f"{r.target}: {r.detail}" if r.target else r.detail
        print(f"{marks[r.status]} {r.number}. {TITLES[r.number]:<14} {what}", file=out)
        if r.cause:
            print(f"      cause: {r.cause}", file=out)
        if r.fix:
            print(f"      fix:   {r.fix}", file=out)
    failed = sum(r.status == "failed" for r in report.results)
    skipped = sum(r.status == "skipped" for r in report.results)
    remarks = sum(r.status == "warning" for r in report.results)
    if report.config_failed:
        summary = "The configuration did not load: nothing else was checked."
    elif failed or skipped:
        summary = (
            f"{failed} failed, {skipped} skipped: fix the first failure, then run "
            "`ksz-proxy check` again."
        )
    else:
        summary = "All steps passed" + (f" ({remarks} with remarks)." if remarks else ".")
    print(summary, file=out)


def _marks(out: TextIO) -> dict[str, str]:
    marks = {"ok": "✔", "warning": "!", "failed": "✘", "skipped": "-"}
    try:
        "✔✘".encode(getattr(out, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        marks.update(ok="+", failed="x")
    return marks


# -- step 1 ------------------------------------------------------------------------------------


def _config_result(
    target: str, config: Config, client: ClientConfig, credentials: Credentials
) -> StepResult:
    days = credentials.days_left()
    where = f"environment {config.environment}" if config.environment else "no environment"
    detail = (
        f"client-id {client.id} ({where}, {config.channel}); certificate "
        f"{credentials.subject}, valid until {credentials.not_after:%Y-%m-%d} ({days} days "
        f"left); {credentials.key_description} key matches it"
    )
    if days < 30:
        return StepResult(
            number=1,
            target=target,
            status="warning",
            detail=detail,
            cause=f"the certificate expires in {days} days",
            fix=f"get the renewed certificate now, send its .crt to {ESB} and reload the proxy "
            "(SIGHUP) once KSZ registered it",
        )
    return StepResult(number=1, target=target, status="ok", detail=detail)
