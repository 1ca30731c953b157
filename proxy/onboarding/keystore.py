"""Own the ``keystore`` command: a PEM key and its certificate -> the PKCS#12 file deployments use.

``csr`` leaves the partner with a PEM private key and, once the CA has answered, a certificate;
every deployment example (``config/``, compose, Kubernetes, systemd) reads a PKCS#12 keystore
with its password in a file. This command joins the two ends:

- it loads the key and the certificate exactly as the proxy would (file modes, key type and size,
  the key and certificate belonging together, validity now), so a keystore it writes is one the
  proxy accepts;
- the keystore password comes from ``--password-file``: an existing file (mode 0600 or 0400) is
  used as it is; a missing one is created (mode 0600) holding a new random password;
- the keystore is written with mode 0600, never over an existing file, encrypted with
  AES-256-CBC under PBKDF2 (PBES2) and a SHA-256 MAC, then read back to prove it opens.

Errors name the option and the file, never a password.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TextIO

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import PrivateFormat, pkcs12

from proxy.credentials import check_validity, load_pem, load_pkcs12
from proxy.errors import ConfigError
from proxy.onboarding.files import refuse_existing, write_new
from proxy.secret import Secret, read_secret_file

_KDF_ROUNDS = 100_000


def keystore(
    *,
    key: str,
    cert: str,
    keystore_out: str,
    password_file: str,
    key_password_file: str | None,
    out: TextIO,
) -> int:
    """Write a PKCS#12 keystore holding the key, its certificate and any chain."""
    key_path, cert_path, out_path = Path(key), Path(cert), Path(keystore_out)
    password_path = Path(password_file)
    refuse_existing(out_path, "--out")
    if out_path.absolute() in {key_path.absolute(), cert_path.absolute()}:
        raise ConfigError("--out: must differ from --key and --cert")
    key_password = (
        read_secret_file(Path(key_password_file), "--key-password-file")
        if key_password_file
        else None
    )
    creds = load_pem(
        key_path,
        cert_path,
        key_password,
        key="--key",
        cert_key="--cert",
        unlock_via="--key-password-file",
    )
    check_validity(creds)
    created = not (password_path.exists() or password_path.is_symlink())
    password = (
        _new_password(password_path)
        if created
        else read_secret_file(password_path, "--password-file")
    )
    encryption = (
        PrivateFormat.PKCS12.encryption_builder()
        .kdf_rounds(_KDF_ROUNDS)
        .key_cert_algorithm(pkcs12.PBES.PBESv2SHA256AndAES256CBC)
        .hmac_hash(hashes.SHA256())
        .build(password.reveal().encode("utf-8"))
    )
    name = creds.certificate.subject.rfc4514_string().encode("utf-8")
    data = pkcs12.serialize_key_and_certificates(
        name, creds.private_key, creds.certificate, list(creds.chain) or None, encryption
    )
    write_new(out_path, data, 0o600, "--out")
    try:
        load_pkcs12(out_path, password, key="--out")
    except BaseException:
        out_path.unlink(missing_ok=True)  # ours, made a moment ago: never leave a bad keystore
        raise
    made = "created now, holding a new random password" if created else "as given"
    print(
        f"Keystore     {out_path} (PKCS#12, mode 0600, AES-256 / PBKDF2-SHA256)\n"
        f"  subject    {creds.subject}\n"
        f"  valid to   {creds.not_after:%Y-%m-%d} ({creds.days_left()} days left)\n"
        f"  key        {creds.key_description}; {len(creds.chain)} chain certificate(s)\n"
        f"Password     {password_path} ({made}, mode 0600)\n"
        f"\n"
        f"In ksz-proxy.toml:\n"
        f"  [client]\n"
        f'  pkcs12 = "{out_path}"\n'
        f'  password_file = "{password_path}"\n'
        f"Deployments want these two files owned by the proxy's user with mode 0400 "
        f"(docs/deployment.md).",
        file=out,
    )
    return 0


def _new_password(path: Path) -> Secret:
    """Create ``path`` (mode 0600) holding a new random password, and return the password."""
    value = secrets.token_urlsafe(32)
    write_new(path, (value + "\n").encode("ascii"), 0o600, "--password-file")
    return Secret(value)
