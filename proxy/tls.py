"""Own the outbound TLS contexts: always verified, TLS 1.2 or newer, system CAs plus extras."""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from proxy.credentials import Credentials


def client_context(
    ca_file: Path | None = None, *, client_credentials: Credentials | None = None
) -> ssl.SSLContext:
    """Return a verifying client context trusting the system CAs and ``ca_file``.

    With ``client_credentials`` the context presents the partner certificate for mutual TLS.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    if client_credentials is not None:
        _load_client_certificate(context, client_credentials)
    return context


def _load_client_certificate(context: ssl.SSLContext, credentials: Credentials) -> None:
    # The ssl module loads keys only from files. The key goes to a private temporary file that
    # is removed at once; it is re-encrypted with a random one-time password on the way.
    password = os.urandom(32).hex().encode()
    key_pem = credentials.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(password),
    )
    chain = [credentials.certificate, *credentials.chain]
    cert_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    with tempfile.TemporaryDirectory(prefix="ksz-proxy-") as tmp:
        key_path = Path(tmp) / "key.pem"
        cert_path = Path(tmp) / "cert.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key_pem)
        cert_path.write_bytes(cert_pem)
        context.load_cert_chain(str(cert_path), str(key_path), password=password)
