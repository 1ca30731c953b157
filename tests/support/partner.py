"""The partner the tests play: its client id and scopes, its keystore files, the auth server."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from proxy.sandbox.authserver import RegisteredClient
from proxy.sandbox.pki import Issued

CLIENT_ID: Final = "partner:test:client:confidential"


SCOPES: Final = frozenset({"scope:demo:consult", "scope:cbss:api:demo:consult"})


DEFAULT_SCOPES: Final = frozenset({"scope:demo:consult"})


PKCS12_PASSWORD: Final = "canary-p12-password"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartnerFiles:
    """The partner keystore on disk, as an operator would deploy it."""

    pkcs12: Path
    password_file: Path
    password: str


def partner_client(partner: Issued) -> RegisteredClient:
    """Return the partner's registration (CLIENT_ID, its certificate, the test scopes)."""
    return RegisteredClient(
        client_id=CLIENT_ID,
        certificate=partner.certificate,
        scopes=SCOPES,
        default_scopes=DEFAULT_SCOPES,
    )
