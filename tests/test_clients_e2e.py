"""Two client identities end to end (SECURITY.md 49): RSA and EC P-256, each route its own tokens.

The fake authorization server registers two clients with different certificates: the partner's
RSA one (``[client]``, the client named "default") and an EC P-256 one (``[[clients]]`` "daas").
The fake upstream records which client each request's token was issued to, so the tests assert
what reached KSZ: every route's requests carried a token of the route's client, never the other's,
and one client's failing credentials leave the other client's routes served.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.admin import CLIENT_TOKENS, RELOAD_ERRORS
from proxy.clients import load_keyring
from proxy.config import Config, load_config
from proxy.sandbox.authserver import RegisteredClient
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream
from proxy.server import RunningProxy, reload_config, start
from tests.support.fakes import AuthServerHandle
from tests.support.partner import CLIENT_ID, PartnerFiles
from tests.support.process import run_proxy, wait_ready

DAAS_ID: Final = "other:daas:client:confidential"
DAAS_SCOPE: Final = "scope:daas:consult"
DEMO: Final = "/REST/demo/v1"
OTHER: Final = "/REST/other/v2"
DAAS: Final = "/REST/daas/v1"
ROUTE_CLIENT: Final = {DEMO: CLIENT_ID, OTHER: CLIENT_ID, DAAS: DAAS_ID}


@pytest.fixture(scope="module")
def ec_partner(partner_ca: CertificateAuthority) -> Issued:
    return partner_ca.issue_client("daas partner", key_type="ec")


@dataclass(slots=True)
class Two:
    """A running proxy with two clients, the fakes behind it and a session to call it."""

    proxy: RunningProxy
    config: Config
    auth: AuthServerHandle
    upstream: FakeUpstream
    session: aiohttp.ClientSession
    config_file: Path

    async def call(self, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
        async with self.session.request(
            method, self.proxy.proxy_url + path, allow_redirects=False, **kwargs
        ) as response:
            return response.status, await response.read()

    async def admin(self, path: str) -> tuple[int, bytes]:
        async with self.session.get(self.proxy.admin_url + path) as response:
            return response.status, await response.read()

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        _status, body = await self.admin("/metrics")
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(body.decode())
            for sample in family.samples
        }

    async def wait(self, path: str, status: int, timeout_s: float = 10.0) -> None:
        async with asyncio.timeout(timeout_s):
            while True:
                if (await self.admin(path))[0] == status:
                    return
                await asyncio.sleep(0.02)


async def until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout_s``."""
    async with asyncio.timeout(timeout_s):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def config_text(
    auth: AuthServerHandle, upstream_url: str, files: PartnerFiles, ca_file: Path, tmp: Path
) -> str:
    return f"""
[client]
id = "{CLIENT_ID}"
pkcs12 = "{files.pkcs12}"
password_file = "{files.password_file}"

[[clients]]
name = "daas"
id = "{DAAS_ID}"
private_key = "{tmp / "daas.key"}"
certificate = "{tmp / "daas.crt"}"
algorithm = "ES256"
key_id = "x5t#S256"
scopes = ["{DAAS_SCOPE}"]

[oauth]
token_url = "{auth.token_url}"
ca_file = "{ca_file}"
retry_initial_s = 0.05
retry_max_s = 0.2

[upstream]
url = "{upstream_url}"
ca_file = "{ca_file}"

[listen]
port = 0

[admin]
port = 0

[[routes]]
prefix = "{DEMO}"
scopes = ["scope:demo:consult"]

[[routes]]
prefix = "{OTHER}"
scopes = ["scope:cbss:api:demo:consult"]

[[routes]]
prefix = "{DAAS}"
client = "daas"
"""


def register_daas(auth: AuthServerHandle, ec_partner: Issued) -> None:
    auth.server.register(
        RegisteredClient(
            client_id=DAAS_ID,
            certificate=ec_partner.certificate,
            scopes=frozenset({DAAS_SCOPE}),
            default_scopes=frozenset({DAAS_SCOPE}),
        )
    )


