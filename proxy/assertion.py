"""Own the JWT client assertion and the token request form (pure functions, no I/O).

The assertion follows RFC 7523 as the Social Security OAuth v5 server expects it (KSZ.md):
``iss`` = ``sub`` = client id, ``aud`` the token endpoint URL unless configured otherwise, a fresh
UUID4 ``jti``, ``iat`` now and ``exp`` = ``iat`` + the configured lifetime. The header carries the
configured ``alg``, ``typ: JWT`` and an optional ``kid``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import jwt

from proxy.config import ClientConfig, Config
from proxy.credentials import Credentials

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
GRANT_TYPE: Final = "client_credentials"


@dataclass(frozen=True, slots=True, kw_only=True)
class AssertionSettings:
    """What shapes an assertion: who we are, for whom, how it is signed and for how long."""

    client_id: str
    audience: str
    algorithm: str
    key_id: str = "none"
    lifetime_s: int = 300

    @classmethod
    def from_config(cls, config: Config, token_url: str) -> AssertionSettings:
        """Build the default client's settings from the configuration and the token URL."""
        return cls.for_client(config.client, token_url)

    @classmethod
    def for_client(cls, client: ClientConfig, token_url: str) -> AssertionSettings:
        """Build one client's settings (resolved against [oauth] by the config loader)."""
        return cls(
            client_id=client.id,
            audience=client.audience or token_url,
            algorithm=client.algorithm,
            key_id=client.key_id,
            lifetime_s=client.assertion_lifetime_s,
        )


def key_id_for(mode: str, credentials: Credentials) -> str | None:
    """Return the ``kid`` header value for a ``key_id`` mode, or None to omit it."""
    if mode == "none":
        return None
    if mode == "x5t#S256":
        return credentials.x5t_s256
    if mode == "x5t":
        return credentials.x5t
    return mode


def build_claims(
    *, client_id: str, audience: str, lifetime_s: int, now: float, jti: str
) -> dict[str, Any]:
    """Return the assertion claims for a client at ``now`` (seconds since the epoch)."""
    iat = int(now)
    return {
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "jti": jti,
        "iat": iat,
        "exp": iat + lifetime_s,
    }


def build_header(*, algorithm: str, kid: str | None) -> dict[str, Any]:
    """Return the JOSE header; ``kid`` only when there is one."""
    header: dict[str, Any] = {"alg": algorithm, "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    return header


def sign_assertion(
    settings: AssertionSettings,
    credentials: Credentials,
    *,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """Return a signed client assertion (compact JWS)."""
    claims = build_claims(
        client_id=settings.client_id,
        audience=settings.audience,
        lifetime_s=settings.lifetime_s,
        now=time.time() if now is None else now,
        jti=jti or str(uuid.uuid4()),
    )
    header = build_header(
        algorithm=settings.algorithm, kid=key_id_for(settings.key_id, credentials)
    )
    # PyJWT adds alg/typ itself; passing them keeps the header exactly as built above.
    return jwt.encode(claims, credentials.private_key, algorithm=settings.algorithm, headers=header)


def token_request_form(
    assertion: str, scopes: frozenset[str], *, client_id: str | None = None
) -> Mapping[str, str]:
    """Return the form fields of a client-credentials token request.

    ``scope`` is sent only when scopes are asked for: without it the server grants the client's
    default scopes, which KSZ recommends. ``client_id`` only when configured.
    """
    form = {
        "grant_type": GRANT_TYPE,
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
    }
    if scopes:
        form["scope"] = " ".join(sorted(scopes))
    if client_id is not None:
        form["client_id"] = client_id
    return form
