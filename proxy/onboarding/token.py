"""Own ``ksz-proxy token``: fetch one token with the proxy's own client and describe it.

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
from proxy.config import Config
from proxy.config_reader import SCOPE_TOKEN
from proxy.credentials import Credentials, load_setup
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
) -> int:
    """Fetch one token with the configured client and describe it."""
    loaded, credentials = load_setup(config, environ)
    requested = [scope for value in scopes for scope in value.split()]
    for scope in requested:
        if not SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(f"--scope: {scope!r} is not a valid OAuth scope")
    if requested:
        return asyncio.run(_tokens(loaded, credentials, [frozenset(requested)], show_token, out))
    # As `check` does: the scope sets the routes ask for, said before the answer.
    for scope_set in loaded.scope_sets:
        prefixes = " ".join(r.prefix for r in loaded.routes if r.scopes == scope_set)
        label = scope_label(scope_set, default=DEFAULT_TEXT)
        print(f"scopes {label} (the routes' {prefixes}; --scope asks for others)", file=out)
    print(file=out)
    return asyncio.run(_tokens(loaded, credentials, loaded.scope_sets, show_token, out))


async def _tokens(
    config: Config,
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
        code = max(code, await _token(config, credentials, scopes, show, out))
    return code


async def _token(
    config: Config, credentials: Credentials, scopes: frozenset[str], show: bool, out: TextIO
) -> int:
    async with oauth.make_session(config) as session:
        # The plain client, one request: no cache, no retries, so no backoff lines either.
        provider = oauth.OAuthClient(config, credentials, session, (time.monotonic, time.time))
        try:
            fetched = await provider.fetch(scopes)
        except TokenUnavailable as exc:
            cause, fix = token_advice(exc, config, credentials, scopes, provider.clock_skew_s)
            code = f", {exc.oauth_error}" if exc.oauth_error else ""
            print(
                f"No token for scopes {scope_label(scopes, default=DEFAULT_TEXT)}: {exc.detail}\n"
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
        ("token endpoint", provider.token_url or "-"),
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
