"""The fake authorization server, driven over real TLS with assertions signed here by PyJWT.

The proxy's own assertion code is deliberately not used: these tests pin down what the fake
accepts and refuses, so the token provider's tests can trust it.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from proxy.sandbox.authserver import (
    JWT_BEARER,
    FakeAuthServer,
    Fault,
    IssuedToken,
    RegisteredClient,
)
from proxy.sandbox.pki import CertificateAuthority, Issued, PrivateKey
from proxy.sandbox.serve import serve
from tests.support.fakes import AuthServerHandle
from tests.support.partner import CLIENT_ID, DEFAULT_SCOPES, SCOPES, partner_client

DEMO = "scope:demo:consult"
CBSS = "scope:cbss:api:demo:consult"


# -- helpers -------------------------------------------------------------------------------------


class FakeClock:
    """A wall clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def claims_for(
    audience: str,
    *,
    now: float | None = None,
    drop: Iterable[str] = (),
    **overrides: object,
) -> dict[str, object]:
    """Return valid assertion claims for CLIENT_ID, changed by ``overrides`` and ``drop``."""
    iat = int(time.time() if now is None else now)
    claims: dict[str, object] = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": audience,
        "jti": str(uuid.uuid4()),
        "iat": iat,
        "exp": iat + 300,
    }
    claims.update(overrides)
    for name in drop:
        del claims[name]
    return claims


def sign(
    key: PrivateKey | bytes, claims: Mapping[str, object], *, alg: str = "RS256", **header: str
) -> str:
    return jwt.encode(dict(claims), key, algorithm=alg, headers=header or None)


def unsigned(claims: Mapping[str, object]) -> str:
    """Return an ``alg: none`` JWT, built by hand as an attacker would."""

    def part(data: Mapping[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."


def form_for(assertion: str, **extra: str) -> dict[str, str]:
    return {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": assertion,
        **extra,
    }


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def post(
    session: aiohttp.ClientSession,
    url: str,
    data: Mapping[str, str] | str | bytes,
    **kwargs: Any,
) -> Answer:
    async with session.post(url, data=data, allow_redirects=False, **kwargs) as response:
        return Answer(response.status, response.headers, await response.read())


def assert_oauth_error(answer: Answer, status: int, code: str) -> None:
    assert answer.status == status, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Cache-Control"] == "no-store"
    body = answer.json()
    assert set(body) == {"error", "error_description"}
    assert body["error"] == code
    assert isinstance(body["error_description"], str) and body["error_description"]


@pytest.fixture
async def session(client_ssl: Any) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl)) as session:
        yield session


@pytest.fixture(scope="module")
def stranger() -> Issued:
    return CertificateAuthority("Stranger CA").issue_client("stranger")


@pytest.fixture(scope="module")
def ec_partner() -> Issued:
    return CertificateAuthority("EC Partner CA").issue_client("ec partner", key_type="ec")


@dataclass(slots=True)
class Clocked:
    handle: AuthServerHandle
    clock: FakeClock


@pytest.fixture
async def clocked(partner: Issued, server_ssl: Any) -> AsyncIterator[Clocked]:
    clock = FakeClock()
    server = FakeAuthServer(clients=[partner_client(partner)], expires_in=100, clock=clock)
    served = await serve(server.make_app(), ssl_context=server_ssl)
    handle = AuthServerHandle(
        server=server,
        url=served.url,
        token_url=served.url + FakeAuthServer.TOKEN_PATH,
        metadata_url=served.url + FakeAuthServer.METADATA_PATH,
    )
    try:
        yield Clocked(handle=handle, clock=clock)
    finally:
        await served.close()


# -- success -------------------------------------------------------------------------------------


