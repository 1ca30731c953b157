"""Own steps 5 and 6 of ``ksz-proxy check``: the proof of onboarding KSZ asks for.

5. token: one token per client and scope set, fetched by the proxy's own ``TokenProvider``
   (one per client, as when the proxy runs); a refusal is
   explained by its OAuth error code (``invalid_client``: certificate or client-id not registered
   in this environment; ``invalid_scope``: scope not granted), and the clock skew read from the
   token endpoint's ``Date`` header is reported when it exceeds a few seconds;
6. health: ``GET <api>/health`` through a proxy started in-process from the same configuration
   (listeners moved to free loopback ports), so the request takes the proxy's real path. A Belgif
   ``UP`` passes; ``DEGRADED``, an authorization error (the service answered: the flow works) and
   a 404 (not deployed yet: the token is the proof) pass with a remark; ``DOWN`` fails.

Of an answer body only the Belgif ``status`` field is shown; the token never is.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import aiohttp

from proxy import oauth, tokens
from proxy.clients import Keyring
from proxy.config import DEFAULT_ALLOWED_HOSTS, ClientConfig, Config, Route
from proxy.credentials import Credentials
from proxy.errors import ProxyError, TokenUnavailable
from proxy.onboarding.probes import ESB, CheckSettings, StepResult, fail, skip, url_source
from proxy.scopes import DEFAULT_TEXT, scope_label
from proxy.server import start

SKEW_WARN_S: Final = 5.0
_MAX_BODY: Final = 64 * 1024


# -- step 5: token -----------------------------------------------------------------------------


def token_advice(
    exc: TokenUnavailable,
    config: Config,
    credentials: Credentials,
    scopes: frozenset[str],
    skew_s: float | None,
    client: ClientConfig | None = None,
) -> tuple[str, str]:
    """Return the likely cause and the fix for a failed token request of ``client``."""
    client = client or config.client
    # The keys that set what the assertion says: [oauth]'s for [client], its own otherwise.
    own = "oauth" if client.where == "client" else client.where
    code = exc.oauth_error
    skewed = skew_s is not None and abs(skew_s) > SKEW_WARN_S
    if code == "invalid_client":
        environment = config.environment or "this environment"
        cause = (
            f"the token endpoint does not accept client-id {client.id} with this "
            f"certificate in {environment} (invalid_client): not registered, or registered "
            "with another certificate"
        )
        if skewed:
            cause += (
                f"; also this machine's clock is {skew_s:+.0f} s off the server's, which alone "
                "makes an assertion look expired or not yet valid"
            )
        fix = (
            f"check {client.where}.id, then have KSZ register this certificate (SHA-256 "
            f"{credentials.sha256_hex}) for the client-id: `ksz-proxy cert-info -c CONFIG "
            f"--export-crt FILE` and send FILE to {ESB}; if KSZ confirms the registration, "
            f"check {own}.audience, {own}.key_id and {own}.algorithm"
        )
        return cause, fix
    if code == "invalid_scope":
        return (
            f"scope {scope_label(scopes, default=DEFAULT_TEXT)} is not granted to client-id "
            f"{client.id} (invalid_scope)",
            f"ask {ESB} to grant it to this client-id, or correct routes[].scopes / oauth.scopes",
        )
    hint = oauth.HINTS.get(code or exc.reason)
    if code:
        return f"the token endpoint refused the request ({code})", hint or (
            f"look the error code up in RFC 6749 section 5.2 and contact {ESB}"
        )
    fallback = {
        "unavailable": "the token endpoint is overloaded or down (HTTP 429 or 5xx): retry later",
        "invalid_response": f"check {url_source(config, 'oauth.token_url')}: the answer is not a "
        "token endpoint's (a TLS-inspecting middlebox or a portal page may be answering)",
    }
    return exc.detail, hint or fallback.get(exc.reason, "retry; if it persists contact KSZ")


async def check_tokens(
    config: Config,
    credentials: Credentials,
    wanted: Sequence[frozenset[str]],
    reachable: bool,
    *,
    client: ClientConfig | None = None,
    label: str = "",
) -> tuple[dict[frozenset[str], StepResult], list[StepResult]]:
    """Fetch one token per scope set of ``client`` (default: the default client).

    Return the result per set and any clock-skew remark; ``label`` starts each target.
    """
    client = client or config.client
    scope_sets = list(dict.fromkeys(wanted))
    if not reachable:
        why = "the token endpoint is not reachable (steps 2-4)"
        return {
            s: skip(5, label + "scopes " + scope_label(s, default=DEFAULT_TEXT), why)
            for s in scope_sets
        }, []
    async with oauth.make_session(config) as session:
        provider = tokens.TokenProvider(config, credentials, session, client=client)
        try:
            outcomes = await asyncio.gather(
                *(provider.get(s) for s in scope_sets), return_exceptions=True
            )
        finally:
            await provider.close()
    skew = provider.clock_skew_s
    results: dict[frozenset[str], StepResult] = {}
    for scopes, outcome in zip(scope_sets, outcomes, strict=True):
        target = label + "scopes " + scope_label(scopes, default=DEFAULT_TEXT)
        if isinstance(outcome, TokenUnavailable):
            cause, fix = token_advice(outcome, config, credentials, scopes, skew, client)
            results[scopes] = fail(5, target, outcome.detail, cause, fix)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            granted = outcome.granted_scope or "not stated"
            results[scopes] = StepResult(
                number=5,
                target=target,
                status="ok",
                detail=f"Bearer token for {outcome.expires_in_s} s; granted scope: {granted}",
            )
    remarks = []
    if skew is not None and abs(skew) > SKEW_WARN_S:
        remarks.append(
            StepResult(
                number=5,
                target=label + "clock",
                status="warning",
                detail=f"this machine's clock is {skew:+.0f} s off the token endpoint's (Date)",
                cause="the system clock is not synchronised",
                fix="run NTP (chrony, systemd-timesyncd): client assertions carry iat and exp, "
                "and a large skew makes the token endpoint refuse them",
            )
        )
    return results, remarks


# -- step 6: health ----------------------------------------------------------------------------


def local_config(config: Config, keyring: Keyring | None = None) -> Config:
    """Return ``config`` with both listeners on free loopback ports and no shared secret.

    Only the inbound side changes: the path a request takes to KSZ stays the proxy's own. With
    ``keyring``, clients without credentials there are left out, with their routes.
    """
    if keyring is not None:
        config = dataclasses.replace(
            config,
            clients=tuple(c for c in config.clients if c.name in keyring),
            routes=tuple(r for r in config.routes if r.client in keyring),
        )
    listen = dataclasses.replace(
        config.listen,
        host="127.0.0.1",
        port=0,
        allowed_hosts=DEFAULT_ALLOWED_HOSTS,
        shared_secret=None,
        shared_secret_file=None,
    )
    admin = dataclasses.replace(config.admin, host="127.0.0.1", port=0)
    return dataclasses.replace(config, listen=listen, admin=admin)


async def check_health(
    config: Config,
    keyring: Keyring,
    targets: Sequence[tuple[Route, str]],
    reachable: Mapping[str, bool],
    token_results: Mapping[tuple[str, frozenset[str]], StepResult],
    settings: CheckSettings,
) -> list[StepResult]:
    """GET each health path through an in-process proxy, unless its host or token failed.

    ``keyring`` has the credentials of the clients that loaded, ``token_results`` the step 5
    result per (client, scope set); a client without credentials has its routes skipped and is
    left out of the in-process proxy.
    """
    results: dict[int, StepResult] = {}
    runnable: list[int] = []
    for i, (route, path) in enumerate(targets):
        target = "GET " + path
        if not reachable[route.upstream]:
            results[i] = skip(6, target, "the REST API is not reachable (steps 2-4)")
        elif route.client not in keyring:
            results[i] = skip(6, target, "this route's client has no credentials (step 1)")
        elif not token_results[(route.client, route.scopes)].passed:
            results[i] = skip(6, target, "no token for this route's scopes (step 5)")
        else:
            runnable.append(i)
    if runnable:
        try:
            running = await start(local_config(config, keyring), keyring, drain_s=1.0)
        except (ProxyError, OSError) as exc:
            detail = exc.detail if isinstance(exc, ProxyError) else (exc.strerror or str(exc))
            for i in runnable:
                results[i] = fail(
                    6,
                    "GET " + targets[i][1],
                    f"the proxy did not start ({detail})",
                    "the proxy cannot run on this machine",
                    "fix what the message names, then run the check again",
                )
        else:
            try:
                timeout = aiohttp.ClientTimeout(total=settings.health_timeout_s)
                async with aiohttp.ClientSession(trust_env=False, timeout=timeout) as session:
                    for i in runnable:
                        results[i] = await _get_health(session, running.proxy_url, targets[i])
            finally:
                await running.close()
    return [results[i] for i in range(len(targets))]


async def _get_health(
    session: aiohttp.ClientSession, proxy_url: str, target: tuple[Route, str]
) -> StepResult:
    route, path = target
    label = "GET " + path
    try:
        async with session.get(
            proxy_url + path, allow_redirects=False, headers={"Accept": "application/json"}
        ) as response:
            status = response.status
            body = await response.content.read(_MAX_BODY)
    except TimeoutError:
        return fail(
            6,
            label,
            "no answer in time",
            "the REST API accepted the request but did not answer",
            "retry later; check upstream.read_timeout_s",
        )
    except aiohttp.ClientError:
        return fail(
            6,
            label,
            "the in-process proxy did not answer",
            "the proxy broke the exchange",
            "run with --log-level debug and look at the log",
        )
    return _judge_health(label, route, status, _json_object(body))


def _judge_health(label: str, route: Route, status: int, data: dict[str, Any]) -> StepResult:
    reason = data.get("reason")
    # The proxy's own problem answers carry a "reason" code; KSZ's Belgif problems do not.
    if isinstance(reason, str) and status >= 500 and reason.startswith(("token_", "upstream_")):
        detail = f"HTTP {status} from the proxy ({reason})"
        if reason.startswith("token_"):
            return fail(
                6,
                label,
                detail,
                "the proxy obtained no token for this route",
                oauth.HINTS.get(str(data.get("oauthError") or reason[6:]), "see step 5"),
            )
        return fail(
            6,
            label,
            detail,
            "the proxy could not complete the call to the REST API",
            "see steps 2-4 for this host; the proxy's limits are upstream.connect_timeout_s "
            "and upstream.read_timeout_s",
        )
    value = data.get("status")
    shown = f", status {value}" if isinstance(value, str) else ""
    detail = f"HTTP {status}{shown}"
    if status == 200 and value == "DEGRADED":
        return StepResult(
            number=6,
            target=label,
            status="warning",
            detail=detail,
            cause="the service answers but reports DEGRADED: the flow works",
            fix="nothing to fix here; if it lasts, ask KSZ about the service",
        )
    if 200 <= status < 300:
        return StepResult(number=6, target=label, status="ok", detail=detail)
    if status in (401, 403):
        scope = scope_label(route.scopes, default=DEFAULT_TEXT)
        return StepResult(
            number=6,
            target=label,
            status="warning",
            detail=f"HTTP {status}: authorization error",
            cause="the service answered, which proves the flow (KSZ onboarding, step 5)",
            fix=f"to use the API, ask {ESB} to grant its scope to the client-id (this route "
            f"asks for {scope}; see routes[].scopes)",
        )
    if status == 404:
        return StepResult(
            number=6,
            target=label,
            status="warning",
            detail="HTTP 404: the service is not deployed (yet)",
            cause=f"nothing answers at {label[4:]}",
            fix="until KSZ deploys it, the token obtained in step 5 is the onboarding proof; "
            "check the route prefix against the API documentation",
        )
    if status == 503 and value == "DOWN":
        return fail(
            6,
            label,
            detail,
            "the service itself reports DOWN: network, TLS and token all work",
            f"retry later; if it stays DOWN, tell {ESB}",
        )
    return fail(
        6,
        label,
        detail,
        "the service answered with an error",
        f"retry later; if it persists, tell {ESB}",
    )


def _json_object(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
