"""Own the onboarding commands around the partner's material: ``cert-info``, ``csr``, ``token``.

``check`` (the whole checklist) lives in ``proxy.check``; ``check`` here only hands over to it.

- ``csr`` makes a new private key (RSA 3072 or EC P-256, file mode 0600, optionally encrypted)
  and a PKCS#10 request to take to a public-trust CA;
- ``cert-info`` shows what a keystore or certificate holds (subject, validity, key, thumbprints)
  and exports the public certificate to send to KSZ;
- ``token`` fetches one token with the proxy's own client and describes it; the token itself is
  printed only on request.

Files are created, never overwritten (exit 2 naming the file). Passwords come from a private file,
an environment variable or a prompt, and are never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import getpass
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TextIO

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

from proxy import check as checklist
from proxy import tokens
from proxy.config import Config, Secret, config_path, load_config, read_secret_file
from proxy.credentials import Credentials, load_pem, load_pkcs12, load_setup
from proxy.errors import ConfigError, TokenUnavailable
from proxy.probes import ESB
from proxy.proof import SKEW_WARN_S, scope_label, token_advice

# Attribute names accepted in --subject (case-insensitive), as OpenSSL and CA portals write them.
SUBJECT_ATTRIBUTES: Final[Mapping[str, x509.ObjectIdentifier]] = {
    "cn": NameOID.COMMON_NAME,
    "o": NameOID.ORGANIZATION_NAME,
    "ou": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "c": NameOID.COUNTRY_NAME,
    "l": NameOID.LOCALITY_NAME,
    "st": NameOID.STATE_OR_PROVINCE_NAME,
    "emailaddress": NameOID.EMAIL_ADDRESS,
    "e": NameOID.EMAIL_ADDRESS,
    "serialnumber": NameOID.SERIAL_NUMBER,
}
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
_SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_ESCAPABLE: Final = frozenset(' "#+,;<=>\\')


def check(args: argparse.Namespace, out: TextIO) -> int:
    """Walk the onboarding steps and print a checklist."""
    return checklist.command(args, out)


# -- passwords ---------------------------------------------------------------------------------


def read_password(args: argparse.Namespace, what: str, *, confirm: bool = False) -> Secret:
    """Return the password from --password-file, --password-env, or a prompt (stdin if no TTY)."""
    if args.password_file:
        return read_secret_file(Path(args.password_file), "--password-file")
    if args.password_env:
        value = os.environ.get(args.password_env)
        if not value:
            raise ConfigError(
                f"--password-env: environment variable {args.password_env} is not set"
            )
        return Secret(value)
    stream = sys.stdin
    if stream is None or stream.closed:
        raise ConfigError(f"{what}: needed; use --password-file or --password-env")
    if stream.isatty():
        value = getpass.getpass(f"{what}: ")
        if confirm and getpass.getpass(f"{what} (again): ") != value:
            raise ConfigError(f"{what}: the two entries differ")
    else:
        # Piped in (a secret store, a script): one line, its line ending dropped.
        value = stream.readline().removesuffix("\n").removesuffix("\r")
    if not value:
        raise ConfigError(f"{what}: empty; use --password-file or --password-env")
    return Secret(value)


def _password_given(args: argparse.Namespace) -> bool:
    return bool(args.password_file or args.password_env)


# -- cert-info ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Material:
    """A certificate to describe, with its chain and, when present, the matching private key."""

    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    source: Path
    kind: str  # "PKCS#12 keystore", "PEM key and certificate", "PEM certificate", ...
    has_key: bool


def cert_info(args: argparse.Namespace, out: TextIO) -> int:
    """Describe a keystore or certificate; with --export-crt write its public certificate."""
    export = Path(args.export_crt) if args.export_crt else None
    if export is not None and (export.exists() or export.is_symlink()):
        raise ConfigError(f"--export-crt: {export} already exists; refusing to overwrite it")
    material = load_material(args)
    now = datetime.now(UTC)
    cert = material.certificate
    valid = cert.not_valid_before_utc <= now < cert.not_valid_after_utc
    for label, value in describe(material, now):
        print(f"{label:<12} {value}", file=out)
    if export is not None:
        _write_new(export, cert.public_bytes(serialization.Encoding.PEM), 0o644, "--export-crt")
        print(
            f"\nWrote {export}: the public certificate (PEM). Send it to {ESB} with "
            "the client-id you chose and the environment (test, acpt or prod) it is for.",
            file=out,
        )
    if not valid:
        print("\nThis certificate is not valid now: KSZ will refuse it.", file=out)
        return 1
    return 0


def load_material(args: argparse.Namespace) -> Material:
    """Load what cert-info describes: the config's client files, or the file named."""
    if args.file is None:
        if _password_given(args):
            raise ConfigError(
                "--password-file/--password-env: not used with a configuration (its client "
                "section names the password)"
            )
        config = load_config(config_path(args.config, os.environ), os.environ)
        client = config.client
        if client.pkcs12 is not None:
            creds = load_pkcs12(client.pkcs12, client.password)
            kind = "PKCS#12 keystore"
        elif client.private_key is not None and client.certificate is not None:
            creds = load_pem(client.private_key, client.certificate, client.password)
            kind = "PEM key and certificate"
        else:  # pragma: no cover - load_config refuses this
            raise ConfigError("client.pkcs12: required (or client.private_key and certificate)")
        return _from_credentials(creds, kind)
    path = Path(args.file)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"file: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN" in data:
        return _load_pem_file(args, path, data)
    try:
        return Material(
            certificate=x509.load_der_x509_certificate(data),
            source=path,
            kind="DER certificate",
            has_key=False,
        )
    except ValueError:
        pass
    password = None
    if _password_given(args):
        password = read_password(args, "keystore password")
    elif not _opens_without_password(data):
        password = read_password(args, f"password for {path}")
    return _from_credentials(load_pkcs12(path, password, key="file"), "PKCS#12 keystore")


