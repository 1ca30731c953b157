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

from proxy.config import Config
from proxy.credentials import load_credentials
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream
from proxy.server import RunningProxy, start
from tests.support.config import chain_config, write_config
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.partner import PartnerFiles


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


ChainFactory = Callable[..., Awaitable[Chain]]
ConfigWriter = Callable[..., Path]


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


@pytest.fixture
def config_writer(
    tmp_path: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
) -> ConfigWriter:
    """Return ``write(name, *, pkcs12=None, **changes)``: a config file for the fakes."""

    def write(name: str = "ksz-proxy.toml", *, pkcs12: Path | None = None, **changes: Any) -> Path:
        return write_config(
            tmp_path / name,
            authserver=authserver,
            upstream=fake_upstream,
            ca_file=ca_file,
            pkcs12=pkcs12 or partner_files.pkcs12,
            password_file=partner_files.password_file,
            **changes,
        )

    return write
