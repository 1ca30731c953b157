"""Handles to the running fakes: the authorization server and the KSZ API (upstream)."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.sandbox.authserver import FakeAuthServer
from proxy.sandbox.serve import Served
from proxy.sandbox.upstream import FakeUpstream


@dataclass(slots=True)
class AuthServerHandle:
    """A running ``FakeAuthServer`` and its URLs."""

    server: FakeAuthServer
    url: str
    token_url: str
    metadata_url: str


@dataclass(slots=True)
class UpstreamHandle:
    upstream: FakeUpstream
    served: Served

    @property
    def url(self) -> str:
        return self.served.url