def _load_pem_file(args: argparse.Namespace, path: Path, data: bytes) -> Material:
    if b"PRIVATE KEY-----" in data:
        password = None
        if _password_given(args) or b"ENCRYPTED" in data:
            password = read_password(args, f"password for the key in {path}")
        return _from_credentials(
            load_pem(path, path, password, key="cert-info", cert_key="cert-info"),
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


def _opens_without_password(data: bytes) -> bool:
    try:
        pkcs12.load_key_and_certificates(data, None)
    except (TypeError, ValueError, UnsupportedAlgorithm):
        return False
    return True


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
        ("  x5t", _b64url(sha1)),
        ("SHA-256", sha256.hex(":").upper()),
        ("  x5t#S256", _b64url(sha256)),
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


# -- csr ---------------------------------------------------------------------------------------


def csr(args: argparse.Namespace, out: TextIO) -> int:
    """Generate a private key and a PKCS#10 certificate request for a public-trust CA."""
    key_path, csr_path = Path(args.key_out), Path(args.csr_out)
    if key_path.absolute() == csr_path.absolute():
        raise ConfigError("--csr-out: must differ from --key-out")
    for option, path in (("--key-out", key_path), ("--csr-out", csr_path)):
        if path.exists() or path.is_symlink():
            raise ConfigError(f"{option}: {path} already exists; refusing to overwrite it")
    subject = parse_subject(args.subject)
    if _password_given(args) and not args.encrypt:
        raise ConfigError("--password-file/--password-env: only with --encrypt")
    password = (
        read_password(args, "password for the new private key", confirm=True)
        if args.encrypt
        else None
    )
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if args.key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        key_text = "EC P-256"
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        key_text = "RSA 3072"
    request = (
        x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password.reveal().encode("utf-8"))
        if password is not None
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    _write_new(key_path, key_pem, 0o600, "--key-out")
    try:
        _write_new(csr_path, request.public_bytes(serialization.Encoding.PEM), 0o644, "--csr-out")
    except BaseException:
        key_path.unlink(missing_ok=True)  # ours, made a moment ago: no half-done pair stays
        raise
    protection = "encrypted" if password is not None else "not encrypted"
    print(
        f"Private key  {key_path} ({key_text}, PKCS#8 PEM, {protection}, mode 0600)\n"
        f"Request      {csr_path} (PKCS#10 PEM, subject {subject.rfc4514_string()})\n"
        f"\n"
        f"Next steps\n"
        f"  1. Keep {key_path} secret and backed up: the certificate is useless without it.\n"
        f"  2. Send {csr_path} to a public-trust CA; KSZ wants one certificate per environment\n"
        f"     (test, acpt, prod). The CA sends back the certificate (.crt, PEM or DER).\n"
        f"  3. Check it:   ksz-proxy cert-info partner.crt\n"
        f"  4. Export it:  ksz-proxy cert-info partner.crt --export-crt partner-ENV.crt\n"
        f"     and send partner-ENV.crt to {ESB} with the client-id you\n"
        f"     chose; KSZ registers it and grants the scopes.\n"
        f'  5. Configure [client] id, private_key = "{key_path}", certificate = "partner.crt"\n'
        f"     (and password_file if encrypted), then run:  ksz-proxy check",
        file=out,
    )
    return 0


def parse_subject(text: str) -> x509.Name:
    """Parse an RFC 4514-like subject ("CN=...,O=...,C=BE"); refuse unknown attributes."""
    attributes: list[x509.NameAttribute[str]] = []
    for part in _split_unescaped(text, ","):
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f'--subject: "{part.strip()}" is not NAME=value')
        oid = SUBJECT_ATTRIBUTES.get(name.lower())
        if oid is None:
            raise ConfigError(
                f"--subject: unknown attribute {name} (use CN, O, OU, C, L, ST, emailAddress, "
                "serialNumber)"
            )
        value = _unescape(raw.strip(), name)
        if not value:
            raise ConfigError(f"--subject: {name} is empty")
        if oid == NameOID.COUNTRY_NAME:
            if len(value) != 2 or not value.isascii() or not value.isalpha():
                raise ConfigError(f"--subject: {name} must be a two-letter country code (BE)")
            value = value.upper()
        elif oid == NameOID.EMAIL_ADDRESS and (not value.isascii() or "@" not in value):
            raise ConfigError(f"--subject: {name} must be an ASCII e-mail address")
        elif oid == NameOID.COMMON_NAME and len(value) > 64:
            raise ConfigError(f"--subject: {name} is longer than 64 characters")
        attributes.append(x509.NameAttribute(oid, value))
    if not any(a.oid == NameOID.COMMON_NAME for a in attributes):
        raise ConfigError('--subject: CN is required (e.g. "CN=partner-acpt,O=Partner,C=BE")')
    # RFC 4514 writes the most specific attribute first; the certificate stores it last.
    return x509.Name(list(reversed(attributes)))


