"""The client assertion and the token request form: exact shape, unique jti, accepted."""

from __future__ import annotations

import base64
import json
import ssl
from pathlib import Path

import aiohttp
import jwt
import pytest

from proxy.assertion import (
    JWT_BEARER,
    AssertionSettings,
    build_claims,
    key_id_for,
    sign_assertion,
    token_request_form,
)
from proxy.credentials import Credentials
from proxy.sandbox.authserver import RegisteredClient
from proxy.sandbox.pki import CertificateAuthority, Issued
from tests.support.fakes import AuthServerHandle
from tests.support.partner import CLIENT_ID


def credentials_of(issued: Issued) -> Credentials:
    return Credentials(
        private_key=issued.private_key,
        certificate=issued.certificate,
        chain=(),
        source=Path("memory"),
    )


def segments(assertion: str) -> tuple[dict[str, object], dict[str, object]]:
    head, body, _sig = assertion.split(".")

    def decode(part: str) -> dict[str, object]:
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))

    return decode(head), decode(body)


def test_claims_are_exact() -> None:
    claims = build_claims(
        client_id="c:1", audience="https://as/token", lifetime_s=300, now=1000.9, jti="j"
    )
    assert claims == {
        "iss": "c:1",
        "sub": "c:1",
        "aud": "https://as/token",
        "jti": "j",
        "iat": 1000,
        "exp": 1300,
    }


@pytest.mark.parametrize("mode", ["none", "x5t#S256", "x5t", "my-key-1"])
def test_header_and_claims_of_a_signed_assertion(partner: Issued, mode: str) -> None:
    creds = credentials_of(partner)
    settings = AssertionSettings(
        client_id=CLIENT_ID, audience="https://as/t", algorithm="RS256", key_id=mode, lifetime_s=60
    )
    assertion = sign_assertion(settings, creds, now=2_000_000_000.0, jti="fixed-jti")
    header, claims = segments(assertion)
    expected_header: dict[str, object] = {"alg": "RS256", "typ": "JWT"}
    kid = key_id_for(mode, creds)
    if kid is not None:
        expected_header["kid"] = kid
    assert header == expected_header
    assert claims == {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": "https://as/t",
        "jti": "fixed-jti",
        "iat": 2_000_000_000,
        "exp": 2_000_000_060,
    }
    assert key_id_for("x5t#S256", creds) == creds.x5t_s256
    assert key_id_for("x5t", creds) == creds.x5t
    verified = jwt.decode(
        assertion,
        partner.certificate.public_key(),  # type: ignore[arg-type]
        algorithms=["RS256"],
        audience="https://as/t",
        options={"verify_exp": False, "verify_iat": False},
    )
    assert verified["iss"] == CLIENT_ID


def test_jti_is_unique_over_a_thousand_assertions(partner: Issued) -> None:
    creds = credentials_of(partner)
    settings = AssertionSettings(client_id=CLIENT_ID, audience="a", algorithm="RS256")
    jtis = {segments(sign_assertion(settings, creds))[1]["jti"] for _ in range(1000)}
    assert len(jtis) == 1000


def test_form_sends_scope_only_when_asked() -> None:
    assert token_request_form("A", frozenset()) == {
        "grant_type": "client_credentials",
        "client_assertion_type": JWT_BEARER,
        "client_assertion": "A",
    }
    form = token_request_form("A", frozenset({"b", "a"}), client_id="cid")
    assert form["scope"] == "a b"
    assert form["client_id"] == "cid"
    assert "client_secret" not in form


@pytest.mark.parametrize(
    ("key_type", "algorithm", "mode"),
    [("rsa", "RS256", "none"), ("rsa", "PS256", "x5t#S256"), ("ec", "ES256", "x5t")],
)
async def test_the_fake_authorization_server_accepts_it(
    authserver: AuthServerHandle,
    client_ssl: ssl.SSLContext,
    key_type: str,
    algorithm: str,
    mode: str,
) -> None:
    issued = CertificateAuthority("Other CA").issue_client(
        "alg test",
        key_type="ec" if key_type == "ec" else "rsa",
    )
    creds = credentials_of(issued)
    client_id = f"alg:test:{algorithm}"
    authserver.server.register(
        RegisteredClient(
            client_id=client_id,
            certificate=issued.certificate,
            scopes=frozenset({"scope:demo:consult"}),
            default_scopes=frozenset({"scope:demo:consult"}),
            expected_kid=key_id_for(mode, creds),
        )
    )
    settings = AssertionSettings(
        client_id=client_id, audience=authserver.token_url, algorithm=algorithm, key_id=mode
    )
    form = token_request_form(sign_assertion(settings, creds), frozenset())
    async with (
        aiohttp.ClientSession() as session,
        session.post(authserver.token_url, data=form, ssl=client_ssl) as response,
    ):
        body = await response.json()
    assert response.status == 200, body
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "scope:demo:consult"
