"""The onboarding commands end to end: ``check``, ``cert-info``, ``csr``, ``token``, ``sandbox``.

``proxy.cli.main`` runs its own event loop, so it is called from plain synchronous tests. The
fakes it talks to -- ``running_sandbox()`` (fake authorization server, fake KSZ API and a proxy)
plus a small TLS server answering chosen ``/health`` statuses and one demanding a client
certificate -- run in a background thread with their own loop, started once for this module.
Tests that change a fake do it on that loop (``Fakes.call``) and undo it afterwards.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import jwt
import pytest
import trustme
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from proxy.cli import main
from proxy.config import parse_config
from proxy.credentials import load_pkcs12
from proxy.errors import ConfigError, TokenUnavailable
from proxy.onboarding import check as checklist
from proxy.onboarding.csr import parse_subject
from proxy.onboarding.probes import CheckSettings, endpoints
from proxy.onboarding.steps import token_advice
from proxy.sandbox import demo
from proxy.sandbox.authserver import Fault
from proxy.sandbox.demo import Sandbox, running_sandbox
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.serve import serve
from proxy.secret import read_secret_file
from tests.support.config import changed, write_toml
from tests.support.ownloop import OnOwnLoop, on_own_loop
from tests.support.partner import PKCS12_PASSWORD, PartnerFiles
from tests.support.process import free_port

# main() points the root logger at the stderr of the moment (capsys's); it is put back.
pytestmark = pytest.mark.usefixtures("keep_logging")

T = TypeVar("T")
API = demo.API
ROOT = Path(__file__).resolve().parent.parent


# -- the fakes, in their own thread ------------------------------------------------------------


def _health_app() -> web.Application:
    """Answer ``/REST/<name>/.../health`` with the status <name> asks for."""
    answers: dict[str, tuple[int, dict[str, Any]]] = {
        "down": (503, {"status": "DOWN"}),
        "degraded": (200, {"status": "DEGRADED"}),
        "forbidden": (403, {"type": "urn:problem-type:belgif:missingScope", "status": 403}),
        "absent": (404, {"type": "urn:problem-type:belgif:resourceNotFound", "status": 404}),
    }

    async def handle(request: web.Request) -> web.Response:
        segments = request.path.split("/")
        status, body = answers.get(segments[2] if len(segments) > 2 else "", (200, {}))
        if not request.path.endswith("/health"):
            status, body = 404, {}
        return web.json_response(body or {"status": "UP"}, status=status)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    return app


@dataclass(slots=True, kw_only=True)
class Fakes(OnOwnLoop):
    """The fakes running in the background thread, and what a config needs to reach them."""

    box: Sandbox
    health_url: str  # answers /REST/<down|degraded|forbidden|absent>/v1/health
    mtls_url: str  # the same, but demands the partner certificate
    ca_bundle: Path  # trusts the sandbox's servers and the two above

    @property
    def folder(self) -> Path:
        return self.box.config_path.parent

    def issued_tokens(self) -> list[str]:
        return self.call(lambda: list(self.box.auth.issued))

    def config(self, **changes: Any) -> dict[str, Any]:
        """Return the sandbox configuration as a dict; ``changes`` update tables (None drops)."""
        config = self.box.config
        data: dict[str, Any] = {
            "channel": "extranet",
            "client": {
                "id": demo.CLIENT_ID,
                "pkcs12": str(self.folder / "partner.p12"),
                "password_file": str(self.folder / "partner.password"),
            },
            "oauth": {"token_url": config.oauth.token_url, "ca_file": str(self.ca_bundle)},
            "upstream": {"url": config.upstream.url, "ca_file": str(self.ca_bundle)},
            "routes": [{"prefix": API, "scopes": [demo.SCOPE]}],
        }
        return changed(data, **changes)


@pytest.fixture(scope="module")
def fakes(
    server_ssl: ssl.SSLContext, tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fakes]:
    bundle = tmp_path_factory.mktemp("cli-tls") / "ca-bundle.pem"

    async def run(ready: Callable[[Fakes], None]) -> None:
        stop = asyncio.Event()
        async with running_sandbox(port=0, admin_port=0) as box:
            folder = box.config_path.parent
            bundle.write_bytes((folder / "sandbox-ca.pem").read_bytes() + tls_ca.cert_pem.bytes())
            partner = load_pkcs12(
                folder / "partner.p12",
                read_secret_file(folder / "partner.password", "password"),
            )
            mtls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            tls_ca.issue_cert("localhost", "127.0.0.1").configure_cert(mtls)
            mtls.verify_mode = ssl.CERT_REQUIRED
            mtls.load_verify_locations(
                cadata=partner.chain[0].public_bytes(serialization.Encoding.PEM).decode()
            )
            health = await serve(_health_app(), ssl_context=server_ssl)
            mutual = await serve(_health_app(), ssl_context=mtls)
            try:
                ready(
                    Fakes(
                        loop=asyncio.get_running_loop(),
                        stop=stop,
                        box=box,
                        health_url=health.url,
                        mtls_url=mutual.url,
                        ca_bundle=bundle,
                    )
                )
                await stop.wait()
            finally:
                await mutual.close()
                await health.close()

    yield from on_own_loop("cli-fakes", run)


# -- helpers -----------------------------------------------------------------------------------


def write_config(folder: Path, data: Mapping[str, Any], name: str = "ksz-proxy.toml") -> Path:
    return write_toml(folder / name, data)


@dataclass(slots=True)
class Outcome:
    code: int
    out: str
    err: str


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> Outcome:
    code = main(list(argv))
    captured = capsys.readouterr()
    return Outcome(code=code, out=captured.out, err=captured.err)


def check_json(capsys: pytest.CaptureFixture[str], path: Path, *extra: str) -> tuple[int, Any]:
    outcome = cli(capsys, "check", "-c", str(path), "--json", *extra)
    return outcome.code, json.loads(outcome.out)


def steps(report: Mapping[str, Any], name: str) -> list[dict[str, Any]]:
    return [s for s in report["steps"] if s["name"] == name]


def one(report: Mapping[str, Any], name: str, target_part: str) -> dict[str, Any]:
    found = [s for s in steps(report, name) if target_part in s["target"]]
    assert len(found) == 1, (name, target_part, report)
    return found[0]


# -- check -------------------------------------------------------------------------------------


def test_check_passes_against_the_sandbox(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    result = cli(capsys, "check", "-c", str(fakes.box.config_path))
    assert result.code == 0, result.out
    lines = result.out.splitlines()
    for number in range(1, 7):
        assert any(line.startswith(f"✔ {number}. ") for line in lines), (number, result.out)
    assert "✘" not in result.out
    assert "HTTP 200, status UP" in result.out
    assert "RSA 2048 key matches it" in result.out
    assert lines[-1] == "All steps passed."
    password = (fakes.folder / "partner.password").read_text().strip()
    for secret in [password, *fakes.issued_tokens()]:
        assert secret not in result.out + result.err


def test_check_json_from_a_subprocess(fakes: Fakes) -> None:
    done = subprocess.run(  # noqa: S603  # our own interpreter; the path is ours too
        [sys.executable, "-m", "proxy", "check", "-c", str(fakes.box.config_path), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["exit_code"] == 0
    assert {s["name"] for s in report["steps"]} == {
        "config",
        "dns",
        "tcp",
        "tls",
        "token",
        "health",
    }
    assert all(s["status"] == "ok" for s in report["steps"])
    assert len(steps(report, "tls")) == 2  # the token endpoint and the REST API
    assert steps(report, "health")[0]["target"] == f"GET {API}/health"


def test_check_config_error_exits_2_with_the_first_line(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, fakes.config(oauth={"timout_s": 3}))
    result = cli(capsys, "check", "-c", str(path))
    assert result.code == 2
    lines = result.out.splitlines()
    assert lines[1].startswith("✘ 1. configuration")
    assert "oauth.timout_s: unknown key" in lines[1]
    for number in range(2, 7):
        assert any(line.startswith(f"- {number}. ") and "skipped" in line for line in lines)
    assert "nothing else was checked" in result.out
    # The same in JSON.
    code, report = check_json(capsys, path)
    assert code == 2
    assert report["steps"][0]["status"] == "failed"
    assert [s["status"] for s in report["steps"][1:]] == ["skipped"] * 5


def test_check_missing_config_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report = check_json(capsys, tmp_path / "absent.toml")
    assert code == 2
    assert "does not exist" in report["steps"][0]["detail"]


def test_check_unresolvable_token_host(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token_url = "https://nonexistent.invalid/REST/oauth/v5/token"
    path = write_config(tmp_path, fakes.config(oauth={"token_url": token_url}))
    code, report = check_json(capsys, path)
    assert code == 1
    dns = one(report, "dns", "token endpoint")
    assert dns["status"] == "failed"
    assert "does not resolve" in dns["detail"]
    assert "oauth.token_url" in dns["fix"]
    assert one(report, "tcp", "token endpoint")["status"] == "skipped"
    assert one(report, "tls", "token endpoint")["status"] == "skipped"
    # The REST side is still checked: it does not depend on the token endpoint.
    assert one(report, "tls", "REST API")["status"] == "ok"
    assert [s["status"] for s in steps(report, "token")] == ["skipped"]
    assert [s["status"] for s in steps(report, "health")] == ["skipped"]


def test_check_closed_port(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(
        tmp_path, fakes.config(upstream={"url": f"https://127.0.0.1:{free_port()}"})
    )
    result = cli(capsys, "check", "-c", str(path))
    assert result.code == 1
    tcp = [line for line in result.out.splitlines() if line.startswith("✘ 3. ")]
    assert len(tcp) == 1
    assert "REST API 127.0.0.1" in tcp[0]
    assert "connection refused" in tcp[0]
    assert "check the port in upstream.url" in result.out
    assert "port 4543" in result.out
    code, report = check_json(capsys, path)
    assert code == 1
    assert one(report, "tls", "REST API")["status"] == "skipped"
    assert steps(report, "token")[0]["status"] == "ok"  # the token endpoint is fine
    assert steps(report, "health")[0]["status"] == "skipped"
    assert "not reachable" in steps(report, "health")[0]["detail"]


def _filled_backlog(stack: contextlib.ExitStack) -> int:
    """Return a loopback port that drops SYNs, as a firewall's DROP rule does.

    A listener that never accepts, with its backlog full: the kernel drops further SYNs. The
    backlog's real size varies, so connect until a connection attempt times out.
    """
    listener = stack.enter_context(socket.socket())
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    for _ in range(64):
        filler = stack.enter_context(socket.socket())
        filler.settimeout(0.2)
        try:
            filler.connect(("127.0.0.1", port))
        except TimeoutError:
            return port
    raise AssertionError("the listen backlog never filled up")


def test_check_firewall_timeout_names_the_form(fakes: Fakes, tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        port = _filled_backlog(stack)
        path = write_config(tmp_path, fakes.config(upstream={"url": f"https://127.0.0.1:{port}"}))
        settings = CheckSettings(connect_timeout_s=0.5)
        report = asyncio.run(checklist.run_checks(path, {}, settings=settings))
    assert report.exit_code == 1
    tcp = next(r for r in report.results if r.name == "tcp" and "REST API" in r.target)
    assert tcp.status == "failed"
    assert tcp.detail == "timed out after 0.5 s"
    assert tcp.cause is not None and "firewall" in tcp.cause and "not open yet" in tcp.cause
    assert tcp.fix is not None
    assert '"EXTRANET - Firewall IP Flux Management"' in tcp.fix
    assert "esb@ksz-bcss.fgov.be" in tcp.fix
    assert "4543" in tcp.fix
    health = [r for r in report.results if r.name == "health"]
    assert [r.status for r in health] == ["skipped"]


def test_check_untrusted_tls(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_config(tmp_path, fakes.config(oauth={"ca_file": None}, upstream={"ca_file": None}))
    code, report = check_json(capsys, path)
    assert code == 1
    token_tls = one(report, "tls", "token endpoint")
    assert token_tls["status"] == "failed"
    assert "certificate verify failed" in token_tls["detail"]
    assert "not trusted" in token_tls["cause"]
    assert "oauth.ca_file" in token_tls["fix"]
    rest_tls = one(report, "tls", "REST API")
    assert rest_tls["status"] == "failed"
    assert "upstream.ca_file" in rest_tls["fix"]
    assert [s["status"] for s in steps(report, "token")] == ["skipped"]
    assert [s["status"] for s in steps(report, "health")] == ["skipped"]


def test_check_unregistered_certificate(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    auth = fakes.box.auth
    saved = fakes.call(lambda: dict(auth.clients))
    fakes.call(auth.clients.clear)
    try:
        result = cli(capsys, "check", "-c", str(fakes.box.config_path))
        code, report = check_json(capsys, fakes.box.config_path)
    finally:
        fakes.call(lambda: auth.clients.update(saved))
    assert result.code == code == 1
    assert "✘ 5. token" in result.out
    token = steps(report, "token")[0]
    assert token["status"] == "failed"
    assert "invalid_client" in token["detail"]
    assert "does not accept client-id" in token["cause"]
    assert "not registered" in token["cause"]
    assert "--export-crt" in token["fix"] and "esb@ksz-bcss.fgov.be" in token["fix"]
    assert steps(report, "health")[0]["status"] == "skipped"
    assert "no token" in steps(report, "health")[0]["detail"]


def test_check_scope_not_granted(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [{"prefix": API, "scopes": ["scope:not:granted"]}]
    path = write_config(tmp_path, fakes.config(routes=routes))
    code, report = check_json(capsys, path)
    assert code == 1
    token = steps(report, "token")[0]
    assert token["target"] == "scopes scope:not:granted"
    assert token["status"] == "failed"
    assert "invalid_scope" in token["cause"]
    assert "not granted" in token["cause"]
    assert "routes[].scopes" in token["fix"]
    assert steps(report, "health")[0]["status"] == "skipped"


def test_check_health_down(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [
        {"prefix": API, "scopes": [demo.SCOPE]},
        {"prefix": "/REST/down/v1", "scopes": [demo.SCOPE], "upstream": fakes.health_url},
    ]
    path = write_config(tmp_path, fakes.config(routes=routes))
    result = cli(capsys, "check", "-c", str(path))
    assert result.code == 1
    assert "✘ 6. health         GET /REST/down/v1/health: HTTP 503, status DOWN" in result.out
    assert f"✔ 6. health         GET {API}/health: HTTP 200, status UP" in result.out
    assert "reports DOWN" in result.out
    code, report = check_json(capsys, path)
    assert code == 1
    assert len(steps(report, "tls")) == 3  # the token endpoint and two REST origins


@pytest.mark.parametrize(
    ("name", "detail", "words"),
    [
        ("degraded", "HTTP 200, status DEGRADED", "the flow works"),
        ("forbidden", "HTTP 403: authorization error", "proves the flow"),
        ("absent", "HTTP 404: the service is not deployed (yet)", "token obtained in step 5"),
    ],
)
def test_check_health_answers_that_still_prove_the_flow(
    fakes: Fakes,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    detail: str,
    words: str,
) -> None:
    prefix = f"/REST/{name}/v1"
    routes = [{"prefix": prefix, "scopes": [demo.SCOPE], "upstream": fakes.health_url}]
    path = write_config(tmp_path, fakes.config(routes=routes))
    code, report = check_json(capsys, path)
    assert code == 0
    health = steps(report, "health")
    assert len(health) == 1
    assert health[0]["status"] == "warning"
    assert health[0]["detail"] == detail
    assert words in health[0]["cause"] + health[0]["fix"]


def test_check_api_option(fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    routes = [
        {"prefix": API, "scopes": [demo.SCOPE]},
        {"prefix": "/REST/down/v1", "scopes": [demo.SCOPE], "upstream": fakes.health_url},
    ]
    path = write_config(tmp_path, fakes.config(routes=routes))
    code, report = check_json(capsys, path, "--api", API + "/")
    assert code == 0  # the DOWN route is not asked about
    assert [s["target"] for s in steps(report, "health")] == [f"GET {API}/health"]
    assert len(steps(report, "tls")) == 2
    result = cli(capsys, "check", "-c", str(path), "--api", "/REST/nowhere")
    assert result.code == 2
    assert result.err.strip() == (
        "ksz-proxy: --api: /REST/nowhere is under no configured route (/REST/demo/v1, "
        "/REST/down/v1)"
    )


def test_check_server_demanding_a_client_certificate(
    fakes: Fakes, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    routes = [{"prefix": "/REST/mutual/v1", "scopes": [demo.SCOPE], "upstream": fakes.mtls_url}]
    path = write_config(tmp_path, fakes.config(routes=routes))
    code, report = check_json(capsys, path)
    assert code == 1
    tls = one(report, "tls", "REST API")
    assert tls["status"] == "failed"
    assert "client certificate" in tls["cause"]
    assert "upstream.client_certificate = true" in tls["fix"]
    assert steps(report, "health")[0]["status"] == "skipped"

    path = write_config(
        tmp_path, fakes.config(routes=routes, upstream={"client_certificate": True}), "mtls.toml"
    )
    code, report = check_json(capsys, path)
    assert code == 0, report
    assert "client certificate accepted" in one(report, "tls", "REST API")["detail"]
    assert steps(report, "health")[0]["detail"] == "HTTP 200, status UP"


# -- cert-info ---------------------------------------------------------------------------------


def _b64url(digest: bytes) -> str:
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _assert_describes(out: str, certificate: x509.Certificate) -> None:
    sha1 = hashlib.sha1(  # a thumbprint, not a security decision
        certificate.public_bytes(serialization.Encoding.DER), usedforsecurity=False
    ).digest()
    sha256 = hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).digest()
    assert certificate.fingerprint(hashes.SHA1()) == sha1  # noqa: S303
    assert certificate.fingerprint(hashes.SHA256()) == sha256
    # "label        value": a 12-column label, a space, the value.
    fields = {line[:12].strip(): line[13:] for line in out.splitlines() if len(line) > 13}
    assert fields["subject"] == certificate.subject.rfc4514_string()
    assert fields["issuer"] == certificate.issuer.rfc4514_string()
    assert fields["serial"] == format(certificate.serial_number, "X")
    assert fields["SHA-1"] == sha1.hex(":").upper()
    assert fields["x5t"] == _b64url(sha1)
    assert fields["SHA-256"] == sha256.hex(":").upper()
    assert fields["x5t#S256"] == _b64url(sha256)
    assert fields["valid until"].endswith("days left)")


def test_cert_info_on_pkcs12_with_password_file(
    partner: Issued, partner_files: PartnerFiles, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(
        capsys,
        "cert-info",
        str(partner_files.pkcs12),
        "--password-file",
        str(partner_files.password_file),
    )
    assert result.code == 0, result.err
    _assert_describes(result.out, partner.certificate)
    assert "RSA 2048 (RS256, PS256); private key present and matching" in result.out
    assert "chain        1 more: CN=Test Partner CA" in result.out
    assert PKCS12_PASSWORD not in result.out + result.err


def test_cert_info_password_from_environment(
    partner: Issued,
    partner_files: PartnerFiles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("KSZ_TEST_P12_PASSWORD", PKCS12_PASSWORD)
    result = cli(
        capsys, "cert-info", str(partner_files.pkcs12), "--password-env", "KSZ_TEST_P12_PASSWORD"
    )
    assert result.code == 0, result.err
    _assert_describes(result.out, partner.certificate)
    result = cli(capsys, "cert-info", str(partner_files.pkcs12), "--password-env", "KSZ_UNSET_X")
    assert result.code == 2
    assert "KSZ_UNSET_X is not set" in result.err


def test_cert_info_password_from_stdin(
    partner: Issued,
    partner_files: PartnerFiles,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(PKCS12_PASSWORD + "\n"))
    result = cli(capsys, "cert-info", str(partner_files.pkcs12))
    assert result.code == 0, result.err
    _assert_describes(result.out, partner.certificate)
    monkeypatch.setattr(sys, "stdin", io.StringIO("not-the-password\n"))
    result = cli(capsys, "cert-info", str(partner_files.pkcs12))
    assert result.code == 2
    assert "wrong password" in result.err
    assert "not-the-password" not in result.out + result.err


def test_cert_info_on_a_pem_certificate_alone(
    partner: Issued, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "partner.crt"
    path.write_bytes(partner.cert_pem())
    path.chmod(0o644)  # public: no password, no permission check
    result = cli(capsys, "cert-info", str(path))
    assert result.code == 0, result.err
    _assert_describes(result.out, partner.certificate)
    assert "PEM certificate (no private key)" in result.out
    assert "no private key" in result.out


def test_cert_info_on_pem_key_and_certificate_via_config(
    fakes: Fakes, partner: Issued, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partner.write_pem(tmp_path / "key.pem", tmp_path / "cert.pem")
    client = {
        "pkcs12": None,
        "password_file": None,
        "private_key": str(tmp_path / "key.pem"),
        "certificate": str(tmp_path / "cert.pem"),
    }
    path = write_config(tmp_path, fakes.config(client=client))
    result = cli(capsys, "cert-info", "-c", str(path))
    assert result.code == 0, result.err
    _assert_describes(result.out, partner.certificate)
    assert "PEM key and certificate" in result.out
    # The sandbox's own configuration names a PKCS#12 keystore and its password file.
    result = cli(capsys, "cert-info", "-c", str(fakes.box.config_path))
    assert result.code == 0, result.err
    assert "partner.p12 (PKCS#12 keystore)" in result.out


def test_cert_info_exports_the_certificate_once(
    partner: Issued, partner_files: PartnerFiles, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "partner-test.crt"
    argv = [
        "cert-info",
        str(partner_files.pkcs12),
        "--password-file",
        str(partner_files.password_file),
        "--export-crt",
        str(export),
    ]
    result = cli(capsys, *argv)
    assert result.code == 0, result.err
    assert f"Wrote {export}" in result.out
    assert "esb@ksz-bcss.fgov.be" in result.out
    written = export.read_bytes()
    assert x509.load_pem_x509_certificate(written) == partner.certificate
    assert b"PRIVATE KEY" not in written
    again = cli(capsys, *argv)
    assert again.code == 2
    assert again.err.strip() == (
        f"ksz-proxy: --export-crt: {export} already exists; refusing to overwrite it"
    )
    assert export.read_bytes() == written


def test_cert_info_on_an_expired_certificate_exits_1(
    partner_ca: CertificateAuthority, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    now = datetime.now(UTC)
    old = partner_ca.issue_client(
        "expired partner", not_before=now - timedelta(days=400), not_after=now - timedelta(days=3)
    )
    path = tmp_path / "old.crt"
    path.write_bytes(old.certificate.public_bytes(serialization.Encoding.DER))
    result = cli(capsys, "cert-info", str(path))
    assert result.code == 1
    assert "(DER certificate)" in result.out
    assert "EXPIRED 3 days ago" in result.out or "EXPIRED 2 days ago" in result.out
    assert "not valid now" in result.out


def test_cert_info_on_a_certificate_request_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, request = tmp_path / "r.key", tmp_path / "r.csr"
    assert (
        cli(
            capsys,
            "csr",
            "--subject",
            "CN=r",
            "--key-type",
            "ec",
            "--key-out",
            str(key),
            "--csr-out",
            str(request),
        ).code
        == 0
    )
    result = cli(capsys, "cert-info", str(request))
    assert result.code == 2
    assert "is a certificate request (CSR): send it to a CA" in result.err


# -- csr ---------------------------------------------------------------------------------------


def test_csr_rsa_with_every_attribute(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path, csr_path = tmp_path / "partner.key", tmp_path / "partner.csr"
    subject = (
        "CN=partner-acpt,OU=ICT,O=Partner\\, Inc.,L=Brussel,ST=Brussels,C=be,"
        "emailAddress=ict@partner.example,serialNumber=0123456789"
    )
    result = cli(
        capsys,
        "csr",
        "--subject",
        subject,
        "--key-out",
        str(key_path),
        "--csr-out",
        str(csr_path),
    )
    assert result.code == 0, result.err
    request = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert request.is_signature_valid
    name = request.subject

    def value(oid: x509.ObjectIdentifier) -> str:
        return str(name.get_attributes_for_oid(oid)[0].value)

    assert value(NameOID.COMMON_NAME) == "partner-acpt"
    assert value(NameOID.ORGANIZATION_NAME) == "Partner, Inc."
    assert value(NameOID.ORGANIZATIONAL_UNIT_NAME) == "ICT"
    assert value(NameOID.COUNTRY_NAME) == "BE"
    assert value(NameOID.LOCALITY_NAME) == "Brussel"
    assert value(NameOID.STATE_OR_PROVINCE_NAME) == "Brussels"
    assert value(NameOID.EMAIL_ADDRESS) == "ict@partner.example"
    assert value(NameOID.SERIAL_NUMBER) == "0123456789"
    # RFC 4514 order written: most specific first, so CN is the last RDN in the request.
    assert name.rdns[-1].get_attributes_for_oid(NameOID.COMMON_NAME)
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 3072
    assert request.public_key() == key.public_key()
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert "Next steps" in result.out
    assert f"cert-info {tmp_path / 'partner.crt'} --export-crt" in result.out
    assert "public-trust CA" in result.out


def test_csr_ec_key_and_email_alias(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key_path, csr_path = tmp_path / "ec.key", tmp_path / "ec.csr"
    result = cli(
        capsys,
        "csr",
        "--subject",
        "CN=partner-test, E=ict@partner.example, C=BE",
        "--key-type",
        "ec",
        "--key-out",
        str(key_path),
        "--csr-out",
        str(csr_path),
    )
    assert result.code == 0, result.err
    request = x509.load_pem_x509_csr(csr_path.read_bytes())
    assert request.is_signature_valid
    assert request.subject.rfc4514_string() == (
        "CN=partner-test,1.2.840.113549.1.9.1=ict@partner.example,C=BE"
    )
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert request.public_key() == key.public_key()


def test_csr_encrypted_key_needs_the_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    password = "canary-csr-password-41b7"
    monkeypatch.setenv("KSZ_TEST_KEY_PASSWORD", password)
    key_path = tmp_path / "enc.key"
    result = cli(
        capsys,
        "csr",
        "--subject",
        "CN=partner-prod,O=Partner,C=BE",
        "--key-type",
        "ec",
        "--key-out",
        str(key_path),
        "--csr-out",
        str(tmp_path / "enc.csr"),
        "--encrypt",
        "--password-env",
        "KSZ_TEST_KEY_PASSWORD",
    )
    assert result.code == 0, result.err
    assert password not in result.out + result.err
    data = key_path.read_bytes()
    assert b"ENCRYPTED PRIVATE KEY" in data
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(data, None)
    with pytest.raises(ValueError):
        serialization.load_pem_private_key(data, b"wrong")
    assert isinstance(
        serialization.load_pem_private_key(data, password.encode()), ec.EllipticCurvePrivateKey
    )


@pytest.mark.parametrize("existing", ["key", "csr"])
def test_csr_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], existing: str
) -> None:
    paths = {"key": tmp_path / "a.key", "csr": tmp_path / "a.csr"}
    paths[existing].write_text("keep me\n")
    result = cli(
        capsys,
        "csr",
        "--subject",
        "CN=x",
        "--key-type",
        "ec",
        "--key-out",
        str(paths["key"]),
        "--csr-out",
        str(paths["csr"]),
    )
    assert result.code == 2
    option = "--key-out" if existing == "key" else "--csr-out"
    assert result.err.strip() == (
        f"ksz-proxy: {option}: {paths[existing]} already exists; refusing to overwrite it"
    )
    assert paths[existing].read_text() == "keep me\n"
    other = paths["csr" if existing == "key" else "key"]
    assert not other.exists()


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        ("CN=x,DC=example", "unknown attribute DC"),
        ("CN=x,SN=Doe", "unknown attribute SN"),
        ("O=Partner,C=BE", "CN is required"),
        ("CN=x,C=BEL", "two-letter country code"),
        ("CN=x,O", '"O" is not NAME=value'),
        ("CN=", "CN is empty"),
    ],
)
def test_csr_refuses_bad_subjects(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], subject: str, message: str
) -> None:
    result = cli(
        capsys,
        "csr",
        "--subject",
        subject,
        "--key-out",
        str(tmp_path / "k"),
        "--csr-out",
        str(tmp_path / "c"),
    )
    assert result.code == 2
    assert message in result.err
    assert not (tmp_path / "k").exists()


def test_parse_subject_escapes() -> None:
    name = parse_subject(r"CN=Doe\, John \2B Co,O=A\\B,ou=caf\C3\A9")
    assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "Doe, John + Co"
    assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "A\\B"
    assert name.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "café"
    with pytest.raises(ConfigError, match="invalid escape"):
        parse_subject(r"CN=a\q")


# -- token -------------------------------------------------------------------------------------


def test_token_hides_the_token_unless_asked(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    before = set(fakes.issued_tokens())
    result = cli(capsys, "token", "-c", str(fakes.box.config_path))
    assert result.code == 0, result.err
    issued = set(fakes.issued_tokens()) - before
    assert len(issued) == 1
    (value,) = issued
    assert value not in result.out + result.err
    assert "(not shown; add --show-token)" in result.out
    assert "scope granted   scope:demo:consult" in result.out
    assert "expires in      3600 s (at " in result.out
    assert "opaque (not a JWT)" in result.out

    result = cli(
        capsys, "token", "-c", str(fakes.box.config_path), "--scope", demo.SCOPE, "--show-token"
    )
    assert result.code == 0, result.err
    (shown,) = set(fakes.issued_tokens()) - before - issued
    assert f"token           {shown}" in result.out
    assert "scopes asked    scope:demo:consult" in result.out


def test_token_decodes_a_jwt(fakes: Fakes, capsys: pytest.CaptureFixture[str]) -> None:
    value = jwt.encode(
        {"iss": "https://oauth.example", "scope": demo.SCOPE, "exp": 2_000_000_000},
        "k" * 32,
        algorithm="HS256",
        headers={"kid": "key-1"},
    )
    body = {"access_token": value, "token_type": "Bearer", "expires_in": 600}
    fakes.call(lambda: fakes.box.auth.inject(Fault(kind="response", status=200, body=body)))
    result = cli(capsys, "token", "-c", str(fakes.box.config_path))
    assert result.code == 0, result.err
    assert value not in result.out
    assert value.rsplit(".", 1)[1] not in result.out  # not even the signature
    assert "JWT (decoded below, signature not verified)" in result.out
    assert '"kid": "key-1"' in result.out
    assert '"iss": "https://oauth.example"' in result.out
    assert "scope granted   (not stated)" in result.out


def test_token_failure_gives_reason_and_hint(
    fakes: Fakes, capsys: pytest.CaptureFixture[str]
) -> None:
    result = cli(capsys, "token", "-c", str(fakes.box.config_path), "--scope", "scope:not:granted")
    assert result.code == 1
    assert "No token for scopes scope:not:granted" in result.out
    assert "reason: rejected, invalid_scope" in result.out
    assert "is not granted to client-id" in result.out
    result = cli(capsys, "token", "-c", str(fakes.box.config_path), "--scope", 'bad"scope')
    assert result.code == 2
    assert "--scope" in result.err


def test_token_without_scope_asks_for_the_routes_scopes_and_logs_no_retries(fakes: Fakes) -> None:
    # The real console script (issue 16): the routes' scope set is asked for and named, and a
    # refusal is one answer, not a retry schedule in the log.
    ksz_proxy = str(Path(sys.executable).parent / "ksz-proxy")
    config = str(fakes.box.config_path)
    before = set(fakes.issued_tokens())
    done = subprocess.run(  # noqa: S603  # our own console script
        [ksz_proxy, "--log-level", "info", "token", "-c", config],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert f"scopes {demo.SCOPE} (the routes' {API}; --scope asks for others)" in done.stdout
    assert f"scopes asked    {demo.SCOPE}" in done.stdout
    assert len(set(fakes.issued_tokens()) - before) == 1
    done = subprocess.run(  # noqa: S603  # our own console script
        [ksz_proxy, "--log-level", "debug", "token", "-c", config, "--scope", "scope:not:granted"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "reason: rejected, invalid_scope" in done.stdout
    assert "retry" not in done.stderr.lower()
    assert "token request failed" not in done.stderr


# -- sandbox -----------------------------------------------------------------------------------


def test_sandbox_demo_exits_0() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "sandbox", "--demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Demo succeeded." in done.stdout


def test_check_hints_name_where_a_url_came_from(tmp_path: Path) -> None:
    # "check oauth.token_url" misleads when the key is not in the file (issue 16).
    base: dict[str, Any] = {
        "environment": "acpt",
        "client": {"id": "c", "pkcs12": str(tmp_path / "x.p12")},
        "routes": [{"prefix": "/REST/a"}],
    }
    from_table = parse_config(base, {})
    token, rest = endpoints(from_table, from_table.routes)
    assert token.url_key.startswith("the token URL from environment = acpt, channel = extranet")
    assert "oauth.token_url would override it" in token.url_key
    assert rest.url_key.startswith("the REST URL from environment = acpt")
    explicit = parse_config(
        {
            **base,
            "oauth": {"token_url": "https://t.example/token"},
            "upstream": {"url": "https://u.example"},
        },
        {},
    )
    token, rest = endpoints(explicit, explicit.routes)
    assert (token.url_key, rest.url_key) == ("oauth.token_url", "upstream.url")
    broken = TokenUnavailable("not a token answer", reason="invalid_response")
    _cause, fix = token_advice(broken, from_table, None, frozenset(), None)  # type: ignore[arg-type]
    assert fix.startswith("check the token URL from environment = acpt")
    assert "prox" not in fix
