"""Own ``ksz-proxy csr``: a new private key and a PKCS#10 request to take to a public-trust CA.

The key is RSA 3072 or EC P-256, written PKCS#8 PEM with file mode 0600, encrypted on request.
Neither file is ever overwritten; when the request cannot be written, the new key is removed.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Final, Literal, TextIO

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.errors import ConfigError
from proxy.onboarding.files import PasswordSource, refuse_existing, write_new
from proxy.onboarding.probes import ESB

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
_ESCAPABLE: Final = frozenset(' "#+,;<=>\\/')


def csr(
    *,
    subject: str,
    key_type: Literal["rsa", "ec"],
    key_out: str,
    csr_out: str,
    encrypt: bool,
    password: PasswordSource,
    out: TextIO,
) -> int:
    """Generate a private key and a PKCS#10 certificate request for a public-trust CA."""
    key_path, csr_path = Path(key_out), Path(csr_out)
    if key_path.absolute() == csr_path.absolute():
        raise ConfigError("--csr-out: must differ from --key-out")
    refuse_existing(key_path, "--key-out")
    refuse_existing(csr_path, "--csr-out")
    name = parse_subject(subject)
    if password.given and not encrypt:
        raise ConfigError("--password-file/--password-env: only with --encrypt")
    secret = password.read("password for the new private key", confirm=True) if encrypt else None
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
        key_text = "EC P-256"
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
        key_text = "RSA 3072"
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(secret.reveal().encode("utf-8"))
        if secret is not None
        else serialization.NoEncryption()
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    write_new(key_path, key_pem, 0o600, "--key-out")
    try:
        write_new(csr_path, request.public_bytes(serialization.Encoding.PEM), 0o644, "--csr-out")
    except BaseException:
        key_path.unlink(missing_ok=True)  # ours, made a moment ago: no half-done pair stays
        raise
    protection = "encrypted" if secret is not None else "not encrypted"
    crt = key_path.with_suffix(".crt")
    p12 = key_path.with_suffix(".p12")
    p12_password = p12.with_suffix(".password")
    key_password = (
        f" --key-password-file {password.file or 'KEY-PASSWORD-FILE'}" if secret is not None else ""
    )
    print(
        f"Private key  {key_path} ({key_text}, PKCS#8 PEM, {protection}, mode 0600)\n"
        f"Request      {csr_path} (PKCS#10 PEM, subject {name.rfc4514_string()})\n"
        f"\n"
        f"Next steps\n"
        f"  1. Keep {key_path} secret and backed up: the certificate is useless without it.\n"
        f"  2. Send {csr_path} to a public-trust CA; KSZ wants one certificate per environment\n"
        f"     (test, acpt, prod). Save the certificate it sends back (PEM or DER) as {crt}.\n"
        f"  3. Check it:   ksz-proxy cert-info {crt}\n"
        f"  4. Export it:  mkdir -p to-ksz && ksz-proxy cert-info {crt} --export-crt "
        f"to-ksz/{crt.name}\n"
        f"     and send to-ksz/{crt.name} to {ESB} with the client-id you\n"
        f"     chose; KSZ registers it and grants the scopes.\n"
        f"  5. Build the keystore the deployment examples read:\n"
        f"     ksz-proxy keystore --key {key_path} --cert {crt} --out {p12} \\\n"
        f"         --password-file {p12_password}{key_password}\n"
        f'  6. Configure [client] id, pkcs12 = "{p12}", password_file = "{p12_password}",\n'
        f"     then run:  ksz-proxy check -c ksz-proxy.toml",
        file=out,
    )
    return 0


def parse_subject(text: str) -> x509.Name:
    """Parse a subject, RFC 4514-like ("CN=x,O=y,C=BE") or OpenSSL-style ("/C=BE/O=y/CN=x").

    Unknown attributes are refused.
    """
    # OpenSSL's -subj form lists the attributes in certificate order, most general first.
    openssl = text.lstrip().startswith("/")
    parts = _split_unescaped(text.lstrip()[1:], "/") if openssl else _split_unescaped(text, ",")
    attributes: list[x509.NameAttribute[str]] = []
    for part in parts:
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
    return x509.Name(attributes if openssl else list(reversed(attributes)))


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
