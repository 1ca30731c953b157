"""Own ``ksz-proxy cert-info``: show what a keystore or certificate holds, export the certificate.

It describes subject, issuer, validity, key and thumbprints of the configuration's client
credentials or of a file (PKCS#12, PEM key and certificate, PEM or DER certificate), and writes
the public certificate to send to KSZ. An expired certificate is described, not refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from proxy.config import load_config
from proxy.credentials import (
    Credentials,
    b64url,
    load_client,
    load_pem,
    load_pkcs12,
    opens_without_password,
)
from proxy.errors import ConfigError
from proxy.onboarding.files import PasswordSource, refuse_existing, write_new
from proxy.onboarding.probes import ESB

# Where cert-info's passwords come from, named in its error messages.
_OPTIONS: Final = "--password-file / --password-env"


@dataclass(frozen=True, slots=True, kw_only=True)
class Material:
    """A certificate to describe, with its chain and, when present, the matching private key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    source: Path
    kind: str  # "PKCS#12 keystore", "PEM key and certificate", "PEM certificate", ...
    has_key: bool


def cert_info(
    *,
    file: str | None,
    config: Path,
    password: PasswordSource,
    export_crt: str | None,
    environ: Mapping[str, str],
    out: TextIO,
) -> int:
    """Describe a keystore or certificate; with ``export_crt`` write its public certificate."""
    export = Path(export_crt) if export_crt else None
    if export is not None:
        refuse_existing(export, "--export-crt")
    material = load_material(file=file, config=config, password=password, environ=environ)
    now = datetime.now(UTC)
    cert = material.certificate
    valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    for label, value in describe(material, now):
        print(f"{label:<12} {value}", file=out)
    if export is not None and not valid:
        print(
            f"\nNot exported to {export}: this certificate is not valid now, and KSZ would refuse "
            "to register it. Export the renewed certificate instead.",
            file=out,
        )
        return 1
    if export is not None:
        write_new(export, cert.public_bytes(serialization.Encoding.PEM), 0o644, "--export-crt")
        print(
            f"\nWrote {export}: the public certificate (PEM). Send it to {ESB} with "
            "the client-id you chose and the environment (test, acpt or prod) it is for.",
            file=out,
        )
    if not valid:
        print("\nThis certificate is not valid now: KSZ will refuse it.", file=out)
        return 1
    return 0


def load_material(
    *, file: str | None, config: Path, password: PasswordSource, environ: Mapping[str, str]
) -> Material:
    """Load what cert-info describes: the config's client files, or the file named."""
    if file is None:
        if password.given:
            raise ConfigError(
                "--password-file/--password-env: not used with a configuration (its client "
                "section names the password)"
            )
        client = load_config(config, environ).client
        kind = "PKCS#12 keystore" if client.pkcs12 is not None else "PEM key and certificate"
        return _from_credentials(load_client(client), kind)
    path = Path(file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"file: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN" in data:
        return _load_pem_file(password, path, data)
    try:
        return Material(
            certificate=x509.load_der_x509_certificate(data),
            source=path,
            kind="DER certificate",
            has_key=False,
        )
    except ValueError:
        pass
    secret = None
    if password.given:
        secret = password.read("keystore password")
    elif not opens_without_password(data):
        secret = password.read(f"password for {path}")
    return _from_credentials(
        load_pkcs12(path, secret, key="file", unlock_via=_OPTIONS), "PKCS#12 keystore"
    )


def _load_pem_file(password: PasswordSource, path: Path, data: bytes) -> Material:
    if b"PRIVATE KEY-----" in data and b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(
            f"file: {path} holds a private key and no certificate; run cert-info on the "
            "certificate (.crt) the CA sent, or on a .p12 keystore"
        )
    if b"PRIVATE KEY-----" in data:
        secret = None
        if password.given or b"ENCRYPTED" in data:
            secret = password.read(f"password for the key in {path}")
        return _from_credentials(
            load_pem(path, path, secret, key="file", cert_key="file", unlock_via=_OPTIONS),
            "PEM key and certificate",
        )
    if b"CERTIFICATE REQUEST-----" in data:
        raise ConfigError(
            f"file: {path} is a certificate request (CSR): send it to a CA, then run cert-info "
            "on the certificate the CA sends back"
        )
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise ConfigError(f"file: {path} holds no PEM certificate")
    try:
        certificates = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(f"file: {path} holds a PEM certificate that cannot be read") from None
    return Material(
        certificate=certificates[0],
        chain=tuple(certificates[1:]),
        source=path,
        kind="PEM certificate (no private key)",
        has_key=False,
    )


def _from_credentials(creds: Credentials, kind: str) -> Material:
    return Material(
        certificate=creds.certificate,
        chain=creds.chain,
        source=creds.source,
        kind=kind,
        has_key=True,
    )


def describe(material: Material, now: datetime) -> list[tuple[str, str]]:
    """Return (label, value) lines describing the certificate, for people."""
    cert = material.certificate
    sha1 = cert.fingerprint(hashes.SHA1())  # noqa: S303  # names the certificate (x5t)
    sha256 = cert.fingerprint(hashes.SHA256())
    not_after = cert.not_valid_after_utc
    if now < cert.not_valid_before_utc:
        state = "NOT VALID YET"
    elif now >= not_after:
        state = f"EXPIRED {(now - not_after).days} days ago"
    else:
        state = f"{(not_after - now).days} days left"
    key = describe_public_key(cert.public_key())
    key += "; private key present and matching" if material.has_key else "; no private key"
    lines = [
        ("source", f"{material.source} ({material.kind})"),
        ("subject", cert.subject.rfc4514_string()),
        ("issuer", cert.issuer.rfc4514_string()),
        ("serial", format(cert.serial_number, "X")),
        ("valid from", f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC"),
        ("valid until", f"{not_after:%Y-%m-%d %H:%M:%S} UTC ({state})"),
        ("key", key),
        ("SHA-1", sha1.hex(":").upper()),
        ("  x5t", b64url(sha1)),
        ("SHA-256", sha256.hex(":").upper()),
        ("  x5t#S256", b64url(sha256)),
    ]
    if material.chain:
        names = "; ".join(c.subject.rfc4514_string() for c in material.chain)
        lines.append(("chain", f"{len(material.chain)} more: {names}"))
    return lines


def describe_public_key(key: Any) -> str:
    """Return ``RSA 3072`` or ``EC P-256`` (with the JWS algorithms it can sign) for people."""
    if isinstance(key, rsa.RSAPublicKey):
        algorithms = "RS256, PS256" if key.key_size >= 2048 else "too weak: at least 2048 bits"
        return f"RSA {key.key_size} ({algorithms})"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "EC P-256 (ES256)"
        return f"EC {key.curve.name} (not usable: ksz-proxy signs with P-256 only)"
    return f"{type(key).__name__} (not usable: use RSA or EC P-256)"