async def test_issues_a_bearer_token_for_the_requested_scopes(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    assertion = sign(partner.private_key, claims_for(authserver.token_url))
    answer = await post(session, authserver.token_url, form_for(assertion, scope=f"{DEMO} {CBSS}"))
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Cache-Control"] == "no-store"
    assert answer.headers["Pragma"] == "no-cache"
    body = answer.json()
    assert set(body) == {"access_token", "token_type", "expires_in", "scope"}
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] == 3600
    assert body["scope"] == f"{CBSS} {DEMO}"  # sorted
    issued = authserver.server.issued[body["access_token"]]
    assert issued.client_id == CLIENT_ID
    assert issued.scopes == SCOPES
    assert issued.expires_at == pytest.approx(time.time() + 3600, abs=30)
    [record] = authserver.server.requests
    assert record.outcome == "issued"
    assert record.form["client_assertion"] == assertion
    assert record.assertion_header == {"alg": "RS256", "typ": "JWT"}
    assert record.claims is not None and record.claims["iss"] == CLIENT_ID
    assert record.headers["Content-Type"] == "application/x-www-form-urlencoded"


@pytest.mark.parametrize("scope", [None, ""], ids=["absent", "empty"])
async def test_default_scopes_when_none_are_asked(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    scope: str | None,
) -> None:
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    if scope is not None:
        form["scope"] = scope
    answer = await post(session, authserver.token_url, form)
    assert answer.status == 200
    assert answer.json()["scope"] == DEMO
    assert authserver.server.issued[answer.json()["access_token"]].scopes == DEFAULT_SCOPES