@dataclass(slots=True)
class Setup:
    """The configuration file of two clients and the fake upstream it points at."""

    path: Path
    upstream: FakeUpstream


@pytest.fixture
async def setup(
    authserver: AuthServerHandle,
    partner_files: PartnerFiles,
    ec_partner: Issued,
    ca_file: Path,
    server_ssl: ssl.SSLContext,
    tmp_path: Path,
) -> AsyncIterator[Setup]:
    upstream = FakeUpstream(
        introspect=authserver.server.introspect, client_of=authserver.server.client_of
    )
    served = await serve(upstream.make_app(), ssl_context=server_ssl)
    ec_partner.write_pem(tmp_path / "daas.key", tmp_path / "daas.crt")
    path = tmp_path / "ksz-proxy.toml"
    path.write_text(config_text(authserver, served.url, partner_files, ca_file, tmp_path))
    try:
        yield Setup(path=path, upstream=upstream)
    finally:
        await served.close()


@pytest.fixture
async def two(authserver: AuthServerHandle, setup: Setup) -> AsyncIterator[Two]:
    config = load_config(setup.path, {})
    session = aiohttp.ClientSession()
    proxy: RunningProxy | None = None
    try:
        proxy = await start(config, load_keyring(config), drain_s=1.0)
        yield Two(proxy, config, authserver, setup.upstream, session, setup.path)
    finally:
        if proxy is not None:
            await proxy.close()
        await session.close()


def issued_to(two: Two, client_id: str) -> list[str]:
    """Return the outcomes of the token requests ``client_id`` made."""
    return [r.outcome for r in two.auth.server.requests_from(client_id)]


# -- SECURITY.md 49: a token only on its own client's routes -------------------------------------


async def test_each_route_carries_a_token_of_its_own_client(
    two: Two, ec_partner: Issued, partner: Issued
) -> None:
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    paths = [f"{prefix}/item/{i}" for i in range(8) for prefix in (DEMO, OTHER, DAAS)]
    answers = await asyncio.gather(*(two.call("GET", path) for path in paths))
    assert [status for status, _ in answers] == [200] * len(paths)
    seen = two.upstream.clients_seen()
    assert sorted(path for path, _ in seen) == sorted(paths)
    for path, client_id in seen:
        assert client_id == ROUTE_CLIENT[path.rsplit("/item/", 1)[0]], path
    # Each client signed its own assertions: RS256 with the RSA key, ES256 with the EC one.
    for record in two.auth.server.requests_from(DAAS_ID):
        assert record.assertion_header is not None
        assert record.assertion_header["alg"] == "ES256"
        assert record.form["scope"] == DAAS_SCOPE
    for record in two.auth.server.requests_from(CLIENT_ID):
        assert record.assertion_header is not None
        assert record.assertion_header["alg"] == "RS256"
    # Single flight per (client, scope set): three token requests for three pairs.
    assert issued_to(two, DAAS_ID) == ["issued"]
    assert issued_to(two, CLIENT_ID) == ["issued", "issued"]
    # The tokens the upstream saw are the ones issued to the route's client, none other.
    daas_tokens = {t for t, i in two.auth.server.issued.items() if i.client_id == DAAS_ID}
    for seen_request in two.upstream.seen:
        [authorization] = seen_request.header_values("Authorization")
        token = authorization.removeprefix("Bearer ")
        is_daas = seen_request.target.startswith(DAAS + "/")
        assert (token in daas_tokens) == is_daas, seen_request.target


async def test_a_401_refetches_only_the_routes_own_client_token(
    two: Two, ec_partner: Issued
) -> None:
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    [daas_token] = [t for t, i in two.auth.server.issued.items() if i.client_id == DAAS_ID]
    two.upstream.reject_token(daas_token)
    default_requests = len(issued_to(two, CLIENT_ID))
    status, _ = await two.call("POST", DAAS + "/submit", data=b'{"a": 1}')
    assert status == 200
    assert two.upstream.clients_seen()[-2:] == [(DAAS + "/submit", DAAS_ID)] * 2
    assert issued_to(two, DAAS_ID) == ["issued", "issued"]
    assert len(issued_to(two, CLIENT_ID)) == default_requests
    status, _ = await two.call("GET", DEMO + "/after")
    assert status == 200
    assert two.upstream.clients_seen()[-1] == (DEMO + "/after", CLIENT_ID)


