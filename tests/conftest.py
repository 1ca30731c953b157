"""Shared fixtures: the TLS trust used by every local server, the partner's credentials and the
fake authorization server they are registered with.

Two CAs on purpose: ``tls_ca`` (trustme) signs the certificates of the local HTTPS servers, and
``partner_ca`` (the sandbox PKI) signs the partner certificate whose key signs client assertions,
as in real life where neither has anything to do with the other.
"""

from __future__ import annotations

import logging
import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from proxy.sandbox.authserver import FakeAuthServer
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.serve import serve
from tests.support.fakes import AuthServerHandle
from tests.support.partner import PKCS12_PASSWORD, PartnerFiles, partner_client

# -- TLS for the local servers ------------------------------------------------------------------


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def server_ssl(tls_ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("localhost", "127.0.0.1", "::1").configure_cert(context)
    return context


@pytest.fixture(scope="session")
def client_ssl(tls_ca: trustme.CA) -> ssl.SSLContext:
    # cadata alone: the system CAs are not loaded, so only our servers are trusted.
    return ssl.create_default_context(cadata=tls_ca.cert_pem.bytes().decode("ascii"))


@pytest.fixture(scope="session")
def ca_file(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return path


# -- the partner ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def partner_ca() -> CertificateAuthority:
    return CertificateAuthority("Test Partner CA")


@pytest.fixture(scope="session")
def partner(partner_ca: CertificateAuthority) -> Issued:
    return partner_ca.issue_client("partner test client")


@pytest.fixture
def partner_files(partner: Issued, tmp_path: Path) -> PartnerFiles:
    keystore = partner.write_pkcs12(tmp_path / "partner.p12", PKCS12_PASSWORD.encode())
    password_file = tmp_path / "partner.password"
    fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(PKCS12_PASSWORD + "\n")
    return PartnerFiles(pkcs12=keystore, password_file=password_file, password=PKCS12_PASSWORD)


# -- the fake authorization server ---------------------------------------------------------------


@pytest.fixture
async def authserver(
    partner: Issued, server_ssl: ssl.SSLContext
) -> AsyncIterator[AuthServerHandle]:
    server = FakeAuthServer(clients=[partner_client(partner)])
    served = await serve(server.make_app(), ssl_context=server_ssl)
    try:
        yield AuthServerHandle(
            server=server,
            url=served.url,
            token_url=served.url + FakeAuthServer.TOKEN_PATH,
            metadata_url=served.url + FakeAuthServer.METADATA_PATH,
        )
    finally:
        await served.close()


@pytest.fixture
def keep_logging() -> Iterator[None]:
    """Put the root logger's handlers and level back after a test that ran ``main()``."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
