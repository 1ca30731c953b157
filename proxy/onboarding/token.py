"""Own ``ksz-proxy token``: fetch one token with one of the proxy's clients and describe it.

A JWT's header and claims are decoded (not verified) for people; the token itself is printed only
on request. A refusal is explained with the same cause and fix as ``check`` step 5.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from proxy import oauth, tokens
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
    wanted = frozenset(requested) if requested else chosen.scopes
    return asyncio.run(_token(loaded, chosen, credentials, wanted, show_token, out))


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


async def _token(
    config: Config,
    client: ClientConfig,
    credentials: Credentials,
    scopes: frozenset[str],
    show: bool,
    out: TextIO,
) -> int:
    async with oauth.make_session(config) as session:
        provider = tokens.TokenProvider(config, credentials, session, client=client)
        try:
            fetched = await provider.get(scopes)
        except TokenUnavailable as exc:
            skew = provider.clock_skew_s
            cause, fix = token_advice(exc, config, credentials, scopes, skew, client)
            code = f", {exc.oauth_error}" if exc.oauth_error else ""
            print(
                f"No token for scopes {scope_label(scopes, default=DEFAULT_TEXT)}: {exc.detail}\n"
                f"  route:  {provider.egress_route().describe()}\n"
                f"  reason: {exc.reason}{code}\n"
                f"  cause:  {cause}\n"
                f"  fix:    {fix}",
                file=out,
            )
            return 1
        finally:
            await provider.close()
    expires = datetime.fromtimestamp(fetched.expires_at_wall, UTC)
    lines = [
        ("client", f"{client.name} ({client.id})"),
        ("token endpoint", provider.token_url or "-"),
        ("route", provider.egress_route().describe()),
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
