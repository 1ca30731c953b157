"""Own ``ksz-proxy token``: fetch one token with one of the proxy's clients and describe it.

A JWT's header and claims are decoded (not verified) for people; the token itself is printed only
on request. A refusal is explained with the same cause and fix as ``check`` step 5.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from proxy import oauth
from proxy.clients import load_checked
from proxy.config import ClientConfig, Config, default_client, load_config
from proxy.config_reader import SCOPE_TOKEN
from proxy.credentials import Credentials
from proxy.errors import ConfigError, TokenUnavailable
from proxy.onboarding.steps import SKEW_WARN_S, token_advice
from proxy.scopes import DEFAULT_TEXT, scope_label


def token(
    *,
    config: Path,
    scopes: Sequence[str],
    show_token: bool,
    environ: Mapping[str, str],
    out: TextIO,
    client: str | None = None,
) -> int:
    """Fetch one token with a configured client (``client``, else the default) and describe it."""
    loaded = load_config(config, environ)
    chosen = token_client(loaded, client)
    credentials = load_checked(chosen)
    requested = [scope for value in scopes for scope in value.split()]
    for scope in requested:
        if not SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(f"--scope: {scope!r} is not a valid OAuth scope")
    if requested:
        wanted = [frozenset(requested)]
        return asyncio.run(_tokens(loaded, chosen, credentials, wanted, show_token, out))
    # As `check` does: the scope sets of this client's routes, said before the answer.
    scope_sets = [scopes for name, scopes in loaded.token_keys if name == chosen.name]
    for scope_set in scope_sets:
        prefixes = " ".join(
            r.prefix for r in loaded.routes if r.client == chosen.name and r.scopes == scope_set
        )
        label = scope_label(scope_set, default=DEFAULT_TEXT)
        print(f"scopes {label} (the routes' {prefixes}; --scope asks for others)", file=out)
    if not scope_sets:
        scope_sets = [chosen.scopes]
        label = scope_label(chosen.scopes, default=DEFAULT_TEXT)
        print(f"scopes {label} (client {chosen.name}'s own; no route uses it)", file=out)
    print(file=out)
    return asyncio.run(_tokens(loaded, chosen, credentials, scope_sets, show_token, out))


def token_client(config: Config, name: str | None) -> ClientConfig:
    """Return the client ``--client`` names, else the default one (ConfigError if none)."""
    known = ", ".join(config.clients_by_name)
    if name is None:
        name = default_client(config.clients)
        if name is None:
            raise ConfigError(
                f'--client: required: there are several clients and none is named "default" '
                f"(known: {known})"
            )
    client = config.clients_by_name.get(name)
    if client is None:
        raise ConfigError(f'--client: no client is named "{name}" (known: {known})')
    return client


async def _tokens(
    config: Config,
    client: ClientConfig,
    credentials: Credentials,
    scope_sets: Sequence[frozenset[str]],
    show: bool,
    out: TextIO,
) -> int:
    """Fetch and describe one token per scope set; exit 1 when any is refused."""
    code = 0
    for i, scopes in enumerate(scope_sets):
        if i:
            print(file=out)
        code = max(code, await _token(config, client, credentials, scopes, show, out))
    return code


async def _token(
    config: Config,
    client: ClientConfig,
    credentials: Credentials,
    scopes: frozenset[str],
    show: bool,
    out: TextIO,
) -> int:
    async with oauth.make_session(config) as session:
        # The plain client, one request: no cache, no retries, so no backoff lines either.
        clocks = (time.monotonic, time.time)
        provider = oauth.OAuthClient(config, credentials, session, clocks, client=client)
        try:
            fetched = await provider.fetch(scopes)
        except TokenUnavailable as exc:
            skew = provider.clock_skew_s
            cause, fix = token_advice(exc, config, credentials, scopes, skew, client)
            code = f", {exc.oauth_error}" if exc.oauth_error else ""
            route = _route(config, provider)
            print(
                f"No token for scopes {scope_label(scopes, default=DEFAULT_TEXT)}: {exc.detail}\n"
                + (f"  route:  {route}\n" if route else "")
                + f"  reason: {exc.reason}{code}\n"
                f"  cause:  {cause}\n"
                f"  fix:    {fix}",
                file=out,
            )
            return 1
        finally:
            await provider.close()
    expires = datetime.fromtimestamp(fetched.expires_at_wall, UTC)
    route = _route(config, provider)
    lines = [
        ("client", f"{client.name} ({client.id})"),
        ("token endpoint", provider.token_url or "-"),
        *([("route", route)] if route else []),
        ("scopes asked", scope_label(scopes, default=DEFAULT_TEXT)),
        ("scope granted", fetched.granted_scope or "(not stated)"),
        ("token type", "Bearer"),
        ("expires in", f"{fetched.expires_in_s} s (at {expires:%Y-%m-%d %H:%M:%S} UTC)"),
    ]
    skew = provider.clock_skew_s
    if skew is not None:
        note = " -- synchronise the clock (NTP)" if abs(skew) > SKEW_WARN_S else ""
        lines.append(("clock skew", f"{skew:+.1f} s against the token endpoint{note}"))
    decoded = decode_jwt(fetched.value)
    if decoded is None:
        lines.append(("format", "opaque (not a JWT)"))
    else:
        header, claims = decoded
        lines.append(("format", "JWT (decoded below, signature not verified)"))
        lines.append(("JWT header", json.dumps(header, indent=2, sort_keys=True)))
        shown = json.dumps(claims, indent=2, sort_keys=True) if claims is not None else "(not JSON)"
        lines.append(("JWT claims", shown))
    lines.append(("token", fetched.value if show else "(not shown; add --show-token)"))
    for label, value in lines:
        print(f"{label:<15} {value}".replace("\n", "\n" + " " * 16), file=out)
    return 0


def _route(config: Config, client: oauth.OAuthClient) -> str | None:
    """Return how the token endpoint is reached; None when nothing sets a forward proxy.

    Without [egress] or a proxy URL the output says nothing of proxies (issue 16 item 9).
    """
    route = client.egress_route()
    return route.describe() if route.proxy is not None or config.egress.mode != "none" else None


def decode_jwt(value: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Return a JWT's header and claims (unverified), or None when ``value`` is not a JWT."""
    parts = value.split(".")
    if len(parts) != 3:
        return None
    header = _b64url_json(parts[0])
    if header is None:
        return None
    return header, _b64url_json(parts[1])


def _b64url_json(part: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None
