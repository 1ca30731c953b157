"""Own the outbound TLS contexts: always verified, TLS 1.2 or newer, system CAs plus extras."""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from proxy.credentials import Credentials


class ResumingContext(ssl.SSLContext):
    """A client context that offers each server the TLS session it last gave, to resume it.

    A resumed handshake skips the certificate exchange and its verification (the session was
    verified when it was made) and the server's signature: a new pooled connection to an
    upstream costs a fraction of a full handshake. asyncio and uvloop take no session when they
    connect, but they make every TLS object through ``wrap_bio``, which takes one; so the
    sessions are offered here. ``remember`` is told each new connection's session (TLS 1.3
    sends its tickets right after the handshake); a server that no longer knows a session just
    makes a full handshake, so a stale one costs nothing but the attempt.
    """

    _MAX_SERVERS = 64

    def __init__(self, protocol: int = ssl.PROTOCOL_TLS_CLIENT) -> None:
        super().__init__()  # SSLContext.__new__ took the protocol
        self._by_server: dict[str, ssl.SSLSession] = {}

    def remember(self, server_hostname: str, session: ssl.SSLSession) -> None:
        """Offer ``session`` on the next connections to ``server_hostname``."""
        sessions = self._by_server
        if server_hostname not in sessions and len(sessions) >= self._MAX_SERVERS:
            sessions.clear()
        sessions[server_hostname] = session

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if session is None and not server_side and isinstance(server_hostname, str):
            session = self._by_server.get(server_hostname)
        return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)


def client_context(
    ca_file: Path | None = None,
    *,
    client_credentials: Credentials | None = None,
    resume_sessions: bool = False,
) -> ssl.SSLContext:
    """Return a verifying client context trusting the system CAs and ``ca_file``.

    With ``client_credentials`` the context presents the partner certificate for mutual TLS;
    with ``resume_sessions`` it is a ``ResumingContext``. Built as
    ``ssl.create_default_context(Purpose.SERVER_AUTH)`` builds one, except that
    ``SSLKEYLOGFILE`` is never honoured: no environment variable makes the proxy write its TLS
    secrets to a file.
    """
    context_class = ResumingContext if resume_sessions else ssl.SSLContext
    context = context_class(ssl.PROTOCOL_TLS_CLIENT)
    if sys.version_info >= (3, 13):
        # What create_default_context adds since 3.13: strict RFC 5280 checks, and a ca_file
        # holding an intermediate CA is a trust anchor.
        context.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
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
