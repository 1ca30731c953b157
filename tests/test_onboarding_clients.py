"""`check` and `token` with several clients: steps 1 and 5 per client, the network once."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

import pytest

from proxy.cli import main
from proxy.onboarding import check as checklist
from proxy.sandbox.authserver import FakeAuthServer, RegisteredClient
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.serve import serve
from proxy.sandbox.upstream import FakeUpstream
from tests.support.ownloop import OnOwnLoop, on_own_loop

# main() points the root logger at the stderr of the moment (capsys's); it is put back.
pytestmark = pytest.mark.usefixtures("keep_logging")

DEFAULT_ID: Final = "other:consult:client:confidential"
DAAS_ID: Final = "other:daas:client:confidential"
DEMO: Final = "/REST/demo/v1"
DAAS: Final = "/REST/daas/v1"
PASSWORD: Final = "canary-Onboarding-Pa55-93f1"
T = TypeVar("T")


@dataclass(slots=True, kw_only=True)
class Fakes(OnOwnLoop):
    auth: FakeAuthServer
    token_url: str
    upstream: FakeUpstream
    upstream_url: str
    rsa: Issued
    ec: Issued

    def call_seen(self) -> list[tuple[str, str | None]]:
        return self.call(self.upstream.clients_seen)


@pytest.fixture(scope="module")
def fakes(server_ssl: ssl.SSLContext) -> Iterator[Fakes]:
    """Run the fakes on a loop of their own: the commands run theirs with asyncio.run."""
    ca = CertificateAuthority("Onboarding Clients CA")
    rsa, ec = ca.issue_client("consult"), ca.issue_client("daas", key_type="ec")

    async def run(ready: Callable[[Fakes], None]) -> None:
        auth = FakeAuthServer(
            clients=[
                RegisteredClient(
                    client_id=client_id,
                    certificate=issued.certificate,
                    scopes=frozenset({scope}),
                    default_scopes=frozenset({scope}),
                )
                for client_id, issued, scope in (
                    (DEFAULT_ID, rsa, "scope:demo:consult"),
                    (DAAS_ID, ec, "scope:daas:consult"),
                )
            ]
        )
        upstream = FakeUpstream(introspect=auth.introspect, client_of=auth.client_of)
        auth_served = await serve(auth.make_app(), ssl_context=server_ssl)
        upstream_served = await serve(upstream.make_app(), ssl_context=server_ssl)
        stop = asyncio.Event()
        try:
            ready(
                Fakes(
                    loop=asyncio.get_running_loop(),
                    stop=stop,
                    auth=auth,
                    token_url=auth_served.url + FakeAuthServer.TOKEN_PATH,
                    upstream=upstream,
                    upstream_url=upstream_served.url,
                    rsa=rsa,
                    ec=ec,
                )
            )
            await stop.wait()
        finally:
            await upstream_served.close()
            await auth_served.close()

    yield from on_own_loop("clients-fakes", run)


def write_config(
    fakes: Fakes, folder: Path, ca_file: Path, *, daas_key: bytes | None = None, default: str = ""
) -> Path:
    fakes.rsa.write_pkcs12(folder / "consult.p12", PASSWORD.encode())
    password = folder / "consult.password"
    password.write_text(PASSWORD + "\n")
    password.chmod(0o600)
    fakes.ec.write_pem(folder / "daas.key", folder / "daas.crt")
    if daas_key is not None:
        (folder / "daas.key").write_bytes(daas_key)
    path = folder / "ksz-proxy.toml"
    path.write_text(
        f"""
{default}
[client]
id = "{DEFAULT_ID}"
pkcs12 = "consult.p12"
password_file = "consult.password"

[[clients]]
name = "daas"
id = "{DAAS_ID}"
private_key = "daas.key"
certificate = "daas.crt"
algorithm = "ES256"
scopes = ["scope:daas:consult"]

[oauth]
token_url = "{fakes.token_url}"
ca_file = "{ca_file}"

[upstream]
url = "{fakes.upstream_url}"
ca_file = "{ca_file}"

[[routes]]
prefix = "{DEMO}"
scopes = ["scope:demo:consult"]