async def test_one_clients_failing_credentials_leave_the_others_routes_served(
    two: Two,
) -> None:
    # The daas client is not registered: the token endpoint refuses its assertions.
    await until(lambda: "invalid_client" in issued_to(two, DAAS_ID))
    for path in (DEMO + "/a", OTHER + "/b"):
        status, _ = await two.call("GET", path)
        assert status == 200
    status, body = await two.call("GET", DAAS + "/c")
    assert status == 503
    assert json.loads(body)["status"] == 503
    # Nothing reached the daas API: no request without a token, none with another's token.
    assert two.upstream.clients_seen() == [(DEMO + "/a", CLIENT_ID), (OTHER + "/b", CLIENT_ID)]
    assert (await two.admin("/readyz"))[0] == 503
    status, body = await two.admin("/health")
    health = json.loads(body)
    assert (status, health["status"]) == (503, "DOWN")
    clients = health["details"]["clients"]
    assert clients["daas"]["tokens"]["scope:daas:consult"]["usable"] is False
    assert clients["daas"]["tokens"]["scope:daas:consult"]["lastError"] == "rejected"
    assert all(t["usable"] for t in clients["default"]["tokens"].values())
    metrics = await two.metrics()
    rejected = ("kszproxy_token_requests_total", {"client": "daas", "outcome": "rejected"})
    assert metrics[(rejected[0], frozenset(rejected[1].items()))] >= 1
    default_rejected = frozenset({"client": "default", "outcome": "rejected"}.items())
    assert metrics[("kszproxy_token_requests_total", default_rejected)] == 0


async def test_health_metrics_and_readiness_cover_every_client(
    two: Two, ec_partner: Issued, partner: Issued
) -> None:
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    status, body = await two.admin("/health")
    health = json.loads(body)
    assert (status, health["status"]) == (200, "UP")
    clients = health["details"]["clients"]
    assert list(clients) == ["default", "daas"]
    assert clients["daas"]["clientId"] == DAAS_ID
    assert clients["daas"]["certificate"]["notAfter"].startswith(
        ec_partner.certificate.not_valid_after_utc.isoformat(timespec="seconds")[:16]
    )
    metrics = await two.metrics()
    for name, issued in (("default", partner), ("daas", ec_partner)):
        key = ("kszproxy_certificate_expiry_timestamp_seconds", frozenset({("client", name)}))
        assert metrics[key] == issued.certificate.not_valid_after_utc.timestamp()
    expiry = {
        dict(labels)["client"]: value
        for (metric, labels), value in metrics.items()
        if metric == "kszproxy_token_expiry_timestamp_seconds"
    }
    assert set(expiry) == {"default", "daas"}
    assert all(value > 0 for value in expiry.values())
    body_text = body.decode()
    for token in two.auth.server.issued:
        assert token not in body_text


