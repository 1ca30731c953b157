"""The fakes with several clients: two certificates (RSA and EC P-256), who owns which token.

Assertions are signed here with PyJWT, not by the proxy's code: these tests pin down what the
fakes do, so the end-to-end tests with several clients can trust what they report.
"""

from __future__ import annotations

import ssl
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
import jwt
import pytest

from proxy.sandbox.authserver import JWT_BEARER, FakeAuthServer, RegisteredClient
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.serve import Served, serve
from proxy.sandbox.upstream import FakeUpstream

CONSULT: Final = "other:consult:client:confidential"
DAAS: Final = "other:daas:client:confidential"
CONSULT_SCOPE: Final = "scope:demo:consult"
DAAS_SCOPE: Final = "scope:daas:consult"
API: Final = "/REST/daas/v1/persons"


@dataclass(frozen=True, slots=True)
class Partner:
    client_id: str
    issued: Issued
    alg: str


@dataclass(slots=True)
class Fakes:
    auth: FakeAuthServer
    auth_served: Served
    upstream: FakeUpstream
    upstream_served: Served
    session: aiohttp.ClientSession
    consult: Partner
    daas: Partner

    @property
    def token_url(self) -> str:
        return self.auth_served.url + FakeAuthServer.TOKEN_PATH

    async def token_for(self, partner: Partner, *, signer: Partner | None = None) -> Any:
        """Ask a token for ``partner``, the assertion signed with ``signer``'s key."""
        signer = signer or partner
        now = int(time.time())
        claims = {
            "iss": partner.client_id,
            "sub": partner.client_id,
            "aud": self.token_url,
            "jti": str(uuid.uuid4()),
            "iat": now,
            "exp": now + 300,
        }
        form = {
            "grant_type": "client_credentials",
            "client_assertion_type": JWT_BEARER,
            "client_assertion": jwt.encode(claims, signer.issued.private_key, algorithm=signer.alg),
        }
        async with self.session.post(self.token_url, data=form) as response:
            return response.status, await response.json()

    async def call(self, token: str | None) -> int:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        async with self.session.get(self.upstream_served.url + API, headers=headers) as response:
            await response.read()
            return response.status


def register(partner: Partner, scope: str) -> RegisteredClient:
    return RegisteredClient(
        client_id=partner.client_id,
        certificate=partner.issued.certificate,
        scopes=frozenset({scope}),
        default_scopes=frozenset({scope}),
    )


@pytest.fixture(scope="module")
def two_partners() -> tuple[Partner, Partner]:
    ca = CertificateAuthority("Two Purposes CA")
    return (
        Partner(CONSULT, ca.issue_client("consult", key_type="rsa"), "RS256"),
        Partner(DAAS, ca.issue_client("daas", key_type="ec"), "ES256"),
    )


async def start_fakes(
    partners: tuple[Partner, Partner],
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
    **upstream_args: Any,
) -> Fakes:
    consult, daas = partners
    auth = FakeAuthServer(clients=[register(consult, CONSULT_SCOPE), register(daas, DAAS_SCOPE)])
    auth_served = await serve(auth.make_app(), ssl_context=server_ssl)
    upstream = FakeUpstream(introspect=auth.introspect, **upstream_args)
    upstream_served = await serve(upstream.make_app(), ssl_context=server_ssl)
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_ssl))
    return Fakes(auth, auth_served, upstream, upstream_served, session, consult, daas)


@pytest.fixture
async def fakes(
    two_partners: tuple[Partner, Partner],
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
) -> AsyncIterator[Fakes]:
    started = await start_fakes(two_partners, server_ssl, client_ssl)
    try:
        yield started
    finally:
        await started.session.close()
        await started.upstream_served.close()
        await started.auth_served.close()


async def test_each_client_gets_tokens_with_its_own_certificate(fakes: Fakes) -> None:
    status, consult = await fakes.token_for(fakes.consult)
    assert (status, consult["scope"]) == (200, CONSULT_SCOPE)
    status, daas = await fakes.token_for(fakes.daas)
    assert (status, daas["scope"]) == (200, DAAS_SCOPE)
    assert fakes.auth.client_of(consult["access_token"]) == CONSULT
    assert fakes.auth.client_of(daas["access_token"]) == DAAS
    assert fakes.auth.client_of("never-issued") is None
    assert [r.outcome for r in fakes.auth.requests_from(DAAS)] == ["issued"]
    assert [r.assertion_header for r in fakes.auth.requests_from(DAAS)] == [
        {"alg": "ES256", "typ": "JWT"}
    ]
    assert fakes.auth.introspect(daas["access_token"])["client_id"] == DAAS


async def test_one_client_cannot_sign_for_the_other(fakes: Fakes) -> None:
    status, body = await fakes.token_for(fakes.daas, signer=fakes.consult)
    assert (status, body["error"]) == (401, "invalid_client")
    assert fakes.auth.issued == {}


async def test_an_unregistered_client_is_refused_and_the_other_still_served(fakes: Fakes) -> None:
    fakes.auth.unregister(DAAS)
    status, body = await fakes.token_for(fakes.daas)
    assert (status, body["error"]) == (401, "invalid_client")
    status, _ = await fakes.token_for(fakes.consult)
    assert status == 200
    assert [r.outcome for r in fakes.auth.requests_from(DAAS)] == ["invalid_client"]
    fakes.auth.unregister("never-registered")  # no error


async def test_the_upstream_records_which_client_each_token_belongs_to(fakes: Fakes) -> None:
    _, consult = await fakes.token_for(fakes.consult)
    _, daas = await fakes.token_for(fakes.daas)
    assert await fakes.call(consult["access_token"]) == 200
    assert await fakes.call(daas["access_token"]) == 200
    assert await fakes.call(None) == 401
    assert await fakes.call("not-a-token") == 401
    assert fakes.upstream.clients_seen() == [(API, CONSULT), (API, DAAS), (API, None), (API, None)]
    # Introspection names no client for a token no longer active ...
    fakes.auth.revoke(daas["access_token"])
    assert await fakes.call(daas["access_token"]) == 401
    assert fakes.upstream.seen[-1].client_id is None


async def test_client_of_names_the_client_of_an_expired_token_too(
    two_partners: tuple[Partner, Partner],
    server_ssl: ssl.SSLContext,
    client_ssl: ssl.SSLContext,
) -> None:
    # ... while the authorization server's own record does, which tests may ask for.
    fakes = await start_fakes(two_partners, server_ssl, client_ssl)
    fakes.upstream = FakeUpstream(introspect=fakes.auth.introspect, client_of=fakes.auth.client_of)
    await fakes.upstream_served.close()
    fakes.upstream_served = await serve(fakes.upstream.make_app(), ssl_context=server_ssl)
    try:
        _, daas = await fakes.token_for(fakes.daas)
        fakes.auth.expire_all()
        assert await fakes.call(daas["access_token"]) == 401
        assert fakes.upstream.clients_seen() == [(API, DAAS)]
    finally:
        await fakes.session.close()
        await fakes.upstream_served.close()
        await fakes.auth_served.close()