def _split_unescaped(text: str, separator: str) -> list[str]:
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append("\\" + char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == separator:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        raise ConfigError("--subject: ends with a lone backslash")
    parts.append("".join(current))
    return parts


def _unescape(raw: str, name: str) -> str:
    out = bytearray()
    i = 0
    while i < len(raw):
        char = raw[i]
        if char != "\\":
            out += char.encode("utf-8")
            i += 1
            continue
        pair = raw[i + 1 : i + 3]
        if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
            out.append(int(pair, 16))
            i += 3
        elif raw[i + 1 : i + 2] in _ESCAPABLE:
            out += raw[i + 1].encode("utf-8")
            i += 2
        else:
            raise ConfigError(f"--subject: {name} has an invalid escape")
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"--subject: {name} is not UTF-8 once unescaped") from None


# -- token -------------------------------------------------------------------------------------


def token(args: argparse.Namespace, out: TextIO) -> int:
    """Fetch one token with the configured client and describe it."""
    path = config_path(args.config, os.environ)
    config, credentials = load_setup(path, os.environ)
    requested = [scope for value in args.scope for scope in value.split()]
    for scope in requested:
        if not _SCOPE_TOKEN.fullmatch(scope):
            raise ConfigError(f"--scope: {scope!r} is not a valid OAuth scope")
    scopes = frozenset(requested) if requested else config.oauth.scopes
    return asyncio.run(_token(config, credentials, scopes, args.show_token, out))


async def _token(
    config: Config, credentials: Credentials, scopes: frozenset[str], show: bool, out: TextIO
) -> int:
    async with tokens.make_session(config) as session:
        provider = tokens.TokenProvider(config, credentials, session)
        try:
            fetched = await provider.get(scopes)
        except TokenUnavailable as exc:
            cause, fix = token_advice(exc, config, credentials, scopes, provider.clock_skew_s)
            code = f", {exc.oauth_error}" if exc.oauth_error else ""
            print(
                f"No token for scopes {scope_label(scopes)}: {exc.detail}\n"
                f"  reason: {exc.reason}{code}\n"
                f"  cause:  {cause}\n"
                f"  fix:    {fix}",
                file=out,
            )
            return 1
        finally:
            await provider.close()
    expires = datetime.fromtimestamp(fetched.expires_at_wall, UTC)
    lines = [
        ("token endpoint", provider.token_url or "-"),
        ("scopes asked", scope_label(scopes)),
        ("scope granted", fetched.granted_scope or "(not stated)"),
        ("token type", "Bearer"),
        ("expires in", f"{fetched.expires_in_s} s (at {expires:%Y-%m-%d %H:%M:%S} UTC)"),
    ]
    skew = provider.clock_skew_s
    if skew is not None:
        note = " -- synchronise the clock (NTP)" if abs(skew) > SKEW_WARN_S else ""
        lines.append(("clock skew", f"{skew:+.1f} s against the token endpoint{note}"))
    decoded = decode_jwt(fetched.value)
    if decoded is None:
        lines.append(("format", "opaque (not a JWT)"))
    else:
        header, claims = decoded
        lines.append(("format", "JWT (decoded below, signature not verified)"))
        lines.append(("JWT header", json.dumps(header, indent=2, sort_keys=True)))
        shown = json.dumps(claims, indent=2, sort_keys=True) if claims is not None else "(not JSON)"
        lines.append(("JWT claims", shown))
    lines.append(("token", fetched.value if show else "(not shown; add --show-token)"))
    for label, value in lines:
        print(f"{label:<15} {value}".replace("\n", "\n" + " " * 16), file=out)
    return 0


def decode_jwt(value: str) -> tuple[dict[str, Any], dict[str, Any] | None] | None:
    """Return a JWT's header and claims (unverified), or None when ``value`` is not a JWT."""
    parts = value.split(".")
    if len(parts) != 3:
        return None
    header = _b64url_json(parts[0])
    if header is None:
        return None
    return header, _b64url_json(parts[1])


# -- helpers -----------------------------------------------------------------------------------


def _b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def _b64url_json(part: str) -> dict[str, Any] | None:
    try:
        raw = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _write_new(path: Path, data: bytes, mode: int, option: str) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{option}: {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot create {path} ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask must not loosen (or tighten) the mode asked
        fh.write(data)