async def test_expires_in_follows_the_attribute(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.expires_in = 120
    assertion = sign(partner.private_key, claims_for(authserver.token_url))
    body = (await post(session, authserver.token_url, form_for(assertion))).json()
    assert body["expires_in"] == 120
    assert authserver.server.introspect(body["access_token"])["exp"] == pytest.approx(
        time.time() + 120, abs=30
    )


async def test_ec_client_with_es256(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, ec_partner: Issued
) -> None:
    authserver.server.register(
        RegisteredClient(
            client_id="ec:client",
            certificate=ec_partner.certificate,
            scopes=frozenset({DEMO}),
            default_scopes=frozenset({DEMO}),
        )
    )
    claims = claims_for(authserver.token_url, iss="ec:client", sub="ec:client")
    answer = await post(
        session, authserver.token_url, form_for(sign(ec_partner.private_key, claims, alg="ES256"))
    )
    assert answer.status == 200, answer.body
    assert authserver.server.requests[0].assertion_header == {"alg": "ES256", "typ": "JWT"}


async def test_client_id_in_the_form_must_be_the_issuer(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    key, url = partner.private_key, authserver.token_url
    same = await post(session, url, form_for(sign(key, claims_for(url)), client_id=CLIENT_ID))
    assert same.status == 200
    other = await post(session, url, form_for(sign(key, claims_for(url)), client_id="other"))
    assert_oauth_error(other, 401, "invalid_client")


async def test_audience_override(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.audience = "https://oauth-v5.acc.socialsecurity.be"
    key, url = partner.private_key, authserver.token_url
    issuer_aud = claims_for("https://oauth-v5.acc.socialsecurity.be")
    assert (await post(session, url, form_for(sign(key, issuer_aud)))).status == 200
    token_url_aud = await post(session, url, form_for(sign(key, claims_for(url))))
    assert_oauth_error(token_url_aud, 401, "invalid_client")


# -- client authentication refused ---------------------------------------------------------------


def _bad_assertion(case: str, url: str, partner: Issued, stranger: Issued) -> str:
    now = int(time.time())
    key = partner.private_key
    match case:
        case "unknown-client":
            return sign(key, claims_for(url, iss="nobody", sub="nobody"))
        case "wrong-key":
            return sign(stranger.private_key, claims_for(url))
        case "wrong-aud":
            return sign(key, claims_for("https://elsewhere.example/REST/oauth/v5/token"))
        case "aud-is-the-host-only":
            return sign(key, claims_for(url.removesuffix(FakeAuthServer.TOKEN_PATH)))
        case "iss-not-sub":
            return sign(key, claims_for(url, sub="someone:else"))
        case "expired":
            return sign(key, claims_for(url, iat=now - 600, exp=now - 300))
        case "iat-in-the-future":
            return sign(key, claims_for(url, iat=now + 120, exp=now + 400))
        case "lifetime-too-long":
            return sign(key, claims_for(url, exp=now + 7200))
        case "exp-before-iat":
            return sign(key, claims_for(url, iat=now, exp=now - 1))
        case "exp-not-a-number":
            return sign(key, claims_for(url, exp="soon"))
        case "nbf-in-the-future":
            return sign(key, claims_for(url, nbf=now + 120))
        case "no-jti":
            return sign(key, claims_for(url, drop=["jti"]))
        case "no-exp":
            return sign(key, claims_for(url, drop=["exp"]))
        case "no-sub":
            return sign(key, claims_for(url, drop=["sub"]))
        case "no-aud":
            return sign(key, claims_for(url, drop=["aud"]))
        case "empty-jti":
            return sign(key, claims_for(url, jti=""))
        case "alg-none":
            return unsigned(claims_for(url))
        case "hs256":
            return sign(b"a shared secret of 32 bytes ....", claims_for(url), alg="HS256")
        case "rs384-not-allowed":
            return sign(key, claims_for(url), alg="RS384")
        case "tampered-claims":
            head, _body, signature = sign(key, claims_for(url)).split(".")
            other = sign(stranger.private_key, claims_for(url, jti="forged")).split(".")[1]
            return f"{head}.{other}.{signature}"
        case "not-a-jwt":
            return "not-a-jwt"
    raise AssertionError(case)


# case -> a word of the fixed error_description, so each case fails for its own reason.
BAD_ASSERTIONS = {
    "unknown-client": "unknown client",
    "wrong-key": "signature",
    "wrong-aud": "audience",
    "aud-is-the-host-only": "audience",
    "iss-not-sub": "iss and sub",
    "expired": "expired",
    "iat-in-the-future": "not valid yet",
    "lifetime-too-long": "too long",
    "exp-before-iat": "expires before",
    "exp-not-a-number": "numbers",
    "nbf-in-the-future": "not valid yet",
    "no-jti": "required claim",
    "no-exp": "required claim",
    "no-sub": "required claim",
    "no-aud": "required claim",
    "empty-jti": "jti",
    "alg-none": "algorithm",
    "hs256": "algorithm",
    "rs384-not-allowed": "algorithm",
    "tampered-claims": "signature",
    "not-a-jwt": "readable",
}


@pytest.mark.parametrize(("case", "why"), BAD_ASSERTIONS.items(), ids=list(BAD_ASSERTIONS))
async def test_bad_assertions_are_invalid_client(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    stranger: Issued,
    case: str,
    why: str,
) -> None:
    assertion = _bad_assertion(case, authserver.token_url, partner, stranger)
    answer = await post(session, authserver.token_url, form_for(assertion))
    assert_oauth_error(answer, 401, "invalid_client")
    assert why in answer.json()["error_description"]
    assert assertion not in answer.body.decode()
    assert authserver.server.issued == {}
    assert [r.outcome for r in authserver.server.requests] == ["invalid_client"]


async def test_a_jti_is_accepted_once(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    url = authserver.token_url
    assertion = sign(partner.private_key, claims_for(url))
    assert (await post(session, url, form_for(assertion))).status == 200
    assert_oauth_error(await post(session, url, form_for(assertion)), 401, "invalid_client")
    # Same jti, freshly signed: still a replay.
    claims = authserver.server.requests[0].claims
    assert claims is not None
    jti = claims["jti"]
    again = sign(partner.private_key, claims_for(url, jti=jti))
    assert_oauth_error(await post(session, url, form_for(again)), 401, "invalid_client")
    fresh = sign(partner.private_key, claims_for(url))
    assert (await post(session, url, form_for(fresh))).status == 200


async def test_kid_must_match_when_the_client_expects_one(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.register(
        RegisteredClient(
            client_id="kid:client",
            certificate=partner.certificate,
            scopes=frozenset({DEMO}),
            default_scopes=frozenset({DEMO}),
            expected_kid="key-1",
        )
    )
    url = authserver.token_url

    def assertion(**header: str) -> dict[str, str]:
        claims = claims_for(url, iss="kid:client", sub="kid:client")
        return form_for(sign(partner.private_key, claims, **header))

    assert_oauth_error(await post(session, url, assertion()), 401, "invalid_client")
    assert_oauth_error(await post(session, url, assertion(kid="key-2")), 401, "invalid_client")
    assert (await post(session, url, assertion(kid="key-1"))).status == 200
    # A client registered without a kid accepts any (the official samples send none).
    claims = claims_for(url)
    other_kid = form_for(sign(partner.private_key, claims, kid="whatever"))
    assert (await post(session, url, other_kid)).status == 200


async def test_algorithm_must_fit_the_registered_key(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    ec_partner: Issued,
) -> None:
    # An RSA signature claiming to come from an EC client: the key type decides, not the header.
    authserver.server.register(
        RegisteredClient(
            client_id="ec:client",
            certificate=ec_partner.certificate,
            scopes=frozenset({DEMO}),
            default_scopes=frozenset({DEMO}),
        )
    )
    claims = claims_for(authserver.token_url, iss="ec:client", sub="ec:client")
    answer = await post(session, authserver.token_url, form_for(sign(partner.private_key, claims)))
    assert_oauth_error(answer, 401, "invalid_client")


async def test_allowed_algorithms_are_enforced(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.allowed_algorithms = ("PS256",)
    url, key = authserver.token_url, partner.private_key
    rs256 = await post(session, url, form_for(sign(key, claims_for(url))))
    assert_oauth_error(rs256, 401, "invalid_client")
    ps256 = await post(session, url, form_for(sign(key, claims_for(url), alg="PS256")))
    assert ps256.status == 200


@pytest.mark.parametrize("algorithms", [("HS256",), ("RS256", "none"), ()])
def test_symmetric_or_no_algorithms_cannot_be_allowed(algorithms: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        FakeAuthServer(allowed_algorithms=algorithms)


# -- malformed requests --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"grant_type": None}, 400, "invalid_request"),
        ({"grant_type": ""}, 400, "invalid_request"),
        ({"grant_type": "authorization_code"}, 400, "unsupported_grant_type"),
        ({"grant_type": "password"}, 400, "unsupported_grant_type"),
        ({"client_assertion_type": None}, 400, "invalid_request"),
        ({"client_assertion_type": "urn:ietf:params:oauth:grant-type:jwt-bearer"}, 400,
         "invalid_request"),
        ({"client_assertion": None}, 400, "invalid_request"),
        ({"client_assertion": ""}, 400, "invalid_request"),
        ({"client_secret": "s3cret"}, 400, "invalid_request"),
        ({"scope": "scope:not:granted"}, 400, "invalid_scope"),
        ({"scope": f"{DEMO} scope:not:granted"}, 400, "invalid_scope"),
        ({"scope": f"{DEMO}  {CBSS}"}, 400, "invalid_scope"),
        ({"scope": f"{DEMO}\t{CBSS}"}, 400, "invalid_scope"),
    ],
)  # fmt: skip
async def test_request_errors(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    change: dict[str, str | None],
    status: int,
    code: str,
) -> None:
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    for name, value in change.items():
        if value is None:
            del form[name]
        else:
            form[name] = value
    answer = await post(session, authserver.token_url, form)
    assert_oauth_error(answer, status, code)
    assert authserver.server.requests[0].outcome == code
    assert authserver.server.issued == {}


async def test_http_basic_client_authentication_is_refused(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    basic = base64.b64encode(b"partner%3Atest%3Aclient%3Aconfidential:secret").decode()
    answer = await post(
        session, authserver.token_url, form, headers={"Authorization": f"Basic {basic}"}
    )
    assert_oauth_error(answer, 400, "invalid_request")


@pytest.mark.parametrize(
    ("content_type", "encode"),
    [
        ("application/json", json.dumps),
        ("text/plain", lambda form: "&".join(f"{k}={v}" for k, v in form.items())),
        ("application/x-www-form-urlencoded; charset=iso-8859-1", None),
    ],
)
async def test_content_type_must_be_a_utf8_form(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    content_type: str,
    encode: Any,
) -> None:
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    body = encode(form) if encode else "&".join(f"{k}={v}" for k, v in form.items())
    answer = await post(session, authserver.token_url, body, headers={"Content-Type": content_type})
    assert_oauth_error(answer, 400, "invalid_request")


async def test_a_repeated_parameter_is_refused(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    body = "&".join(f"{k}={v}" for k, v in form.items()) + "&grant_type=client_credentials"
    answer = await post(
        session,
        authserver.token_url,
        body,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_oauth_error(answer, 400, "invalid_request")


async def test_invalid_utf8_form_is_refused(
    authserver: AuthServerHandle, session: aiohttp.ClientSession
) -> None:
    answer = await post(
        session,
        authserver.token_url,
        b"grant_type=client_credentials&scope=%ff%fe",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_oauth_error(answer, 400, "invalid_request")


async def test_only_post_reaches_the_token_endpoint(
    authserver: AuthServerHandle, session: aiohttp.ClientSession
) -> None:
    async with session.get(authserver.token_url) as response:
        assert response.status == 405
    assert authserver.server.token_requests == 0


# -- faults --------------------------------------------------------------------------------------


async def test_delay_fault_then_a_normal_answer(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.inject(Fault(kind="delay", delay_s=0.2))
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    started = time.monotonic()
    answer = await post(session, authserver.token_url, form)
    assert time.monotonic() - started >= 0.15  # loosely: it did wait
    assert answer.status == 200
    assert authserver.server.requests[0].outcome == "issued"


@pytest.mark.parametrize("retry_after", [None, 7])
async def test_status_fault(
    authserver: AuthServerHandle,
    session: aiohttp.ClientSession,
    partner: Issued,
    retry_after: int | None,
) -> None:
    authserver.server.inject(Fault(kind="status", status=503, retry_after=retry_after))
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    answer = await post(session, authserver.token_url, form)
    assert answer.status == 503
    assert answer.json() == {"error": "temporarily_unavailable"}
    assert answer.headers.get("Retry-After") == (None if retry_after is None else "7")
    assert authserver.server.requests[0].outcome == "fault:status"
    # The fault came before any validation, so the assertion was not used up.
    assert (await post(session, authserver.token_url, form)).status == 200


async def test_html_fault(authserver: AuthServerHandle, session: aiohttp.ClientSession) -> None:
    authserver.server.inject(Fault(kind="html"))
    answer = await post(session, authserver.token_url, {"anything": "x"})
    assert answer.status == 200
    assert answer.headers["Content-Type"].startswith("text/html")
    assert answer.body.startswith(b"<!DOCTYPE html>")


async def test_garbage_fault(authserver: AuthServerHandle, session: aiohttp.ClientSession) -> None:
    authserver.server.inject(Fault(kind="garbage"))
    answer = await post(session, authserver.token_url, {"anything": "x"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    with pytest.raises(ValueError):
        answer.json()


async def test_drop_fault_is_a_disconnect(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    authserver.server.inject(Fault(kind="drop"))
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(session, authserver.token_url, form)
    assert authserver.server.requests[0].outcome == "fault:drop"
    # The recorded form is complete: the body was read before the connection went.
    assert authserver.server.requests[0].form == form
    assert (await post(session, authserver.token_url, form)).status == 200


async def test_redirect_fault(authserver: AuthServerHandle, session: aiohttp.ClientSession) -> None:
    authserver.server.inject(Fault(kind="redirect", location="https://127.0.0.1:9/elsewhere"))
    answer = await post(session, authserver.token_url, {"anything": "x"})
    assert answer.status == 302
    assert answer.headers["Location"] == "https://127.0.0.1:9/elsewhere"


async def test_response_fault(authserver: AuthServerHandle, session: aiohttp.ClientSession) -> None:
    body = {"access_token": "x\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": -5}
    authserver.server.inject(Fault(kind="response", status=200, body=body, retry_after=3))
    answer = await post(session, authserver.token_url, {"anything": "x"})
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.headers["Retry-After"] == "3"
    assert answer.json() == body
    assert "X-Evil" not in answer.headers


async def test_faults_are_consumed_in_order(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    server = authserver.server
    server.inject(Fault(kind="status", status=500), times=2)
    server.inject(Fault(kind="response", status=429, body={"error": "slow_down"}))
    statuses = []
    for _ in range(4):
        form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
        statuses.append((await post(session, authserver.token_url, form)).status)
    assert statuses == [500, 500, 429, 200]
    assert [r.outcome for r in server.requests] == [
        "fault:status",
        "fault:status",
        "fault:response",
        "issued",
    ]
    server.inject(Fault(kind="html"), times=3)
    server.clear_faults()
    form = form_for(sign(partner.private_key, claims_for(authserver.token_url)))
    assert (await post(session, authserver.token_url, form)).status == 200


@pytest.mark.parametrize(
    "make",
    [
        lambda: Fault(kind="redirect"),
        lambda: Fault(kind="response"),
        lambda: Fault(kind="delay", delay_s=-1),
        lambda: Fault(kind="status", status=42),
        lambda: Fault(kind="explode"),  # type: ignore[arg-type]
    ],
    ids=["redirect-without-location", "response-without-body", "negative-delay", "status",
         "kind"],
)  # fmt: skip
def test_incomplete_faults_are_refused(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


def test_inject_needs_a_positive_count() -> None:
    with pytest.raises(ValueError):
        FakeAuthServer().inject(Fault(kind="html"), times=0)


# -- counters and records ------------------------------------------------------------------------


async def test_counters_and_records(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    server, url = authserver.server, authserver.token_url
    server.inject(Fault(kind="status"))
    for _ in range(2):
        await post(session, url, form_for(sign(partner.private_key, claims_for(url))))
    await post(session, url, form_for("not-a-jwt"))
    assert server.token_requests == 3
    assert [r.outcome for r in server.requests] == ["fault:status", "issued", "invalid_client"]
    assert server.requests[2].assertion_header is None and server.requests[2].claims is None
    token = next(iter(server.issued))
    # Secrets stay out of reprs, as everywhere else.
    for record in server.requests:
        assert record.form["client_assertion"] not in repr(record)
    assert token not in repr(server.issued[token])
    server.reset_counters()
    assert server.token_requests == 0 and server.requests == []
    assert token in server.issued


# -- introspection -------------------------------------------------------------------------------


async def _token(handle: AuthServerHandle, session: aiohttp.ClientSession, key: PrivateKey,
                 now: float | None = None) -> str:  # fmt: skip
    form = form_for(sign(key, claims_for(handle.token_url, now=now)), scope=CBSS)
    answer = await post(session, handle.token_url, form)
    assert answer.status == 200, answer.body
    return str(answer.json()["access_token"])


async def _introspect(handle: AuthServerHandle, session: aiohttp.ClientSession, token: str) -> Any:
    answer = await post(session, handle.url + FakeAuthServer.INTROSPECT_PATH, {"token": token})
    assert answer.status == 200
    assert answer.headers["Cache-Control"] == "no-store"
    return answer.json()


async def test_introspection_active_unknown_and_revoked(
    authserver: AuthServerHandle, session: aiohttp.ClientSession, partner: Issued
) -> None:
    token = await _token(authserver, session, partner.private_key)
    info = await _introspect(authserver, session, token)
    assert set(info) == {"active", "client_id", "scope", "exp", "token_type"}
    assert info["active"] is True
    assert info["client_id"] == CLIENT_ID
    assert info["scope"] == CBSS
    assert info["token_type"] == "Bearer"
    assert info["exp"] == int(authserver.server.issued[token].expires_at)
    assert await _introspect(authserver, session, "never-issued") == {"active": False}
    authserver.server.revoke(token)
    assert await _introspect(authserver, session, token) == {"active": False}
    authserver.server.revoke("never-issued")  # ignored
    missing = await post(session, authserver.url + FakeAuthServer.INTROSPECT_PATH, {})
    assert_oauth_error(missing, 400, "invalid_request")


async def test_tokens_expire_on_the_injected_clock(
    clocked: Clocked, session: aiohttp.ClientSession, partner: Issued
) -> None:
    handle, clock = clocked.handle, clocked.clock
    token = await _token(handle, session, partner.private_key, now=clock())
    assert isinstance(handle.server.issued[token], IssuedToken)
    clock.advance(99)
    assert (await _introspect(handle, session, token))["active"] is True
    clock.advance(1)
    assert await _introspect(handle, session, token) == {"active": False}


async def test_expire_all(
    clocked: Clocked, session: aiohttp.ClientSession, partner: Issued
) -> None:
    handle = clocked.handle
    tokens = [
        await _token(handle, session, partner.private_key, now=clocked.clock()) for _ in range(2)
    ]
    handle.server.expire_all()
    for token in tokens:
        assert handle.server.introspect(token) == {"active": False}


async def test_assertion_times_are_checked_on_the_injected_clock(
    clocked: Clocked, session: aiohttp.ClientSession, partner: Issued
) -> None:
    handle, clock = clocked.handle, clocked.clock
    # Valid by the real clock, but the server's clock has moved past its exp (+ leeway).
    assertion = sign(partner.private_key, claims_for(handle.token_url, now=clock()))
    clock.advance(331)
    answer = await post(session, handle.token_url, form_for(assertion))
    assert_oauth_error(answer, 401, "invalid_client")
    # ... and one issued "in the server's future" is fine once its clock gets there.
    later = sign(partner.private_key, claims_for(handle.token_url, now=clock()))
    assert (await post(session, handle.token_url, form_for(later))).status == 200


# -- metadata ------------------------------------------------------------------------------------


async def test_metadata(authserver: AuthServerHandle, session: aiohttp.ClientSession) -> None:
    async with session.get(authserver.metadata_url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        meta = await response.json()
    assert meta == {
        "issuer": authserver.url,
        "token_endpoint": authserver.token_url,
        "introspection_endpoint": authserver.url + FakeAuthServer.INTROSPECT_PATH,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": ["RS256", "PS256", "ES256"],
    }


# -- serve ---------------------------------------------------------------------------------------


async def test_serve_without_tls_is_http(session: aiohttp.ClientSession) -> None:
    served = await serve(FakeAuthServer().make_app())
    try:
        assert served.url == f"http://127.0.0.1:{served.port}"
        assert served.port > 0
        async with session.get(served.url + FakeAuthServer.METADATA_PATH) as response:
            meta = await response.json()
        assert meta["token_endpoint"] == served.url + FakeAuthServer.TOKEN_PATH
    finally:
        await served.close()


async def test_serve_brackets_ipv6(server_ssl: Any) -> None:
    try:
        served = await serve(web.Application(), host="::1", ssl_context=server_ssl)
    except OSError:
        pytest.skip("no IPv6 loopback here")
    try:
        assert served.url == f"https://[::1]:{served.port}"
    finally:
        await served.close()