async def test_a_reload_with_one_bad_keystore_keeps_that_clients_credentials(
    two: Two, ec_partner: Issued, partner_ca: CertificateAuthority, tmp_path: Path
) -> None:
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    providers = two.proxy.admin_app[CLIENT_TOKENS]
    before = providers["default"].status()
    # The daas key file is broken; the default client's keystore is the same, still fine.
    (tmp_path / "daas.key").write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n")
    requests_before = len(two.auth.server.requests)
    assert reload_config(two.proxy, environ={}) is False
    reload_errors = two.proxy.admin_app[RELOAD_ERRORS]
    assert set(reload_errors) == {"daas"}
    assert reload_errors["daas"].startswith("clients[0].private_key: ")
    # The default client reloaded (fresh tokens asked with its material); daas kept its own.
    await until(lambda: len(issued_to(two, CLIENT_ID)) >= 4)
    assert all(
        r.claims and r.claims["iss"] == CLIENT_ID
        for r in two.auth.server.requests[requests_before:]
    )
    assert two.proxy.client_tokens["daas"].credentials.subject.endswith("daas partner")
    for path in (DEMO + "/x", DAAS + "/y"):
        status, _ = await two.call("GET", path)
        assert status == 200
    assert two.upstream.clients_seen()[-2:] == [(DEMO + "/x", CLIENT_ID), (DAAS + "/y", DAAS_ID)]
    status, body = await two.admin("/health")
    health = json.loads(body)
    assert health["details"]["clients"]["daas"]["reloadError"].startswith("clients[0].private_key")
    assert health["details"]["clients"]["default"]["reloadError"] is None
    assert len(before) == 2
    # Whole-config reload (issue 16): a reload that kept a client's credentials counts as failed
    # and names that client's key, while the rest of the file took effect.
    config = health["details"]["config"]
    assert (config["lastReload"], config["failingKey"]) == ("failure", "clients[0].private_key")
    metrics = await two.metrics()
    failure = ("kszproxy_config_reloads_total", frozenset({("outcome", "failure")}))
    assert metrics[failure] == 1


async def test_a_reload_gives_a_new_client_id_a_new_provider_and_keeps_the_others(
    two: Two, ec_partner: Issued
) -> None:
    # Whole-config reload (issue 16) with several clients (issue 15): the daas client's id
    # changes, so it gets a new token provider; the default client keeps its provider (and its
    # cached tokens) and only signs anew; a new route of the daas client serves at once.
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    providers = two.proxy.admin_app[CLIENT_TOKENS]
    default, daas = providers["default"], providers["daas"]
    new_id = "other:daas2:client:confidential"
    two.auth.server.register(
        RegisteredClient(
            client_id=new_id,
            certificate=ec_partner.certificate,
            scopes=frozenset({DAAS_SCOPE}),
            default_scopes=frozenset({DAAS_SCOPE}),
        )
    )
    text = two.config_file.read_text().replace(DAAS_ID, new_id)
    text += '\n[[routes]]\nprefix = "/REST/daas/v2"\nclient = "daas"\n'
    two.config_file.write_text(text)
    assert reload_config(two.proxy, environ={}) is True
    assert providers["default"] is default
    assert providers["daas"] is not daas
    assert providers["daas"].client.id == new_id
    for path, client_id in (
        (DAAS + "/a", new_id),
        ("/REST/daas/v2/b", new_id),
        (DEMO + "/c", CLIENT_ID),
    ):
        status, _ = await two.call("GET", path)
        assert status == 200, path
        assert two.upstream.clients_seen()[-1] == (path, client_id)
    status, body = await two.admin("/health")
    details = json.loads(body)["details"]
    assert details["clients"]["daas"]["clientId"] == new_id
    assert details["clients"]["daas"]["reloadError"] is None
    assert (details["config"]["lastReload"], details["config"]["failingKey"]) == ("success", None)


async def test_a_refused_reload_switches_no_client(
    two: Two, ec_partner: Issued, tmp_path: Path
) -> None:
    # Found by review: a new client id together with a CA file that holds no certificate got
    # as far as swapping the daas provider before the TLS context failed; the old config kept
    # serving beside a provider of another client-id (SECURITY 49, 51). Now the file is refused
    # whole, before anything is switched.
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    providers = two.proxy.admin_app[CLIENT_TOKENS]
    before = dict(providers)
    junk = tmp_path / "junk-ca.pem"
    junk.write_text("not a certificate\n")
    text = two.config_file.read_text().replace(DAAS_ID, "other:daas2:client:confidential")
    head, _, upstream = text.partition("[upstream]")
    upstream = re.sub(r'ca_file = "[^"]*"', f'ca_file = "{junk}"', upstream, count=1)
    text = head + "[upstream]" + upstream
    two.config_file.write_text(text)
    assert reload_config(two.proxy, environ={}) is False
    assert providers == before
    status, _ = await two.call("GET", DAAS + "/a")
    assert status == 200
    assert two.upstream.clients_seen()[-1] == (DAAS + "/a", DAAS_ID)
    status, body = await two.admin("/health")
    config = json.loads(body)["details"]["config"]
    assert (config["lastReload"], config["failingKey"]) == ("failure", "upstream.ca_file")


