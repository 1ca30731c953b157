"""Own the sandbox's fake Social Security OAuth v5 authorization server.

``FakeAuthServer`` plays the token endpoint a KSZ partner talks to (../shared/KSZ.md), strictly:
``client_credentials`` only, clients authenticate with an RFC 7523 JWT assertion
(``private_key_jwt``) verified against the certificate registered for the client id, and every
refusal is an RFC 6749 section 5.2 error with a fixed description. Tokens are opaque random
strings; ``introspect`` answers RFC 7662 questions about them, so the fake KSZ REST API can
check what the proxy sends. Several clients can be registered, each with its own certificate
(RSA or EC); ``client_of`` says which client a token was issued to, even once it is no longer
active, and ``requests_from`` which token requests a client made.

Tests steer it: ``inject`` queues faults (slow, 5xx, HTML, broken JSON, a dropped connection,
a redirect, any JSON answer) consumed one per token request; ``requests`` records what every
token request carried and how it ended; ``clock`` decides assertion and token expiry.

Routes::

    POST /REST/oauth/v5/token                   form -> access token or RFC 6749 error
    POST /REST/oauth/v5/introspect              form token=... -> RFC 7662 answer
    GET  /.well-known/oauth-authorization-server  RFC 8414 metadata

Checks on a token request, in order: content type, grant type, client authentication method,
the unverified assertion (readable, allowed ``alg``, known issuer, form ``client_id``), the
verified assertion (signature, ``aud``, required claims, ``iss`` = ``sub``, expiry, issue time,
lifetime, ``kid``, ``jti`` replay), then the scopes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import secrets
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import parse_qsl

import jwt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

JWT_BEARER: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
FORM: Final = "application/x-www-form-urlencoded"
REQUIRED_CLAIMS: Final = ("exp", "iat", "iss", "sub", "jti", "aud")

# Signature algorithms a certificate key can verify. HS* (a shared secret) and "none" are never
# acceptable for private_key_jwt, whatever a caller configures.
_RSA_ALGORITHMS: Final = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_EC_CURVES: Final[Mapping[str, type[ec.EllipticCurve]]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
}
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# RFC 6749 appendix A.4: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_MAX_FORM_FIELDS: Final = 32

FaultKind = Literal["delay", "status", "html", "garbage", "drop", "redirect", "response"]


@dataclass(frozen=True, slots=True, kw_only=True)
class RegisteredClient:
    """An OAuth client as KSZ registers it: client id, certificate and grantable scopes."""

    client_id: str
    certificate: x509.Certificate  # assertions are verified with its public key
    scopes: frozenset[str]  # scopes that may be granted
    default_scopes: frozenset[str]  # granted when the request names none
    expected_kid: str | None = None  # when set, the JWT header's kid must equal it

    def __post_init__(self) -> None:
        if not self.client_id:
            raise ValueError("client_id must not be empty")
        if not self.default_scopes <= self.scopes:
            raise ValueError("default_scopes must be a subset of scopes")
        if not isinstance(
            self.certificate.public_key(), rsa.RSAPublicKey | ec.EllipticCurvePublicKey
        ):
            raise ValueError("the certificate key must be RSA or EC")


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """A misbehaviour the next token request meets instead of (or before) a normal answer.

    ``delay`` sleeps ``delay_s`` then answers normally; ``status`` answers ``status`` with
    ``{"error": "temporarily_unavailable"}``; ``html`` a 200 HTML page; ``garbage`` a 200
    ``application/json`` body that is not JSON; ``drop`` closes the connection without a byte
    of answer; ``redirect`` a 302 to ``location``; ``response`` the JSON ``body`` with
    ``status``. ``retry_after`` adds a Retry-After header to ``status`` and ``response``.
    """

    kind: FaultKind
    delay_s: float = 0.0
    status: int = 503
    retry_after: int | None = None
    body: Mapping[str, object] | None = None
    location: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("delay", "status", "html", "garbage", "drop", "redirect", "response"):
            raise ValueError(f"unknown fault kind {self.kind!r}")
        if self.delay_s < 0:
            raise ValueError("delay_s must not be negative")
        if not 100 <= self.status <= 599:
            raise ValueError("status must be an HTTP status code")
        if self.kind == "redirect" and not self.location:
            raise ValueError("a redirect fault needs a location")
        if self.kind == "response" and self.body is None:
            raise ValueError("a response fault needs a body")


@dataclass(slots=True)
class TokenRequestRecord:
    """What the server saw in one token request, and how it ended."""

    # The form holds the client assertion: kept out of repr like every secret.
    form: dict[str, str] = field(repr=False)
    headers: dict[str, str] = field(repr=False)
    assertion_header: dict[str, Any] | None
    claims: dict[str, Any] | None
    outcome: str  # "issued", an RFC 6749 error code, "fault:<kind>" ("pending" until answered)


@dataclass(slots=True)
class IssuedToken:
    """An access token the server issued."""

    value: str = field(repr=False)
    client_id: str
    scopes: frozenset[str]
    expires_at: float  # on the server's clock (wall clock seconds by default)
    revoked: bool = False


class OAuthError(Exception):
    """An RFC 6749 section 5.2 refusal; the description is a fixed text."""

    def __init__(self, status: int, code: str, description: str) -> None:
        super().__init__(f"{code}: {description}")
        self.status = status
        self.code = code
        self.description = description


def _invalid_request(description: str) -> OAuthError:
    return OAuthError(400, "invalid_request", description)


def _invalid_client(description: str) -> OAuthError:
    return OAuthError(401, "invalid_client", description)


class FakeAuthServer:
    """A strict fake of the Social Security OAuth v5 token endpoint, with fault injection."""

    TOKEN_PATH: Final = "/REST/oauth/v5/token"  # noqa: S105  # a path, not a password
    INTROSPECT_PATH: Final = "/REST/oauth/v5/introspect"
    METADATA_PATH: Final = "/.well-known/oauth-authorization-server"

    def __init__(
        self,
        *,
        clients: Iterable[RegisteredClient] = (),
        expires_in: int = 3600,
        audience: str | None = None,
        allowed_algorithms: Collection[str] = ("RS256", "PS256", "ES256"),
        max_assertion_lifetime_s: int = 3600,
        leeway_s: int = 30,
        clock: Callable[[], float] = time.time,
    ) -> None:
        unsafe = set(allowed_algorithms) - _RSA_ALGORITHMS - set(_EC_CURVES)
        if unsafe:
            raise ValueError(f"not an asymmetric JWS algorithm: {', '.join(sorted(unsafe))}")
        if not allowed_algorithms:
            raise ValueError("allowed_algorithms must not be empty")
        self.clients: dict[str, RegisteredClient] = {}
        for client in clients:
            self.register(client)
        self.expires_in = expires_in
        # None: the token URL as the request reached us (scheme, Host header, TOKEN_PATH).
        self.audience = audience
        self.allowed_algorithms: tuple[str, ...] = tuple(allowed_algorithms)
        self.max_assertion_lifetime_s = max_assertion_lifetime_s
        self.leeway_s = leeway_s
        self.clock = clock
        self.token_requests = 0
        self.requests: list[TokenRequestRecord] = []
        self.issued: dict[str, IssuedToken] = {}
        self._faults: deque[Fault] = deque()
        # (client id, jti) -> assertion exp; an expired assertion is refused anyway, so its
        # jti can be forgotten and the set stays small in a long demo run.
        self._seen_jti: dict[tuple[str, str], float] = {}

    def register(self, client: RegisteredClient) -> None:
        """Register ``client`` (replacing any client with the same id)."""
        self.clients[client.client_id] = client

    def unregister(self, client_id: str) -> None:
        """Forget a client: its assertions are refused with invalid_client from now on."""
        self.clients.pop(client_id, None)

    def client_of(self, token: str) -> str | None:
        """Return the id of the client ``token`` was issued to (active or not), else None."""
        issued = self.issued.get(token)
        return issued.client_id if issued is not None else None

    def requests_from(self, client_id: str) -> list[TokenRequestRecord]:
        """Return the recorded token requests whose assertion names ``client_id`` as issuer."""
        return [
            r for r in self.requests if r.claims is not None and r.claims.get("iss") == client_id
        ]

    def inject(self, fault: Fault, times: int = 1) -> None:
        """Queue ``fault`` for the next ``times`` token requests, after those already queued."""
        if times < 1:
            raise ValueError("times must be at least 1")
        self._faults.extend([fault] * times)

    def clear_faults(self) -> None:
        """Drop every queued fault."""
        self._faults.clear()

    def introspect(self, token: str) -> dict[str, Any]:
        """Describe ``token`` as an RFC 7662 introspection answer."""
        issued = self.issued.get(token)
        if issued is None or issued.revoked or self.clock() >= issued.expires_at:
            return {"active": False}
        return {
            "active": True,
            "client_id": issued.client_id,
            "scope": " ".join(sorted(issued.scopes)),
            "exp": int(issued.expires_at),
            "token_type": "Bearer",
        }

    def revoke(self, token: str) -> None:
        """Make ``token`` inactive from now on (unknown tokens are ignored)."""
        issued = self.issued.get(token)
        if issued is not None:
            issued.revoked = True

    def expire_all(self) -> None:
        """Make every issued token expire now."""
        now = self.clock()
        for issued in self.issued.values():
            issued.expires_at = min(issued.expires_at, now)

    def reset_counters(self) -> None:
        """Forget the token request count and records (tokens and seen jti values stay)."""
        self.token_requests = 0
        self.requests.clear()

    def make_app(self) -> web.Application:
        """Return the aiohttp application serving this authorization server."""
        app = web.Application()
        app.router.add_post(self.TOKEN_PATH, self._token)
        app.router.add_post(self.INTROSPECT_PATH, self._introspect)
        app.router.add_get(self.METADATA_PATH, self._metadata)
        return app

    # -- handlers ------------------------------------------------------------------------------

    async def _token(self, request: web.Request) -> web.StreamResponse:
        self.token_requests += 1
        # Taken before the first await, so faults meet requests in their order of arrival.
        fault = self._faults.popleft() if self._faults else None
        form, form_error = await _read_form(request)
        header, claims = _peek(form.get("client_assertion"))
        record = TokenRequestRecord(
            form=form,
            headers=dict(request.headers),
            assertion_header=header,
            claims=claims,
            outcome="pending",
        )
        self.requests.append(record)
        if fault is not None:
            if fault.kind != "delay":
                record.outcome = f"fault:{fault.kind}"
                return _faulty_answer(fault, request)
            await asyncio.sleep(fault.delay_s)
        try:
            if form_error is not None:
                raise form_error
            client, scopes = self._authenticate(request, form, header, claims)
        except OAuthError as exc:
            record.outcome = exc.code
            return _json(exc.status, {"error": exc.code, "error_description": exc.description})
        token = IssuedToken(
            value=secrets.token_urlsafe(32),
            client_id=client.client_id,
            scopes=scopes,
            expires_at=self.clock() + self.expires_in,
        )
        self.issued[token.value] = token
        record.outcome = "issued"
        return _json(
            200,
            {
                "access_token": token.value,
                "token_type": "Bearer",
                "expires_in": self.expires_in,
                "scope": " ".join(sorted(scopes)),
            },
        )

    async def _introspect(self, request: web.Request) -> web.Response:
        form, form_error = await _read_form(request)
        if form_error is not None:
            return _json(
                400, {"error": form_error.code, "error_description": form_error.description}
            )
        token = form.get("token")
        if not token:
            return _json(
                400, {"error": "invalid_request", "error_description": "token is required"}
            )
        return _json(200, self.introspect(token))

    async def _metadata(self, request: web.Request) -> web.Response:
        base = f"{request.scheme}://{request.host}"
        return _json(
            200,
            {
                "issuer": base,
                "token_endpoint": base + self.TOKEN_PATH,
                "introspection_endpoint": base + self.INTROSPECT_PATH,
                "grant_types_supported": ["client_credentials"],
                "token_endpoint_auth_methods_supported": ["private_key_jwt"],
                "token_endpoint_auth_signing_alg_values_supported": list(self.allowed_algorithms),
            },
            no_store=False,
        )

    # -- the checks ----------------------------------------------------------------------------

    def _authenticate(
        self,
        request: web.Request,
        form: Mapping[str, str],
        header: Mapping[str, Any] | None,
        claims: Mapping[str, Any] | None,
    ) -> tuple[RegisteredClient, frozenset[str]]:
        """Return the authenticated client and the scopes to grant, or raise ``OAuthError``."""
        grant_type = form.get("grant_type")
        if not grant_type:
            raise _invalid_request("grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError(400, "unsupported_grant_type", "only client_credentials is supported")
        if "client_secret" in form or "Authorization" in request.headers:
            raise _invalid_request("only private_key_jwt client authentication is accepted")
        if form.get("client_assertion_type") != JWT_BEARER:
            raise _invalid_request("client_assertion_type must be jwt-bearer")
        assertion = form.get("client_assertion")
        if not assertion:
            raise _invalid_request("client_assertion is required")

        if header is None or claims is None:
            raise _invalid_client("client_assertion is not a readable JWT")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.allowed_algorithms:
            raise _invalid_client("the assertion's signature algorithm is not accepted")
        issuer = claims.get("iss")
        client = self.clients.get(issuer) if isinstance(issuer, str) else None
        if client is None:
            raise _invalid_client("unknown client")
        if "client_id" in form and form["client_id"] != client.client_id:
            raise _invalid_client("client_id does not match the assertion issuer")

        verified = self._verify(assertion, alg, header, client, request)
        # The client is authenticated: its assertion is used up, whatever the scopes say.
        self._seen_jti[(client.client_id, verified["jti"])] = float(verified["exp"])
        return client, self._grant(client, form.get("scope"))

    def _verify(
        self,
        assertion: str,
        alg: str,
        header: Mapping[str, Any],
        client: RegisteredClient,
        request: web.Request,
    ) -> dict[str, Any]:
        """Verify the assertion's signature and claims for ``client``; return the claims."""
        key = client.certificate.public_key()
        if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise _invalid_client("the registered key cannot verify assertions")
        if not _key_fits(alg, key):
            raise _invalid_client("the signature algorithm does not match the registered key")
        audience = self.audience or f"{request.scheme}://{request.host}{self.TOKEN_PATH}"
        try:
            # Time claims are checked below on the injected clock, not PyJWT's time.time().
            claims: dict[str, Any] = jwt.decode(
                assertion,
                key,
                algorithms=[alg],
                audience=audience,
                options={
                    "require": list(REQUIRED_CLAIMS),
                    "verify_exp": False,
                    "verify_iat": False,
                    "verify_nbf": False,
                },
            )
        except jwt.InvalidSignatureError:
            raise _invalid_client("the assertion signature does not verify") from None
        except jwt.MissingRequiredClaimError:
            raise _invalid_client("the assertion lacks a required claim") from None
        except jwt.InvalidAudienceError:
            raise _invalid_client("the assertion audience is not this token endpoint") from None
        except (jwt.PyJWTError, ValueError, TypeError):
            raise _invalid_client("the assertion could not be verified") from None

        if not (claims["iss"] == claims["sub"] == client.client_id):
            raise _invalid_client("iss and sub must both be the client id")
        exp, iat, nbf = claims["exp"], claims["iat"], claims.get("nbf", 0)
        if not all(_is_number(value) for value in (exp, iat, nbf)):
            raise _invalid_client("exp, iat and nbf must be numbers")
        now = self.clock()
        if exp <= now - self.leeway_s:
            raise _invalid_client("the assertion has expired")
        if iat > now + self.leeway_s or nbf > now + self.leeway_s:
            raise _invalid_client("the assertion is not valid yet")
        if exp <= iat:
            raise _invalid_client("the assertion expires before it was issued")
        if exp - iat > self.max_assertion_lifetime_s:
            raise _invalid_client("the assertion lifetime is too long")
        if client.expected_kid is not None:
            kid = header.get("kid")
            if not isinstance(kid, str) or not hmac.compare_digest(
                kid.encode(), client.expected_kid.encode()
            ):
                raise _invalid_client("the assertion kid does not name the registered key")
        jti = claims["jti"]
        if not isinstance(jti, str) or not jti:
            raise _invalid_client("jti must be a non-empty string")
        self._forget_expired_jti(now)
        if (client.client_id, jti) in self._seen_jti:
            raise _invalid_client("the assertion was already used")
        return claims

    def _grant(self, client: RegisteredClient, scope: str | None) -> frozenset[str]:
        """Return the scopes to grant for the request's ``scope`` parameter."""
        if not scope:
            return client.default_scopes
        requested = scope.split(" ")
        if not all(_SCOPE_TOKEN.fullmatch(token) for token in requested):
            raise OAuthError(400, "invalid_scope", "scope is malformed")
        if not set(requested) <= client.scopes:
            raise OAuthError(400, "invalid_scope", "a requested scope is not granted to the client")
        return frozenset(requested)

    def _forget_expired_jti(self, now: float) -> None:
        horizon = now - self.leeway_s
        for key in [key for key, exp in self._seen_jti.items() if exp <= horizon]:
            del self._seen_jti[key]


