"""Loading the partner's key and certificate, and the sandbox PKI that makes them for the tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import ssl
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID

from proxy.config import ClientConfig, load_config
from proxy.credentials import (
    check_algorithm,
    check_validity,
    load_credentials,
    load_pem,
    load_pkcs12,
)
from proxy.errors import ConfigError, CredentialError, ProxyError
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.secret import Secret

PASSWORD = "canary-passphrase-7f3c9e"  # must never show up in any message or repr
PW = PASSWORD.encode()


# --------------------------------------------------------------------------------------------
# Material, generated once per session: RSA key generation is the slow part.


@pytest.fixture(scope="session")
def ca() -> CertificateAuthority:
    return CertificateAuthority()


@pytest.fixture(scope="session")
def rsa_partner(ca: CertificateAuthority) -> Issued:
    return ca.issue_client("partner-rsa", organization="Partner NV")


@pytest.fixture(scope="session")
def other_rsa_partner(ca: CertificateAuthority) -> Issued:
    return ca.issue_client("someone-else")


@pytest.fixture(scope="session")
def ec_partner(ca: CertificateAuthority) -> Issued:
    return ca.issue_client("partner-ec", key_type="ec")


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def error_text(exc: ProxyError) -> str:
    """Return the message, after checking no form of the error shows the password."""
    assert PASSWORD not in f"{exc} {exc!r} {exc.detail} {exc.args}"
    return str(exc)


def load_failure(call: Callable[[], object]) -> str:
    with pytest.raises(CredentialError) as info:
        call()
    return error_text(info.value)


# --------------------------------------------------------------------------------------------
# PKCS#12


@pytest.mark.parametrize("password", [None, PW], ids=["plain", "password"])
def test_pkcs12_loads(tmp_path: Path, rsa_partner: Issued, password: bytes | None) -> None:
    path = rsa_partner.write_pkcs12(tmp_path / "client.p12", password)
    creds = load_pkcs12(path, Secret(PASSWORD) if password else None)
    assert creds.certificate == rsa_partner.certificate
    assert creds.chain == (rsa_partner.ca_certificate,)
    assert creds.source == path
    assert creds.key_type == "rsa"
    assert creds.private_key.public_key() == rsa_partner.private_key.public_key()


def test_pkcs12_ec(tmp_path: Path, ec_partner: Issued) -> None:
    path = ec_partner.write_pkcs12(tmp_path / "client.pfx", PW)
    creds = load_pkcs12(path, Secret(PASSWORD))
    assert creds.key_type == "ec"
    assert creds.key_description == "EC P-256"
    assert creds.algorithms == ("ES256",)


def test_pkcs12_certificate_not_linked_to_key(tmp_path: Path, rsa_partner: Issued) -> None:
    # Some tools drop the localKeyId, so the leaf ends up among the "additional" certificates.
    data = pkcs12.serialize_key_and_certificates(
        b"partner",
        rsa_partner.private_key,
        None,
        [rsa_partner.ca_certificate, rsa_partner.certificate],
        serialization.NoEncryption(),
    )
    creds = load_pkcs12(write(tmp_path / "client.p12", data), None)
    assert creds.certificate == rsa_partner.certificate
    assert creds.chain == (rsa_partner.ca_certificate,)


def test_pkcs12_wrong_password(tmp_path: Path, rsa_partner: Issued) -> None:
    path = rsa_partner.write_pkcs12(tmp_path / "client.p12", b"another one")
    text = load_failure(lambda: load_pkcs12(path, Secret(PASSWORD)))
    assert text.startswith(f"client.pkcs12: wrong password for {path}")
    assert "client.password_file" in text


def test_pkcs12_password_missing(tmp_path: Path, rsa_partner: Issued) -> None:
    path = rsa_partner.write_pkcs12(tmp_path / "client.p12", PW)
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text.startswith(f"client.pkcs12: {path} is password-protected")
    assert "client.password_env" in text


def test_pkcs12_password_given_but_not_protected(tmp_path: Path, rsa_partner: Issued) -> None:
    path = rsa_partner.write_pkcs12(tmp_path / "client.p12")
    text = load_failure(lambda: load_pkcs12(path, Secret(PASSWORD)))
    assert text.startswith(f"client.pkcs12: {path} is not password-protected")


def test_pkcs12_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.p12"
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text.startswith(f"client.pkcs12: file {path} does not exist")


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n", "looks like PEM"),
        (b"\x00\x01not a keystore at all", "is not a PKCS#12 keystore"),
        (b"", "is not a PKCS#12 keystore"),
    ],
    ids=["pem", "garbage", "empty"],
)
def test_pkcs12_not_a_keystore(tmp_path: Path, content: bytes, expected: str) -> None:
    path = write(tmp_path / "client.p12", content)
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text.startswith(f"client.pkcs12: {path}")
    assert expected in text


def test_pkcs12_without_key(tmp_path: Path, rsa_partner: Issued) -> None:
    path = write(tmp_path / "client.p12", rsa_partner.pkcs12(PW, with_key=False))
    text = load_failure(lambda: load_pkcs12(path, Secret(PASSWORD)))
    assert text == f"client.pkcs12: {path} holds no private key"


def test_pkcs12_without_certificate(tmp_path: Path, rsa_partner: Issued) -> None:
    path = write(tmp_path / "client.p12", rsa_partner.pkcs12(with_cert=False))
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text.startswith(f"client.pkcs12: {path} holds no certificate for its private key")


def test_pkcs12_with_someone_elses_certificate(
    tmp_path: Path, rsa_partner: Issued, other_rsa_partner: Issued
) -> None:
    # cryptography (like openssl pkcs12 -export) refuses to pair a key with a foreign
    # certificate, so such a keystore carries the stranger as an unlinked certificate.
    data = pkcs12.serialize_key_and_certificates(
        b"partner",
        rsa_partner.private_key,
        None,
        [other_rsa_partner.certificate, rsa_partner.ca_certificate],
        serialization.NoEncryption(),
    )
    path = write(tmp_path / "client.p12", data)
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text == f"client.pkcs12: {path} holds no certificate for its private key"


def test_pkcs12_custom_key_name(tmp_path: Path) -> None:
    path = tmp_path / "nope.p12"
    text = load_failure(lambda: load_pkcs12(path, None, key="sandbox.keystore"))
    assert text.startswith("sandbox.keystore: file")


# --------------------------------------------------------------------------------------------
# PEM


@pytest.mark.parametrize(
    ("partner", "pkcs8", "password", "marker"),
    [
        ("rsa_partner", True, None, b"BEGIN PRIVATE KEY"),
        ("rsa_partner", False, None, b"BEGIN RSA PRIVATE KEY"),
        ("rsa_partner", True, PW, b"BEGIN ENCRYPTED PRIVATE KEY"),
        ("rsa_partner", False, PW, b"Proc-Type: 4,ENCRYPTED"),
        ("ec_partner", True, None, b"BEGIN PRIVATE KEY"),
        ("ec_partner", False, None, b"BEGIN EC PRIVATE KEY"),
        ("ec_partner", True, PW, b"BEGIN ENCRYPTED PRIVATE KEY"),
        ("ec_partner", False, PW, b"BEGIN EC PRIVATE KEY"),
    ],
    ids=[
        "rsa-pkcs8",
        "rsa-pkcs1",
        "rsa-pkcs8-encrypted",
        "rsa-pkcs1-encrypted",
        "ec-pkcs8",
        "ec-sec1",
        "ec-pkcs8-encrypted",
        "ec-sec1-encrypted",
    ],
)
def test_pem_loads(
    tmp_path: Path,
    request: pytest.FixtureRequest,
    partner: str,
    pkcs8: bool,
    password: bytes | None,
    marker: bytes,
) -> None:
    issued: Issued = request.getfixturevalue(partner)
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    issued.write_pem(key_path, cert_path, password, pkcs8=pkcs8)
    assert marker in key_path.read_bytes()
    creds = load_pem(key_path, cert_path, Secret(PASSWORD) if password else None)
    assert creds.certificate == issued.certificate
    assert creds.chain == ()
    assert creds.source == cert_path
    assert creds.private_key.public_key() == issued.private_key.public_key()


def test_pem_chain_picks_the_certificate_matching_the_key(
    tmp_path: Path, rsa_partner: Issued, other_rsa_partner: Issued
) -> None:
    key_path = write(tmp_path / "client.key", rsa_partner.key_pem())
    # Leaf not first, and a stranger in the file: the key decides which one is the leaf.
    ca_pem = rsa_partner.ca_certificate.public_bytes(serialization.Encoding.PEM)
    bundle = ca_pem + other_rsa_partner.cert_pem() + rsa_partner.cert_pem()
    cert_path = write(tmp_path / "chain.pem", bundle, 0o644)
    creds = load_pem(key_path, cert_path, None)
    assert creds.certificate == rsa_partner.certificate
    assert creds.chain == (rsa_partner.ca_certificate, other_rsa_partner.certificate)


def test_pem_der_certificate(tmp_path: Path, ec_partner: Issued) -> None:
    key_path = write(tmp_path / "client.key", ec_partner.key_pem())
    der = ec_partner.certificate.public_bytes(serialization.Encoding.DER)
    cert_path = write(tmp_path / "client.crt", der, 0o644)
    assert load_pem(key_path, cert_path, None).certificate == ec_partner.certificate


def test_pem_combined_key_and_certificate_file_must_be_private(
    tmp_path: Path, ec_partner: Issued
) -> None:
    path = write(tmp_path / "client.pem", ec_partner.key_pem() + ec_partner.cert_pem())
    assert load_pem(path, path, None).certificate == ec_partner.certificate
    path.chmod(0o644)
    text = load_failure(lambda: load_pem(path, path, None))
    assert text.startswith(f"client.private_key: {path} is readable by group or others")


def test_pem_certificate_file_holding_a_key_must_be_private(
    tmp_path: Path, ec_partner: Issued
) -> None:
    key_path = write(tmp_path / "client.key", ec_partner.key_pem())
    both = ec_partner.cert_pem() + ec_partner.key_pem()
    cert_path = write(tmp_path / "client.crt", both, 0o644)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.certificate: {cert_path} is readable by group or others")


def test_pem_encrypted_key_without_password(tmp_path: Path, rsa_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    rsa_partner.write_pem(key_path, cert_path, PW)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.private_key: {key_path} is encrypted; set client.password_file")


@pytest.mark.parametrize("pkcs8", [True, False], ids=["pkcs8", "traditional"])
def test_pem_wrong_password(tmp_path: Path, rsa_partner: Issued, pkcs8: bool) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    rsa_partner.write_pem(key_path, cert_path, b"another one", pkcs8=pkcs8)
    text = load_failure(lambda: load_pem(key_path, cert_path, Secret(PASSWORD)))
    assert text.startswith(f"client.private_key: wrong password for {key_path}")


def test_pem_password_given_but_key_not_encrypted(tmp_path: Path, ec_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    ec_partner.write_pem(key_path, cert_path)
    text = load_failure(lambda: load_pem(key_path, cert_path, Secret(PASSWORD)))
    assert text.startswith(f"client.private_key: {key_path} is not encrypted but a password")


def test_pem_missing_files(tmp_path: Path, ec_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text == f"client.private_key: file {key_path} does not exist"
    write(key_path, ec_partner.key_pem())
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.certificate: file {cert_path} does not exist")


def test_pem_key_file_is_not_a_key(tmp_path: Path, ec_partner: Issued) -> None:
    cert_path = write(tmp_path / "client.crt", ec_partner.cert_pem(), 0o644)
    key_path = write(tmp_path / "client.key", ec_partner.cert_pem())
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text == f"client.private_key: {key_path} holds no PEM private key"
    write(key_path, b"\x30\x82 binary, not PEM")
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.private_key: {key_path} is not a PEM file")
    write(key_path, b"-----BEGIN PRIVATE KEY-----\nbm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.private_key: {key_path} holds a private key that cannot")


def test_pem_certificate_file_is_not_a_certificate(tmp_path: Path, ec_partner: Issued) -> None:
    key_path = write(tmp_path / "client.key", ec_partner.key_pem())
    cert_path = write(tmp_path / "client.crt", b"-----BEGIN PUBLIC KEY-----\n", 0o644)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text == f"client.certificate: {cert_path} holds no PEM certificate"
    write(cert_path, b"plain text, no certificate", 0o644)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.certificate: {cert_path} is not a certificate file")


def test_pem_key_and_certificate_mismatch(
    tmp_path: Path, rsa_partner: Issued, other_rsa_partner: Issued
) -> None:
    key_path = write(tmp_path / "client.key", rsa_partner.key_pem())
    cert_path = write(tmp_path / "client.crt", other_rsa_partner.cert_pem(), 0o644)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.certificate: {cert_path} does not belong to the key in")
    assert str(key_path) in text


# --------------------------------------------------------------------------------------------
# Key strength


def test_rsa_1024_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    weak = ca.issue_client("weak", key_size=1024)
    path = weak.write_pkcs12(tmp_path / "client.p12")
    text = load_failure(lambda: load_pkcs12(path, None))
    assert text == (
        f"client.pkcs12: {path} holds an RSA 1024 key; use RSA with at least 2048 bits or EC P-256"
    )
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    weak.write_pem(key_path, cert_path)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.private_key: {key_path} holds an RSA 1024 key")


def test_ec_p384_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    p384 = ca.issue_client("p384", key_type="ec", curve=ec.SECP384R1())
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    p384.write_pem(key_path, cert_path, pkcs8=False)
    text = load_failure(lambda: load_pem(key_path, cert_path, None))
    assert text.startswith(f"client.private_key: {key_path} holds an EC P-384 key")


# --------------------------------------------------------------------------------------------
# File modes


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_keystore_readable_by_others_refused(
    tmp_path: Path, rsa_partner: Issued, mode: int
) -> None:
    path = rsa_partner.write_pkcs12(tmp_path / "client.p12", PW)
    path.chmod(mode)
    client = ClientConfig(id="partner", pkcs12=path, password=Secret(PASSWORD))
    with pytest.raises(CredentialError) as info:
        load_credentials(client)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__
    text = error_text(info.value)
    assert text.startswith(f"client.pkcs12: {path} is readable by group or others")
    assert f"(mode {mode:04o})" in text
    assert f"chmod 600 {path}" in text


def test_key_file_readable_by_others_refused(tmp_path: Path, ec_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    ec_partner.write_pem(key_path, cert_path)
    key_path.chmod(0o644)
    client = ClientConfig(id="partner", private_key=key_path, certificate=cert_path)
    text = load_failure(lambda: load_credentials(client))
    assert text.startswith(f"client.private_key: {key_path} is readable by group or others")
    assert "(mode 0644)" in text


def test_public_certificate_file_may_be_world_readable(tmp_path: Path, ec_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    ec_partner.write_pem(key_path, cert_path)
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    client = ClientConfig(id="partner", private_key=key_path, certificate=cert_path)
    assert load_credentials(client).certificate == ec_partner.certificate


# --------------------------------------------------------------------------------------------
# Validity


def test_expired_certificate_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    now = datetime.now(UTC)
    expired = ca.issue_client(
        "old", key_type="ec", not_before=now - timedelta(days=400), not_after=now - timedelta(1)
    )
    path = expired.write_pkcs12(tmp_path / "client.p12")
    client = ClientConfig(id="partner", pkcs12=path)
    text = load_failure(lambda: load_credentials(client))
    assert f"the certificate in {path} expired on" in text
    assert (now - timedelta(1)).strftime("%Y-%m-%d") in text


def test_not_yet_valid_certificate_refused(tmp_path: Path, ca: CertificateAuthority) -> None:
    start = datetime.now(UTC) + timedelta(days=2)
    future = ca.issue_client("future", key_type="ec", not_before=start)
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    future.write_pem(key_path, cert_path)
    client = ClientConfig(id="partner", private_key=key_path, certificate=cert_path)
    text = load_failure(lambda: load_credentials(client))
    assert f"the certificate in {cert_path} is not valid before" in text
    assert start.strftime("%Y-%m-%d") in text


def test_validity_follows_the_given_clock(tmp_path: Path, ec_partner: Issued) -> None:
    path = ec_partner.write_pkcs12(tmp_path / "client.p12")
    client = ClientConfig(id="partner", pkcs12=path)
    load_credentials(client)
    later = ec_partner.certificate.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CredentialError, match="expired on"):
        load_credentials(client, now=later)


def test_expiring_soon_warns_but_loads(
    tmp_path: Path, ca: CertificateAuthority, caplog: pytest.LogCaptureFixture
) -> None:
    now = datetime.now(UTC)
    soon = ca.issue_client("soon", key_type="ec", not_after=now + timedelta(days=10, hours=1))
    path = soon.write_pkcs12(tmp_path / "client.p12", PW)
    client = ClientConfig(id="partner", pkcs12=path, password=Secret(PASSWORD))
    with caplog.at_level(logging.WARNING, logger="ksz_proxy.credentials"):
        creds = load_credentials(client, now=now)
    assert creds.certificate == soon.certificate
    [record] = caplog.records
    assert record.name == "ksz_proxy.credentials"
    assert record.levelno == logging.WARNING
    assert str(path) in record.getMessage()
    assert "in 10 days" in record.getMessage()
    assert PASSWORD not in caplog.text


def test_warning_window_is_configurable(
    tmp_path: Path, ec_partner: Issued, caplog: pytest.LogCaptureFixture
) -> None:
    creds = load_pkcs12(ec_partner.write_pkcs12(tmp_path / "client.p12"), None)
    with caplog.at_level(logging.WARNING, logger="ksz_proxy.credentials"):
        check_validity(creds)  # a year left: quiet
        assert caplog.records == []
        check_validity(creds, warn_days=400)
    assert len(caplog.records) == 1


# --------------------------------------------------------------------------------------------
# The Credentials value


def test_thumbprints_match_an_independent_computation(tmp_path: Path, rsa_partner: Issued) -> None:
    creds = load_pkcs12(rsa_partner.write_pkcs12(tmp_path / "client.p12"), None)
    der = rsa_partner.certificate.public_bytes(serialization.Encoding.DER)
    sha1 = hashlib.sha1(der, usedforsecurity=False).digest()
    sha256 = hashlib.sha256(der).digest()
    assert creds.sha1 == sha1
    assert creds.sha256 == sha256
    assert creds.x5t == base64.urlsafe_b64encode(sha1).decode().rstrip("=")
    assert creds.x5t_s256 == base64.urlsafe_b64encode(sha256).decode().rstrip("=")
    assert "=" not in creds.x5t + creds.x5t_s256
    assert len(creds.x5t) == 27 and len(creds.x5t_s256) == 43
    assert creds.sha1_hex == ":".join(f"{b:02X}" for b in sha1)
    assert creds.sha256_hex == ":".join(f"{b:02X}" for b in sha256)


def test_descriptive_properties(tmp_path: Path, rsa_partner: Issued) -> None:
    creds = load_pkcs12(rsa_partner.write_pkcs12(tmp_path / "client.p12"), None)
    cert = rsa_partner.certificate
    assert creds.subject == "O=Partner NV,CN=partner-rsa"
    assert creds.issuer == "CN=ksz-proxy sandbox CA"
    assert creds.serial == f"{cert.serial_number:X}"
    assert int(creds.serial, 16) == cert.serial_number
    assert creds.not_before == cert.not_valid_before_utc
    assert creds.not_after == cert.not_valid_after_utc
    assert creds.not_after.tzinfo is not None
    assert creds.key_type == "rsa"
    assert creds.key_description == "RSA 2048"
    assert creds.algorithms == ("RS256", "PS256")
    assert creds.days_left(creds.not_after - timedelta(days=3, hours=5)) == 3
    assert creds.days_left(creds.not_after + timedelta(hours=1)) == -1
    assert x509.load_pem_x509_certificate(creds.certificate_pem()) == cert


def test_repr_and_errors_never_show_key_material(tmp_path: Path, rsa_partner: Issued) -> None:
    creds = load_pkcs12(rsa_partner.write_pkcs12(tmp_path / "client.p12", PW), Secret(PASSWORD))
    assert isinstance(rsa_partner.private_key, rsa.RSAPrivateKey)
    numbers = rsa_partner.private_key.private_numbers()
    key_pem = rsa_partner.key_pem().decode()
    shown = f"{creds!r} {creds!s}"
    assert "partner-rsa" in shown
    assert "RSA 2048" in shown
    for secret in (str(numbers.d), f"{numbers.d:x}", str(numbers.p), PASSWORD, "PRIVATE"):
        assert secret not in shown
    for line in key_pem.splitlines()[1:-1]:
        assert line not in shown


def test_credentials_are_frozen(tmp_path: Path, ec_partner: Issued) -> None:
    creds = load_pkcs12(ec_partner.write_pkcs12(tmp_path / "client.p12"), None)
    with pytest.raises(AttributeError):
        creds.source = tmp_path  # type: ignore[misc]


def test_check_algorithm(tmp_path: Path, rsa_partner: Issued, ec_partner: Issued) -> None:
    rsa_creds = load_pkcs12(rsa_partner.write_pkcs12(tmp_path / "rsa.p12"), None)
    ec_creds = load_pkcs12(ec_partner.write_pkcs12(tmp_path / "ec.p12"), None)
    check_algorithm(rsa_creds, "RS256")
    check_algorithm(rsa_creds, "PS256")
    check_algorithm(ec_creds, "ES256")
    with pytest.raises(ConfigError) as info:
        check_algorithm(rsa_creds, "ES256")
    assert str(info.value) == (
        f"oauth.algorithm: ES256 needs an EC P-256 key; {tmp_path / 'rsa.p12'} holds an "
        "RSA 2048 key"
    )
    with pytest.raises(
        ConfigError, match=r"^oauth\.algorithm: RS256 needs an RSA key; .* EC P-256"
    ):
        check_algorithm(ec_creds, "RS256")
    with pytest.raises(ConfigError, match=r"^oauth\.algorithm: must be one of RS256, PS256, ES256"):
        check_algorithm(ec_creds, "HS256")


# --------------------------------------------------------------------------------------------
# load_credentials through the configuration


def test_load_credentials_from_a_config_file(tmp_path: Path, rsa_partner: Issued) -> None:
    rsa_partner.write_pkcs12(tmp_path / "client.p12", PW)
    write(tmp_path / "password.txt", PW + b"\n", 0o600)
    config_path = tmp_path / "ksz-proxy.toml"
    config_path.write_text(
        'environment = "test"\n'
        "[client]\n"
        'id = "partner:test:client:confidential"\n'
        'pkcs12 = "client.p12"\n'
        'password_file = "password.txt"\n'
        "[[routes]]\n"
        'prefix = "/REST/demo"\n',
        encoding="utf-8",
    )
    config = load_config(config_path, {})
    creds = load_credentials(config.client)
    assert creds.certificate == rsa_partner.certificate
    assert creds.source == tmp_path / "client.p12"


def test_load_credentials_pem_with_password_env(tmp_path: Path, ec_partner: Issued) -> None:
    ec_partner.write_pem(tmp_path / "client.key", tmp_path / "client.crt", PW, pkcs8=False)
    config_path = tmp_path / "ksz-proxy.toml"
    config_path.write_text(
        'environment = "acpt"\n'
        "[client]\n"
        'id = "partner"\n'
        'private_key = "client.key"\n'
        'certificate = "client.crt"\n'
        'password_env = "KSZ_KEY_PASSWORD"\n'
        "[[routes]]\n"
        'prefix = "/REST/demo"\n',
        encoding="utf-8",
    )
    config = load_config(config_path, {"KSZ_KEY_PASSWORD": PASSWORD})
    creds = load_credentials(config.client)
    assert creds.key_description == "EC P-256"
    assert creds.source == tmp_path / "client.crt"


def test_load_credentials_needs_a_file(tmp_path: Path) -> None:
    text = load_failure(lambda: load_credentials(ClientConfig(id="partner")))
    assert text.startswith("client.pkcs12: required")
    only_key = ClientConfig(id="partner", private_key=tmp_path / "client.key")
    assert load_failure(lambda: load_credentials(only_key)).startswith("client.pkcs12: required")


# --------------------------------------------------------------------------------------------
# The sandbox PKI itself


def test_pki_files_get_private_modes(tmp_path: Path, ec_partner: Issued) -> None:
    key_path, cert_path = tmp_path / "client.key", tmp_path / "client.crt"
    # Pre-existing files with loose modes are tightened, not just truncated.
    for path in (key_path, cert_path, tmp_path / "client.p12"):
        write(path, b"old", 0o666)
    ec_partner.write_pem(key_path, cert_path)
    keystore = ec_partner.write_pkcs12(tmp_path / "client.p12", PW)
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cert_path.stat().st_mode) == 0o644
    assert stat.S_IMODE(keystore.stat().st_mode) == 0o600
    assert key_path.read_bytes() == ec_partner.key_pem()
    assert os.access(keystore, os.R_OK)


def test_pki_certificates(ca: CertificateAuthority, rsa_partner: Issued) -> None:
    server = ca.issue_server("localhost", "127.0.0.1", "::1")
    san = server.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    eku = server.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku.value
    eku = rsa_partner.certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku.value
    rsa_partner.certificate.verify_directly_issued_by(ca.certificate)
    server.certificate.verify_directly_issued_by(ca.certificate)
    assert "private_key" not in repr(rsa_partner)
    with pytest.raises(ValueError, match="at least one host"):
        ca.issue_server()


async def test_pki_tls_handshake(ca: CertificateAuthority) -> None:
    server = ca.issue_server("localhost", "127.0.0.1", "::1")

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo " + await reader.readline())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    listener = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=server.server_ssl_context())
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        for host in ("127.0.0.1", "localhost"):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=ca.client_ssl_context(), server_hostname=host
            )
            tls = writer.get_extra_info("ssl_object")
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
            assert tls.getpeercert()["subject"] == ((("commonName", "localhost"),),)
            writer.write(b"hello\n")
            assert await reader.readline() == b"echo hello\n"
            writer.close()
            await writer.wait_closed()


async def test_pki_client_context_trusts_only_its_ca(ca: CertificateAuthority) -> None:
    server = ca.issue_server("localhost")
    stranger = CertificateAuthority("stranger CA")
    context = ca.client_ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2

    async def quiet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    listener = await asyncio.start_server(quiet, "127.0.0.1", 0, ssl=server.server_ssl_context())
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=stranger.client_ssl_context(), server_hostname="localhost"
            )
        with pytest.raises(ssl.SSLCertVerificationError, match="mismatch"):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="evil.example"
            )