[[routes]]
prefix = "{DAAS}"
client = "daas"
"""
    )
    return path


def targets(report: checklist.Report, number: int) -> list[tuple[str, str]]:
    return [(r.target, r.status) for r in report.results if r.number == number]


def test_check_walks_every_client(fakes: Fakes, tmp_path: Path, ca_file: Path) -> None:
    path = write_config(fakes, tmp_path, ca_file)
    report = asyncio.run(checklist.run_checks(path, {}))
    assert report.exit_code == 0, report.to_json()
    assert targets(report, 1) == [
        (f"{path} (client default)", "ok"),
        (f"{path} (client daas)", "ok"),
    ]
    # Steps 2 to 4 once per destination: the token endpoint and the one REST host.
    for number in (2, 3, 4):
        assert len(targets(report, number)) == 2
    assert targets(report, 5) == [
        ("client default, scopes scope:demo:consult", "ok"),
        ("client daas, scopes scope:daas:consult", "ok"),
    ]
    assert sorted(targets(report, 6)) == [
        (f"GET {DAAS}/health", "ok"),
        (f"GET {DEMO}/health", "ok"),
    ]
    # Each health call went out with the token of the route's client.
    seen = dict(fakes.call_seen())
    assert seen[f"{DEMO}/health"] == DEFAULT_ID
    assert seen[f"{DAAS}/health"] == DAAS_ID


def test_check_one_client(fakes: Fakes, tmp_path: Path, ca_file: Path) -> None:
    path = write_config(fakes, tmp_path, ca_file)
    report = asyncio.run(checklist.run_checks(path, {}, client="daas"))
    assert report.exit_code == 0, report.to_json()
    assert targets(report, 1) == [(f"{path} (client daas)", "ok")]
    assert targets(report, 5) == [("client daas, scopes scope:daas:consult", "ok")]
    assert targets(report, 6) == [(f"GET {DAAS}/health", "ok")]
    with pytest.raises(Exception, match='--client: no client is named "dass"'):
        asyncio.run(checklist.run_checks(path, {}, client="dass"))
    with pytest.raises(Exception, match="--api: /REST/demo/v1 is under no configured route"):
        asyncio.run(checklist.run_checks(path, {}, client="daas", api=DEMO))


def test_check_a_client_with_broken_credentials_leaves_the_other_checked(
    fakes: Fakes, tmp_path: Path, ca_file: Path
) -> None:
    path = write_config(fakes, tmp_path, ca_file, daas_key=b"-----BEGIN PRIVATE KEY-----\nx\n")
    report = asyncio.run(checklist.run_checks(path, {}))
    assert report.exit_code == 1
    [(_default, ok), (daas, failed)] = targets(report, 1)
    assert (ok, failed) == ("ok", "failed")
    detail = next(r.detail for r in report.results if r.target == daas)
    assert detail.startswith("clients[0].private_key: ")
    assert targets(report, 5) == [("client default, scopes scope:demo:consult", "ok")]
    assert dict(targets(report, 6)) == {f"GET {DEMO}/health": "ok", f"GET {DAAS}/health": "skipped"}


def test_check_cli_takes_client(
    fakes: Fakes, tmp_path: Path, ca_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(fakes, tmp_path, ca_file)
    assert main(["check", "-c", str(path), "--client", "daas"]) == 0
    out = capsys.readouterr().out
    assert "client daas, scopes scope:daas:consult" in out
    assert "client default" not in out
    assert PASSWORD not in out


def test_token_for_a_named_client(
    fakes: Fakes, tmp_path: Path, ca_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(fakes, tmp_path, ca_file)
    assert main(["token", "-c", str(path), "--client", "daas"]) == 0
    out = capsys.readouterr().out
    assert f"daas ({DAAS_ID})" in out
    assert "scope:daas:consult" in out
    assert main(["token", "-c", str(path)]) == 0
    assert f"default ({DEFAULT_ID})" in capsys.readouterr().out
    assert main(["token", "-c", str(path), "--client", "nobody"]) == 2
    assert '--client: no client is named "nobody" (known: default, daas)' in capsys.readouterr().err
    for token in fakes.call(lambda: list(fakes.auth.issued)):
        assert token not in out