# -- request and answer helpers ----------------------------------------------------------------


async def _read_form(request: web.Request) -> tuple[dict[str, str], OAuthError | None]:
    """Read a UTF-8 urlencoded form; return it (empty if unreadable) and any request error."""
    body = await request.read()
    if request.content_type != FORM:
        return {}, _invalid_request("Content-Type must be application/x-www-form-urlencoded")
    charset = request.charset
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        return {}, _invalid_request("the form must be UTF-8")
    try:
        pairs = parse_qsl(
            body.decode("utf-8"),
            keep_blank_values=True,
            strict_parsing=False,
            encoding="utf-8",
            errors="strict",
            max_num_fields=_MAX_FORM_FIELDS,
        )
    except (UnicodeDecodeError, ValueError):
        return {}, _invalid_request("the form is not valid UTF-8 urlencoded data")
    form = dict(pairs)
    if len(form) != len(pairs):
        # RFC 6749 section 3.2: parameters must not be included more than once.
        return form, _invalid_request("a parameter is repeated")
    return form, None


def _peek(assertion: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Return the JWT header and claims without verifying anything, or None if unreadable."""
    if not assertion:
        return None, None
    try:
        header = jwt.get_unverified_header(assertion)
        claims = jwt.decode(assertion, options={"verify_signature": False})
    except (jwt.PyJWTError, ValueError, TypeError):
        return None, None
    return dict(header), dict(claims)


def _key_fits(alg: str, key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> bool:
    if alg in _RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    curve = _EC_CURVES.get(alg)
    return (
        curve is not None
        and isinstance(key, ec.EllipticCurvePublicKey)
        and isinstance(key.curve, curve)
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _json(
    status: int,
    body: Mapping[str, object],
    *,
    no_store: bool = True,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    all_headers = {"Content-Type": "application/json", **(_NO_STORE if no_store else {})}
    all_headers.update(headers or {})
    return web.Response(status=status, body=json.dumps(body).encode(), headers=all_headers)


def _faulty_answer(fault: Fault, request: web.Request) -> web.Response:
    """Return the answer a fault asks for (``delay`` is handled by the caller)."""
    retry = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
    if fault.kind == "status":
        return _json(fault.status, {"error": "temporarily_unavailable"}, headers=retry)
    if fault.kind == "response":
        return _json(fault.status, fault.body or {}, headers=retry)
    if fault.kind == "html":
        return web.Response(
            body=b"<!DOCTYPE html><html><body><h1>Service under maintenance</h1></body></html>",
            headers={"Content-Type": "text/html; charset=utf-8"},
        )
    if fault.kind == "garbage":
        return web.Response(
            body=b'{"access_token": "trunc', headers={"Content-Type": "application/json"}
        )
    if fault.kind == "redirect":
        return web.Response(status=302, headers={"Location": fault.location or "/"})
    # "drop": close without answering. aiohttp then finds the transport closing, writes
    # nothing and treats this response as a client gone away (quietly, at debug level).
    if request.transport is not None:
        request.transport.close()
    return web.Response(status=204)
