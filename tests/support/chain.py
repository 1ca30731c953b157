"""Start the whole chain for end-to-end tests: fake auth server, fake upstream, the proxy."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import RunningProxy, start
from proxy.config import Config, parse_config
from proxy.credentials import load_credentials
from proxy.sandbox.serve import Served, serve
from proxy.sandbox.upstream import FakeUpstream
from tests.conftest import CLIENT_ID, AuthServerHandle, PartnerFiles

DEMO = "/REST/demo/v1"
OTHER = "/REST/other/v2"


@dataclass(slots=True)
class UpstreamHandle:
    upstream: FakeUpstream
    served: Served

    @property
    def url(self) -> str:
        return self.served.url


@dataclass(slots=True)
class Chain:
    """A running proxy with the fakes behind it."""

    proxy: RunningProxy
    config: Config
    auth: AuthServerHandle
    upstream: FakeUpstream
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.proxy.proxy_url

    @property
    def port(self) -> int:
        return int(self.proxy.proxy_url.rsplit(":", 1)[1])

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request through the proxy (target sent byte-exact)."""
        from yarl import URL

        return self.session.request(
            method, URL(self.url + path, encoded=True), allow_redirects=False, **kwargs
        )

    async def wait_ready(self, timeout_s: float = 10.0) -> None:
        admin = self.proxy.admin_url
        async with asyncio.timeout(timeout_s):
            while True:
                async with self.session.get(admin + "/readyz") as response:
                    if response.status == 200:
                        return
                await asyncio.sleep(0.02)


def chain_config(
    auth: AuthServerHandle,
    upstream_url: str,
    files: PartnerFiles,
    ca_file: Path,
    **sections: dict[str, Any],
) -> Config:
    """Return a proxy config pointing at the fakes; ``sections`` override/extend tables."""
    data: dict[str, Any] = {
        "client": {
            "id": CLIENT_ID,
            "pkcs12": str(files.pkcs12),
            "password_file": str(files.password_file),
        },
        "oauth": {
            "token_url": auth.token_url,
            "ca_file": str(ca_file),
            "retry_initial_s": 0.05,
            "retry_max_s": 0.2,
        },
        "upstream": {"url": upstream_url, "ca_file": str(ca_file)},
        "listen": {"port": 0},
        "admin": {"port": 0},
        "routes": [
            {"prefix": DEMO, "scopes": ["scope:demo:consult"]},
            {"prefix": OTHER, "scopes": ["scope:cbss:api:demo:consult"]},
        ],
    }
    for name, table in sections.items():
        if name == "routes":
            data["routes"] = table
        else:
            target = data.setdefault(name, {})
            target.update(table)
            for key in [k for k, v in table.items() if v is None]:
                del target[key]  # None removes a key
    return parse_config(data, {})


ChainFactory = Callable[..., Awaitable[Chain]]


@pytest.fixture
async def fake_upstream(
    authserver: AuthServerHandle, server_ssl: ssl.SSLContext
) -> AsyncIterator[UpstreamHandle]:
    upstream = FakeUpstream(introspect=authserver.server.introspect)
    served = await serve(upstream.make_app(), ssl_context=server_ssl)
    try:
        yield UpstreamHandle(upstream=upstream, served=served)
    finally:
        await served.close()


@pytest.fixture
async def make_chain(
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
) -> AsyncIterator[ChainFactory]:
    started: list[Chain] = []

    async def factory(*, ready: bool = True, drain_s: float = 2.0, **sections: Any) -> Chain:
        config = chain_config(authserver, fake_upstream.url, partner_files, ca_file, **sections)
        running = await start(config, load_credentials(config.client), drain_s=drain_s)
        session = aiohttp.ClientSession(auto_decompress=False)
        chain = Chain(
            proxy=running,
            config=config,
            auth=authserver,
            upstream=fake_upstream.upstream,
            session=session,
        )
        started.append(chain)
        if ready:
            await chain.wait_ready()
        return chain

    yield factory
    for chain in started:
        await chain.session.close()
        await chain.proxy.close()


@pytest.fixture
async def chain(make_chain: ChainFactory) -> Chain:
    return await make_chain()
