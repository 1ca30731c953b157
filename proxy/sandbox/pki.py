"""Own the sandbox's throw-away PKI: a CA, server certificates and partner client certificates.

The demo and the tests need real X.509 material without touching the network or the disk more
than they must: ``CertificateAuthority`` signs a server certificate for the fake KSZ endpoints
and client certificates in every shape the partner might hand us (RSA or EC, PKCS#12 or PEM,
encrypted or not, expired or not yet valid). Keys live only in memory until a ``write_*`` call
puts them in a file with the mode a real deployment would use.

Only ``cryptography`` is used, so the sandbox also runs where the test extras are not installed.
Typical use::

    ca = CertificateAuthority()
    server = ca.issue_server("localhost", "127.0.0.1", "::1")
    partner = ca.issue_client("partner", key_type="ec")
    partner.write_pkcs12(tmp / "client.p12", b"passphrase")
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey

_PEM = serialization.Encoding.PEM


class CertificateAuthority:
    """A self-signed RSA 2048 CA that issues server and client certificates."""

    def __init__(self, common_name: str = "ksz-proxy sandbox CA") -> None:
        now = datetime.now(UTC)
        self.private_key: rsa.RSAPrivateKey = _rsa_key(2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        public_key = self.private_key.public_key()
        self.certificate: x509.Certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(days=1))
            .not_valid_after(now + timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )

    def __repr__(self) -> str:
        return f"CertificateAuthority(subject={self.certificate.subject.rfc4514_string()!r})"

    def cert_pem(self) -> bytes:
        """Return the CA certificate in PEM."""
        return self.certificate.public_bytes(_PEM)

    def issue_server(self, *hosts: str) -> Issued:
        """Issue an RSA 2048 server certificate for the given DNS names and IP addresses."""
        if not hosts:
            raise ValueError("issue_server needs at least one host name or address")
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        now = datetime.now(UTC)
        key = _rsa_key(2048)
        builder = (
            self._leaf(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]), key)
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=365))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(_key_usage(key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        )
        return self._sign(builder, key)

    def issue_client(
        self,
        common_name: str,
        *,
        key_type: Literal["rsa", "ec"] = "rsa",
        key_size: int = 2048,
        curve: ec.EllipticCurve | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        organization: str | None = None,
    ) -> Issued:
        """Issue a client (partner) certificate; the defaults make a valid RSA 2048 one."""
        key: PrivateKey
        if key_type == "rsa":
            key = _rsa_key(key_size)
        elif key_type == "ec":
            key = ec.generate_private_key(curve or ec.SECP256R1())
        else:
            raise ValueError(f"unknown key type {key_type!r}")
        now = datetime.now(UTC)
        attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)]
        if organization is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        builder = (
            self._leaf(x509.Name(attributes), key)
            .not_valid_before(not_before or now - timedelta(hours=1))
            .not_valid_after(not_after or now + timedelta(days=365))
            .add_extension(_key_usage(key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        return self._sign(builder, key)

    def sign_request(
        self, request: x509.CertificateSigningRequest, *, days: int = 365
    ) -> x509.Certificate:
        """Act as the partner's CA: issue a client certificate for a CSR (``ksz-proxy csr``)."""
        public_key = request.public_key()
        if not isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
            raise ValueError("the sandbox CA signs RSA and EC keys only")
        if not request.is_signature_valid:
            raise ValueError("the request's signature does not verify")
        now = datetime.now(UTC)
        return (
            self._leaf(request.subject, public_key)
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(_key_usage(public_key), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.private_key, hashes.SHA256())
        )

    def client_ssl_context(self) -> ssl.SSLContext:
        """Return a TLS client context that trusts this CA only and checks host names."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies and checks host names
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_verify_locations(cadata=self.cert_pem().decode("ascii"))
        return context

    def _leaf(self, subject: x509.Name, key: PrivateKey | PublicKey) -> x509.CertificateBuilder:
        public_key = key if isinstance(key, PublicKey) else key.public_key()
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
        )

    def _sign(self, builder: x509.CertificateBuilder, key: PrivateKey) -> Issued:
        return Issued(
            certificate=builder.sign(self.private_key, hashes.SHA256()),
            private_key=key,
            ca_certificate=self.certificate,
        )


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate issued by the sandbox CA, with its private key."""

    certificate: x509.Certificate
    private_key: PrivateKey = field(repr=False)
    ca_certificate: x509.Certificate

    def cert_pem(self) -> bytes:
        """Return the certificate in PEM."""
        return self.certificate.public_bytes(_PEM)

    def key_pem(self, password: bytes | None = None, *, pkcs8: bool = True) -> bytes:
        """Return the private key in PEM: PKCS#8, or PKCS#1 / SEC1 when ``pkcs8`` is False."""
        return self.private_key.private_bytes(
            _PEM,
            serialization.PrivateFormat.PKCS8
            if pkcs8
            else serialization.PrivateFormat.TraditionalOpenSSL,
            _encryption(password),
        )

    def pkcs12(
        self,
        password: bytes | None = None,
        *,
        with_key: bool = True,
        with_cert: bool = True,
        name: bytes = b"partner",
    ) -> bytes:
        """Return a PKCS#12 keystore with the key, the certificate and the CA certificate."""
        return pkcs12.serialize_key_and_certificates(
            name,
            self.private_key if with_key else None,
            self.certificate if with_cert else None,
            [self.ca_certificate],
            _encryption(password),
        )

    def write_pkcs12(self, path: Path, password: bytes | None = None) -> Path:
        """Write the PKCS#12 keystore to ``path`` with mode 0600 and return the path."""
        _write(path, self.pkcs12(password), 0o600)
        return path

    def write_pem(
        self,
        key_path: Path,
        cert_path: Path,
        password: bytes | None = None,
        *,
        pkcs8: bool = True,
    ) -> None:
        """Write the key (mode 0600) and the certificate (mode 0644) as PEM files."""
        _write(key_path, self.key_pem(password, pkcs8=pkcs8), 0o600)
        _write(cert_path, self.cert_pem(), 0o644)

    def server_ssl_context(self) -> ssl.SSLContext:
        """Return a TLS server context presenting this certificate (TLS 1.2 or later)."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        # The ssl module loads keys from files only; a private temporary directory (mode 0700)
        # holds them for the duration of the call.
        with tempfile.TemporaryDirectory(prefix="ksz-proxy-pki-") as tmp:
            cert_path = Path(tmp, "cert.pem")
            key_path = Path(tmp, "key.pem")
            _write(cert_path, self.cert_pem(), 0o600)
            _write(key_path, self.key_pem(), 0o600)
            context.load_cert_chain(cert_path, key_path)
        return context


def _rsa_key(key_size: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=key_size)


def _key_usage(key: PrivateKey | PublicKey) -> x509.KeyUsage:
    # RSA TLS servers may still be asked for RSA key transport; EC keys only ever sign.
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey),
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _encryption(password: bytes | None) -> serialization.KeySerializationEncryption:
    if password is None:
        return serialization.NoEncryption()
    return serialization.BestAvailableEncryption(password)


def _write(path: Path, data: bytes, mode: int) -> None:
    # Create with the final mode so a private key is never readable by others, not even briefly;
    # fchmod also fixes an existing file and ignores the umask.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
