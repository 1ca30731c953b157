"""Own the partner's signing material: PKCS#12 keystore or PEM files -> ``Credentials``.

The private key signs the JWT client assertion; the certificate is the one KSZ registered for the
client-id, so its thumbprints (``x5t``, ``x5t#S256``) can name the key in the JWT header.

Loading refuses anything that would fail later, at the token endpoint, in a less readable way:
a key file or keystore readable by group or others, a wrong or missing password, a password for
a key that is not encrypted (the operator believes the key is protected when it is not), a key
and certificate that do not belong together, a key weaker than RSA 2048 or other than EC P-256,
and a certificate that is expired or not yet valid. A certificate expiring soon only warns.

Every ``CredentialError`` names the configuration key and the file, never the content of either
and never the password.
"""

from __future__ import annotations

import base64
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.config import ClientConfig, Config, load_config
from proxy.errors import ConfigError, CredentialError
from proxy.secret import Secret, check_private_file

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

log = logging.getLogger("ksz_proxy.credentials")

MIN_RSA_BITS: Final = 2048
_CURVE_NAMES: Final = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}
_NEEDS: Final = {"RS256": "an RSA key", "PS256": "an RSA key", "ES256": "an EC P-256 key"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    """The partner's private key with its certificate and any chain that came with it."""

    private_key: PrivateKey = field(repr=False)
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    source: Path

    def __repr__(self) -> str:
        return (
            f"Credentials(subject={self.subject!r}, serial={self.serial!r}, "
            f"not_after={self.not_after.isoformat()!r}, key={self.key_description!r}, "
            f"source={str(self.source)!r})"
        )

    @property
    def subject(self) -> str:
        """Return the certificate subject in RFC 4514 form."""
        return self.certificate.subject.rfc4514_string()

    @property
    def issuer(self) -> str:
        """Return the certificate issuer in RFC 4514 form."""
        return self.certificate.issuer.rfc4514_string()

    @property
    def serial(self) -> str:
        """Return the serial number in uppercase hexadecimal."""
        return format(self.certificate.serial_number, "X")

    @property
    def not_before(self) -> datetime:
        """Return the start of validity (aware, UTC)."""
        return self.certificate.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        """Return the end of validity (aware, UTC)."""
        return self.certificate.not_valid_after_utc

    @property
    def sha1(self) -> bytes:
        """Return the SHA-1 digest of the DER certificate."""
        # A thumbprint that names the certificate (RFC 7515 x5t), not a security decision.
        return hashlib.sha1(self._der(), usedforsecurity=False).digest()

    @property
    def sha256(self) -> bytes:
        """Return the SHA-256 digest of the DER certificate."""
        return hashlib.sha256(self._der()).digest()

    @property
    def sha1_hex(self) -> str:
        """Return the SHA-1 thumbprint as ``AB:CD:...`` for people."""
        return self.sha1.hex(":").upper()

    @property
    def sha256_hex(self) -> str:
        """Return the SHA-256 thumbprint as ``AB:CD:...`` for people."""
        return self.sha256.hex(":").upper()

    @property
    def x5t(self) -> str:
        """Return the JWT ``x5t`` header value: base64url SHA-1 thumbprint, no padding."""
        return b64url(self.sha1)

    @property
    def x5t_s256(self) -> str:
        """Return the JWT ``x5t#S256`` header value: base64url SHA-256 thumbprint, no padding."""
        return b64url(self.sha256)

    @property
    def key_type(self) -> Literal["rsa", "ec"]:
        """Return ``rsa`` or ``ec``."""
        return "rsa" if isinstance(self.private_key, rsa.RSAPrivateKey) else "ec"

    @property
    def key_description(self) -> str:
        """Return the key type and size for people, such as ``RSA 2048`` or ``EC P-256``."""
        return _describe(self.private_key)

    @property
    def algorithms(self) -> tuple[str, ...]:
        """Return the JWS algorithms this key can sign with."""
        if isinstance(self.private_key, rsa.RSAPrivateKey):
            return ("RS256", "PS256")
        if isinstance(self.private_key.curve, ec.SECP256R1):
            return ("ES256",)
        return ()

    def days_left(self, now: datetime | None = None) -> int:
        """Return the whole days until the certificate expires (negative once expired)."""
        remaining = self.not_after - (now or datetime.now(UTC))
        return remaining // timedelta(days=1)

    def certificate_pem(self) -> bytes:
        """Return the certificate in PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _der(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.DER)


# --------------------------------------------------------------------------------------------
# Loading


def load_credentials(
    client: ClientConfig, *, now: datetime | None = None, warn_days: int = 30
) -> Credentials:
    """Load the key and certificate the configuration names and check they are usable now."""
    creds = load_client(client)
    check_validity(creds, now=now, warn_days=warn_days)
    return creds


def load_client(client: ClientConfig) -> Credentials:
    """Load the keystore, or the PEM key and certificate, the configuration names; no checks.

    Errors name this client's keys: ``client.pkcs12``, or ``clients[N].pkcs12`` for an entry.
    """
    where = client.where
    if client.pkcs12 is not None:
        return load_pkcs12(client.pkcs12, client.password, key=f"{where}.pkcs12")
    if client.private_key is not None and client.certificate is not None:
        return load_pem(
            client.private_key,
            client.certificate,
            client.password,
            key=f"{where}.private_key",
            cert_key=f"{where}.certificate",
        )
    raise CredentialError(
        f"{where}.pkcs12: required (or set {where}.private_key and {where}.certificate)"
    )


def load_pkcs12(
    path: Path,
    password: Secret | None,
    *,
    key: str = "client.pkcs12",
    unlock_via: str | None = None,
) -> Credentials:
    """Load a PKCS#12 keystore (.p12/.pfx) holding the key, its certificate and maybe a chain."""
    data = _read_private(path, key)
    if not _looks_like_pkcs12(data):
        hint = (
            "; it looks like PEM: set client.private_key and client.certificate instead"
            if b"-----BEGIN" in data
            else ""
        )
        raise CredentialError(f"{key}: {path} is not a PKCS#12 keystore (.p12/.pfx){hint}")
    secret = _password_bytes(password)
    try:
        loaded_key, certificate, extra = pkcs12.load_key_and_certificates(data, secret)
    except (TypeError, ValueError, UnsupportedAlgorithm) as exc:
        raise CredentialError(_pkcs12_failure(data, path, key, secret, unlock_via)) from exc
    if loaded_key is None:
        raise CredentialError(f"{key}: {path} holds no private key")
    private_key = _check_key(loaded_key, path, key)
    # Some tools store the certificate without the attribute linking it to the key, so it lands
    # among the "additional" certificates: look for the one that matches the key there too.
    candidates = ([certificate] if certificate is not None else []) + list(extra)
    picked = _pick_leaf(private_key, candidates)
    if picked is None:
        if certificate is None:
            raise CredentialError(f"{key}: {path} holds no certificate for its private key")
        raise CredentialError(
            f"{key}: the certificate in {path} does not belong to its private key "
            "(the public keys differ)"
        )
    leaf, chain = picked
    return Credentials(private_key=private_key, certificate=leaf, chain=chain, source=path)


def load_pem(
    key_path: Path,
    cert_path: Path,
    password: Secret | None,
    *,
    key: str = "client.private_key",
    cert_key: str = "client.certificate",
    unlock_via: str | None = None,
) -> Credentials:
    """Load a PEM private key (PKCS#8, PKCS#1 or SEC1, encrypted or not) and a PEM certificate.

    The certificate file may hold a chain; the certificate matching the key is the leaf.
    """
    key_data = _read_private(key_path, key)
    loaded = _load_pem_key(key_data, key_path, password, where=key, unlock_via=unlock_via)
    private_key = _check_key(loaded, key_path, key)
    cert_data = _read(cert_path, cert_key)
    # A combined key + certificate file is as secret as the key file itself.
    if b"PRIVATE KEY-----" in cert_data:
        _check_private(cert_path, cert_key)
    certificates = _load_certificates(cert_data, cert_path, where=cert_key)
    picked = _pick_leaf(private_key, certificates)
    if picked is None:
        raise CredentialError(
            f"{cert_key}: {cert_path} does not belong to the key in {key_path} "
            f"({key}): the public keys differ"
        )
    leaf, chain = picked
    return Credentials(private_key=private_key, certificate=leaf, chain=chain, source=cert_path)


# --------------------------------------------------------------------------------------------
# Checks


def check_validity(creds: Credentials, *, now: datetime | None = None, warn_days: int = 30) -> None:
    """Refuse an expired or not yet valid certificate; warn when it expires within warn_days."""
    now = now or datetime.now(UTC)
    if now < creds.not_before:
        raise CredentialError(
            f"the certificate in {creds.source} is not valid before {_when(creds.not_before)} "
            f"(subject {creds.subject}); check the system clock"
        )
    if now >= creds.not_after:
        raise CredentialError(
            f"the certificate in {creds.source} expired on {_when(creds.not_after)} "
            f"(subject {creds.subject}); install the renewed certificate"
        )
    if creds.not_after - now < timedelta(days=warn_days):
        log.warning(
            "the certificate in %s expires on %s, in %d days; renew it and send the new "
            "certificate to KSZ before then",
            creds.source,
            _when(creds.not_after),
            creds.days_left(now),
        )


def check_algorithm(creds: Credentials, algorithm: str, key: str = "oauth.algorithm") -> None:
    """Refuse a JWS algorithm the loaded key cannot sign with."""
    need = _NEEDS.get(algorithm)
    if need is None:
        raise ConfigError(f"{key}: must be one of {', '.join(_NEEDS)}")
    if algorithm not in creds.algorithms:
        raise ConfigError(
            f"{key}: {algorithm} needs {need}; {creds.source} holds an {creds.key_description} key"
        )


# --------------------------------------------------------------------------------------------
# Helpers


def _check_private(path: Path, key: str) -> None:
    try:
        check_private_file(path, key)
    except ConfigError as exc:
        raise CredentialError(exc.detail) from None


def _read_private(path: Path, key: str) -> bytes:
    _check_private(path, key)
    return _read(path, key)


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialError(f"{key}: file {path} does not exist") from None
    except OSError as exc:
        raise CredentialError(f"{key}: cannot read {path} ({exc.strerror})") from None


def password_shape(password: Secret | str | None) -> str:
    """Return a note for a wrong-password error when the password's shape is a likely cause.

    A password file keeps everything but one trailing newline, so an editor's extra blank line or
    trailing spaces become part of the password. The note names the shape, never the content.
    """
    value = password.reveal() if isinstance(password, Secret) else password
    if not value:
        return ""
    notes = []
    lines = len(value.splitlines())
    if lines > 1 or value.endswith(("\n", "\r")):
        count = max(lines, 2)
        notes.append(
            f"it spans {count} lines (a password file holds one line; only its one trailing "
            "newline is dropped)"
        )
    if value != value.rstrip(" \t") or value != value.lstrip(" \t"):
        notes.append("it starts or ends with spaces or tabs, which count as part of it")
    return "; note: the password " + " and ".join(notes) if notes else ""


def _password_bytes(password: Secret | None) -> bytes | None:
    return None if password is None else password.reveal().encode("utf-8")


def _looks_like_pkcs12(data: bytes) -> bool:
    # RFC 7292 section 4: PFX ::= SEQUENCE { version INTEGER {v3(3)}, ... }, so the DER (or BER,
    # with an indefinite length) starts 30 <length> 02 01 03.
    if len(data) < 5 or data[0] != 0x30:
        return False
    length = data[1]
    offset = 2 + (length & 0x7F if length & 0x80 else 0)
    return data[offset : offset + 3] == b"\x02\x01\x03"


def opens_without_password(data: bytes) -> bool:
    """Return True when the PKCS#12 ``data`` opens with no password."""
    try:
        pkcs12.load_key_and_certificates(data, None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False
    return True


def _password_keys(key: str) -> str:
    """Return the password keys of the table ``key`` is in ("client.pkcs12" -> client.*)."""
    table = key.rpartition(".")[0] or "client"
    return f"{table}.password_file / {table}.password_env"


def _pkcs12_failure(
    data: bytes, path: Path, key: str, secret: bytes | None, unlock_via: str | None = None
) -> str:
    unlock_via = unlock_via or _password_keys(key)
    # cryptography says "Invalid password or PKCS12 data" for every case; find out which.
    if secret is None:
        return (
            f"{key}: {path} is password-protected (or damaged); set "
            f"{unlock_via.replace(' / ', ' or ')}"
        )
    if not opens_without_password(data):
        return (
            f"{key}: wrong password for {path} ({unlock_via}), or the keystore is damaged"
            f"{password_shape(secret.decode('utf-8'))}"
        )
    return (
        f"{key}: {path} is not password-protected but a password is set ({unlock_via}); "
        "remove the password setting or protect the keystore"
    )


def _load_pem_key(
    data: bytes,
    path: Path,
    password: Secret | None,
    *,
    where: str = "client.private_key",
    unlock_via: str | None = None,
) -> PrivateKeyTypes:
    unlock_via = unlock_via or _password_keys(where)
    if b"PRIVATE KEY-----" not in data:
        if b"-----BEGIN" in data:
            raise CredentialError(f"{where}: {path} holds no PEM private key")
        raise CredentialError(
            f"{where}: {path} is not a PEM file (expected -----BEGIN PRIVATE KEY-----)"
        )
    secret = _password_bytes(password)
    try:
        return serialization.load_pem_private_key(data, secret)
    except TypeError as exc:
        if secret is None:
            message = f"{where}: {path} is encrypted; set {unlock_via.replace(' / ', ' or ')}"
        else:
            message = (
                f"{where}: {path} is not encrypted but a password is set ({unlock_via}); "
                "remove the password setting or encrypt the key"
            )
        raise CredentialError(message) from exc
    except ValueError as exc:
        if secret is not None and b"ENCRYPTED" in data:
            message = f"{where}: wrong password for {path} ({unlock_via}){password_shape(password)}"
        else:
            message = f"{where}: {path} holds a private key that cannot be read (damaged?)"
        raise CredentialError(message) from exc
    except UnsupportedAlgorithm as exc:
        raise CredentialError(
            f"{where}: {path} uses an unsupported key type or encryption"
        ) from exc


def _load_certificates(
    data: bytes, path: Path, *, where: str = "client.certificate"
) -> list[x509.Certificate]:
    try:
        if b"-----BEGIN" in data:
            if b"-----BEGIN CERTIFICATE-----" not in data:
                raise CredentialError(f"{where}: {path} holds no PEM certificate")
            return x509.load_pem_x509_certificates(data)
        # A .crt from a CA portal is sometimes DER; accept that too.
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise CredentialError(
            f"{where}: {path} is not a certificate file (expected -----BEGIN CERTIFICATE-----)"
        ) from exc


def _check_key(loaded: PrivateKeyTypes, path: Path, key: str) -> PrivateKey:
    if isinstance(loaded, rsa.RSAPrivateKey):
        if loaded.key_size >= MIN_RSA_BITS:
            return loaded
    elif isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1):
        return loaded
    raise CredentialError(
        f"{key}: {path} holds an {_describe(loaded)} key; use RSA with at least "
        f"{MIN_RSA_BITS} bits or EC P-256"
    )


def _describe(key: PrivateKeyTypes) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        return f"RSA {key.key_size}"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"EC {_CURVE_NAMES.get(key.curve.name, key.curve.name)}"
    return type(key).__name__.removesuffix("PrivateKey")


def _pick_leaf(
    private_key: PrivateKey, certificates: list[x509.Certificate]
) -> tuple[x509.Certificate, tuple[x509.Certificate, ...]] | None:
    wanted = _spki(private_key.public_key())
    for i, certificate in enumerate(certificates):
        try:
            matches = _spki(certificate.public_key()) == wanted
        except (ValueError, UnsupportedAlgorithm):
            matches = False  # a chain certificate with a key type cryptography cannot read
        if matches:
            return certificate, tuple(certificates[:i] + certificates[i + 1 :])
    return None


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def b64url(digest: bytes) -> str:
    """Return ``digest`` in unpadded base64url, as JOSE writes thumbprints (x5t)."""
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def load_setup(path: Path, environ: Mapping[str, str]) -> tuple[Config, Credentials]:
    """Load the configuration and its default client's credentials, checked as ``run`` needs.

    Every client's: ``proxy.clients.load_keyring``.
    """
    config = load_config(path, environ)
    client = config.client
    credentials = load_credentials(client)
    key = "oauth.algorithm" if client.where == "client" else f"{client.where}.algorithm"
    check_algorithm(credentials, client.algorithm, key)
    return config, credentials