async def test_a_route_removed_by_a_reload_stops_its_token_refresh_and_series(
    two: Two, ec_partner: Issued
) -> None:
    # Found by review: a scope set no route used any more kept its refresh task (fetching for
    # ever, even if KSZ had revoked the scope) and its token expiry series (and so the alerts).
    register_daas(two.auth, ec_partner)
    await two.wait("/readyz", 200)
    other = frozenset({"scope:cbss:api:demo:consult"})
    default = two.proxy.admin_app[CLIENT_TOKENS]["default"]
    assert other in {status.scopes for status in default.status()}
    text = two.config_file.read_text()
    text = text.replace(
        f'[[routes]]\nprefix = "{OTHER}"\nscopes = ["scope:cbss:api:demo:consult"]\n', ""
    )
    two.config_file.write_text(text)
    assert reload_config(two.proxy, environ={}) is True
    assert default is two.proxy.admin_app[CLIENT_TOKENS]["default"]
    assert other not in {status.scopes for status in default.status()}
    requests = len(two.auth.server.requests)
    default.replace_credentials(default.credentials)  # what a SIGHUP with new keys does
    await asyncio.sleep(0.3)
    asked = [r.form.get("scope", "") for r in two.auth.server.requests[requests:]]
    assert asked  # the scope sets still in use were fetched anew
    assert "scope:cbss:api:demo:consult" not in asked
    expiry = [
        dict(labels)
        for name, labels in await two.metrics()
        if name == "kszproxy_token_expiry_timestamp_seconds"
    ]
    assert {"client": "default", "scopes": "scope:demo:consult"} in expiry
    assert not [e for e in expiry if e["scopes"] == "scope:cbss:api:demo:consult"]


# -- workers: each worker holds every client's tokens ---------------------------------------------


@pytest.mark.slow
async def test_every_worker_holds_every_clients_tokens(
    setup: Setup, authserver: AuthServerHandle, ec_partner: Issued
) -> None:
    register_daas(authserver, ec_partner)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    text = setup.path.read_text().replace(
        "[listen]\nport = 0\n", f"[listen]\nport = {port}\nworkers = 2\n"
    )
    setup.path.write_text(text)
    async with run_proxy(setup.path) as proxy, aiohttp.ClientSession() as session:
        await wait_ready(session, proxy)
        for i in range(12):
            for prefix in (DEMO, DAAS):
                # A new connection each time: SO_REUSEPORT spreads connections over workers.
                async with aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True)
                ) as fresh:
                    async with fresh.get(f"{proxy.proxy_url}{prefix}/w/{i}") as response:
                        assert response.status == 200
        for path, client_id in setup.upstream.clients_seen():
            assert client_id == ROUTE_CLIENT[path.rsplit("/w/", 1)[0]], path
        # Per worker: the default client's two scope sets, the daas client's one.
        assert issued_to_server(authserver, CLIENT_ID) == ["issued"] * 4
        assert issued_to_server(authserver, DAAS_ID) == ["issued"] * 2
        proxy.send(signal.SIGHUP)
        await until(lambda: sum(e["message"] == "credentials reloaded" for e in proxy.entries) == 4)
        reloaded = {e["client"] for e in proxy.entries if e["message"] == "credentials reloaded"}
        assert reloaded == {"default", "daas"}
        proxy.send(signal.SIGTERM)
        assert await proxy.exit_code() == 0


def issued_to_server(auth: AuthServerHandle, client_id: str) -> list[str]:
    return [r.outcome for r in auth.server.requests_from(client_id)]
