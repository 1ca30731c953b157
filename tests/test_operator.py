"""The operator's path through the real console script (issue 16): onboarding to a running config.

Every test runs ``ksz-proxy`` as installed (the console script next to this interpreter) in a
subprocess, as an operator would type it, and asserts on exit codes, output and files.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from proxy.oauth import HINTS
from proxy.sandbox.pki import CertificateAuthority

KSZ_PROXY = Path(sys.executable).parent / "ksz-proxy"
CLIENT_ID = "partner:federal:service:bus:client:confidential"


def ksz(
    *args: str, cwd: Path, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the console script as an operator would; never raise on a non-zero exit."""
    return subprocess.run(  # noqa: S603  # our own console script, arguments from the test
        [str(KSZ_PROXY), *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write_private(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    path.chmod(0o600)
    return path


def local_config(folder: Path, client: str, *, extra: str = "") -> Path:
    """Write README step 5's config, with the endpoints on closed loopback ports (no network)."""
    path = folder / "ksz-proxy.toml"
    path.write_text(
        f"""\
environment = "acpt"
channel = "extranet"

[client]
id = "{CLIENT_ID}"
{client}

[oauth]
token_url = "https://127.0.0.1:{closed_port()}/REST/oauth/v5/token"

[upstream]
url = "https://127.0.0.1:{closed_port()}"

[listen]
port = 0

[admin]
port = 0

[[routes]]
prefix = "/REST/demo/v1"
scopes = ["scope:demo:consult"]
{extra}""",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def started() -> Iterator[list[subprocess.Popen[str]]]:
    running: list[subprocess.Popen[str]] = []
    yield running
    for process in running:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def run_until_started(config: Path, running: list[subprocess.Popen[str]]) -> dict[str, object]:
    """Start ``ksz-proxy run``, return its start-up line, stop it with SIGTERM (exit 0)."""
    process = subprocess.Popen(  # noqa: S603  # our own console script
        [str(KSZ_PROXY), "run", "-c", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    running.append(process)
    assert process.stderr is not None
    deadline = time.monotonic() + 30
    line = ""
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        if '"ksz-proxy started"' in line:
            break
    assert '"ksz-proxy started"' in line, line
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=30)  # reads what is left and closes the pipe
    assert process.returncode == 0
    return dict(json.loads(line))


# -- README "Connect to KSZ", step by step ------------------------------------------------------


def test_connect_to_ksz_walkthrough_ends_in_a_config_that_starts(
    tmp_path: Path, started: list[subprocess.Popen[str]]
) -> None:
    # 1. Key and request.
    done = ksz(
        "csr",
        "--subject",
        "CN=partner-acpt,O=Partner NV,C=BE",
        "--key-type",
        "rsa",
        "--key-out",
        "partner-acpt.key",
        "--csr-out",
        "partner-acpt.csr",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # The next steps name the files just written and the ones to come.
    assert "ksz-proxy cert-info partner-acpt.crt" in done.stdout
    assert "--key partner-acpt.key --cert partner-acpt.crt --out partner-acpt.p12" in done.stdout
    assert stat.S_IMODE((tmp_path / "partner-acpt.key").stat().st_mode) == 0o600
    # 2. The CA (here the sandbox PKI) answers with the certificate.
    request = x509.load_pem_x509_csr((tmp_path / "partner-acpt.csr").read_bytes())
    certificate = CertificateAuthority("Example public-trust CA").sign_request(request)
    (tmp_path / "partner-acpt.crt").write_bytes(
        certificate.public_bytes(serialization.Encoding.PEM)
    )
    # 3. Check it and export it for KSZ.
    done = ksz("cert-info", "partner-acpt.crt", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "CN=partner-acpt,O=Partner NV,C=BE" in done.stdout
    (tmp_path / "to-ksz").mkdir()
    done = ksz(
        "cert-info", "partner-acpt.crt", "--export-crt", "to-ksz/partner-acpt.crt", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert x509.load_pem_x509_certificate((tmp_path / "to-ksz/partner-acpt.crt").read_bytes())
    # 5. The keystore the deployment examples read; its password file is made for us.
    done = ksz(
        "keystore",
        "--key",
        "partner-acpt.key",
        "--cert",
        "partner-acpt.crt",
        "--out",
        "acpt.p12",
        "--password-file",
        "acpt.password",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert 'pkcs12 = "acpt.p12"' in done.stdout
    for name in ("acpt.p12", "acpt.password"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name
    password = (tmp_path / "acpt.password").read_text().removesuffix("\n")
    assert len(password) >= 32
    assert password not in done.stdout + done.stderr
    key, cert, _ = pkcs12.load_key_and_certificates(
        (tmp_path / "acpt.p12").read_bytes(), password.encode()
    )
    assert cert == certificate
    assert key is not None and key.public_key() == certificate.public_key()
    # 6. The config: check passes step 1, and the proxy starts on it.
    config = local_config(tmp_path, 'pkcs12 = "acpt.p12"\npassword_file = "acpt.password"')
    done = ksz("check", "-c", str(config), "--json", cwd=tmp_path)
    report = json.loads(done.stdout)
    first = [s for s in report["steps"] if s["step"] == 1]
    assert first and all(s["status"] == "ok" for s in first), first
    line = run_until_started(config, started)
    assert line["certificate_subject"] == "CN=partner-acpt,O=Partner NV,C=BE"
    # The PEM pair of step 5 in the README starts too.
    pem = tmp_path / "pem"
    pem.mkdir()
    config = local_config(
        pem, 'private_key = "../partner-acpt.key"\ncertificate = "../partner-acpt.crt"'
    )
    assert run_until_started(config, started)["client_id"] == CLIENT_ID


# -- keystore ------------------------------------------------------------------------------------


@pytest.fixture
def pair(tmp_path: Path) -> tuple[CertificateAuthority, Path, Path]:
    ca = CertificateAuthority("Keystore Test CA")
    issued = ca.issue_client("partner-test")
    key, cert = tmp_path / "p.key", tmp_path / "p.crt"
    issued.write_pem(key, cert)
    return ca, key, cert


def test_keystore_uses_an_existing_password_file_and_keeps_the_chain(
    tmp_path: Path, pair: tuple[CertificateAuthority, Path, Path]
) -> None:
    ca, _, cert = pair
    # A certificate file with its chain, as CAs send it.
    cert.write_bytes(cert.read_bytes() + ca.cert_pem())
    write_private(tmp_path / "pw", "my keystore password\n")
    done = ksz(
        "keystore", "--key", "p.key", "--cert", "p.crt", "--out", "x.p12",
        "--password-file", "pw", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "(as given, mode 0600)" in done.stdout
    loaded = pkcs12.load_pkcs12((tmp_path / "x.p12").read_bytes(), b"my keystore password")
    assert [c.certificate for c in loaded.additional_certs] == [ca.certificate]


def test_keystore_refuses_to_overwrite(
    tmp_path: Path, pair: tuple[CertificateAuthority, Path, Path]
) -> None:
    (tmp_path / "x.p12").write_bytes(b"precious")
    done = ksz(
        "keystore", "--key", "p.key", "--cert", "p.crt", "--out", "x.p12",
        "--password-file", "pw", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr == "ksz-proxy: --out: x.p12 already exists; refusing to overwrite it\n"
    assert (tmp_path / "x.p12").read_bytes() == b"precious"
    assert not (tmp_path / "pw").exists()


def test_keystore_refuses_a_key_and_certificate_that_differ(
    tmp_path: Path, pair: tuple[CertificateAuthority, Path, Path]
) -> None:
    ca, _, _ = pair
    (tmp_path / "other.crt").write_bytes(ca.issue_client("someone-else").cert_pem())
    done = ksz(
        "keystore", "--key", "p.key", "--cert", "other.crt", "--out", "x.p12",
        "--password-file", "pw", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("ksz-proxy: --cert: other.crt does not belong to the key in")
    assert not (tmp_path / "x.p12").exists()
    assert not (tmp_path / "pw").exists()


def test_keystore_refuses_an_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    issued = CertificateAuthority().issue_client(
        "old", not_before=now - timedelta(days=400), not_after=now - timedelta(days=1)
    )
    issued.write_pem(tmp_path / "p.key", tmp_path / "p.crt")
    done = ksz(
        "keystore", "--key", "p.key", "--cert", "p.crt", "--out", "x.p12",
        "--password-file", "pw", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "expired on" in done.stderr
    assert not (tmp_path / "x.p12").exists()


def test_keystore_with_an_encrypted_key(tmp_path: Path) -> None:
    issued = CertificateAuthority().issue_client("enc")
    issued.write_pem(tmp_path / "p.key", tmp_path / "p.crt", b"key-secret")
    args = ("keystore", "--key", "p.key", "--cert", "p.crt", "--out", "x.p12")
    done = ksz(*args, "--password-file", "pw", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == "ksz-proxy: --key: p.key is encrypted; set --key-password-file\n"
    write_private(tmp_path / "key.pw", "wrong\n\n")
    done = ksz(*args, "--password-file", "pw", "--key-password-file", "key.pw", cwd=tmp_path)
    assert done.returncode == 2
    assert "wrong password for p.key (--key-password-file)" in done.stderr
    assert "spans 2 lines" in done.stderr
    write_private(tmp_path / "key.pw", "key-secret\n")
    done = ksz(*args, "--password-file", "pw", "--key-password-file", "key.pw", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "key-secret" not in done.stdout + done.stderr


# -- password files: their shape in the error (item 8) -------------------------------------------


@pytest.mark.parametrize(
    ("content", "note"),
    [
        ("canary-pw  \n", "starts or ends with spaces or tabs"),
        ("canary-pw\ncanary-pw\n", "spans 2 lines"),
        ("canary-pw\n\n", "spans 2 lines"),
    ],
    ids=["trailing-spaces", "two-lines", "blank-line"],
)
def test_wrong_password_names_the_shape_of_the_password_file(
    tmp_path: Path, content: str, note: str
) -> None:
    issued = CertificateAuthority().issue_client("pw")
    issued.write_pkcs12(tmp_path / "x.p12", b"canary-pw")
    write_private(tmp_path / "pw", content)
    done = ksz("cert-info", "x.p12", "--password-file", "pw", cwd=tmp_path)
    assert done.returncode == 2
    assert "wrong password for x.p12" in done.stderr
    assert note in done.stderr
    assert "canary-pw" not in done.stderr
    # The same note when the proxy itself loads the keystore.
    config = local_config(tmp_path, 'pkcs12 = "x.p12"\npassword_file = "pw"')
    done = ksz("run", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert note in done.stderr
    assert "canary-pw" not in done.stderr


# -- configuration: did you mean (item 14) ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "[listener]\nport = 8081\n",
            "listener: unknown table [listener] (did you mean [listen]?)",
        ),
        (
            "[oauth2]\ntimeout_s = 3\n",
            "oauth2: unknown table [oauth2] (did you mean [oauth]?)",
        ),
        (
            "[[route]]\nprefix = '/REST/x'\n",
            "route: unknown table [[route]] (did you mean [[routes]]?)",
        ),
        ("nvironment = 'acpt'\n", "nvironment: unknown key (did you mean environment?)"),
    ],
    ids=["listener", "oauth2", "route", "environment"],
)
def test_unknown_tables_and_keys_get_a_suggestion(tmp_path: Path, extra: str, message: str) -> None:
    issued = CertificateAuthority().issue_client("dym")
    issued.write_pkcs12(tmp_path / "x.p12")
    config = local_config(tmp_path, 'pkcs12 = "x.p12"')
    text = config.read_text()
    # Top-level keys must come before the first table; tables go at the end.
    config.write_text(extra + text if "=" in extra.split("\n")[0] else text + extra)
    done = ksz("run", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == f"ksz-proxy: {message}\n"


def test_an_only_route_table_misspelled_is_named_before_routes_are_missing(tmp_path: Path) -> None:
    issued = CertificateAuthority().issue_client("dym")
    issued.write_pkcs12(tmp_path / "x.p12")
    config = local_config(tmp_path, 'pkcs12 = "x.p12"')
    config.write_text(config.read_text().replace("[[routes]]", "[[route]]"))
    done = ksz("run", "-c", str(config), cwd=tmp_path)
    assert done.stderr == "ksz-proxy: route: unknown table [[route]] (did you mean [[routes]]?)\n"


# -- csr (items 14, 16) --------------------------------------------------------------------------


def test_csr_accepts_openssl_style_subjects(tmp_path: Path) -> None:
    done = ksz(
        "csr", "--subject", "/C=BE/O=Partner NV/OU=IT\\/Ops/CN=partner-acpt", "--key-type", "ec",
        "--key-out", "k.pem", "--csr-out", "r.csr", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    request = x509.load_pem_x509_csr((tmp_path / "r.csr").read_bytes())
    assert request.subject.rfc4514_string() == "CN=partner-acpt,OU=IT/Ops,O=Partner NV,C=BE"
    done = ksz(
        "csr", "--subject", "CN=partner-acpt,OU=IT/Ops,O=Partner NV,C=BE",
        "--key-out", "k2.pem", "--csr-out", "r2.csr", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    same = x509.load_pem_x509_csr((tmp_path / "r2.csr").read_bytes())
    assert same.subject == request.subject
    done = ksz(
        "csr", "--subject", "/C=BE/XX=y/CN=a", "--key-out", "k3", "--csr-out", "r3",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown attribute XX" in done.stderr


def test_help_texts_say_what_the_commands_do(tmp_path: Path) -> None:
    done = ksz("csr", "--help", cwd=tmp_path)
    assert "RSA 3072 (default)" in done.stdout
    assert "EC P-256" in done.stdout
    done = ksz("sandbox", "--help", cwd=tmp_path)
    assert "two calls" in done.stdout
    done = ksz("keystore", "--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "--password-file" in done.stdout


# -- pipes (item 7) ------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["cert-info", "check"])
def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path, command: str) -> None:
    issued = CertificateAuthority().issue_client("pipe")
    (tmp_path / "p.crt").write_bytes(issued.cert_pem())
    (tmp_path / "bad.toml").write_text("[listener]\n")
    args = ["cert-info", "p.crt"] if command == "cert-info" else ["check", "-c", "bad.toml"]
    reader, writer = os.pipe()
    os.close(reader)  # `| head -0`: the reader is gone before the first write
    try:
        done = subprocess.run(  # noqa: S603  # our own console script
            [str(KSZ_PROXY), *args],
            cwd=tmp_path,
            stdout=writer,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 1


# -- sandbox (item 15) ---------------------------------------------------------------------------


def test_sandbox_takes_log_level_after_the_command(tmp_path: Path) -> None:
    done = ksz("sandbox", "--demo", "--log-level", "info", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Demo succeeded." in done.stdout
    assert "token obtained" in done.stderr  # an info line, hidden at the default warning
    done = ksz("--log-level", "error", "sandbox", "--demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "token obtained" not in done.stderr


@pytest.mark.parametrize("option", ["--port", "--admin-port"])
def test_sandbox_port_clash_names_the_option(tmp_path: Path, option: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = ksz("sandbox", "--demo", option, str(port), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.startswith(f"ksz-proxy: {option}: cannot listen on 127.0.0.1:{port} (")
    assert f"choose another port with {option}" in done.stderr
    assert "Traceback" not in done.stderr


# -- token hints (item 9) -------------------------------------------------------------------------


def test_an_unreachable_token_endpoint_hint_names_no_forward_proxy(tmp_path: Path) -> None:
    # No [egress] section exists (issue 14): the hint must not send the operator after proxies.
    issued = CertificateAuthority().issue_client("hint")
    issued.write_pkcs12(tmp_path / "x.p12")
    config = local_config(tmp_path, 'pkcs12 = "x.p12"')
    done = ksz("--log-level", "info", "token", "-c", str(config), cwd=tmp_path)
    assert done.returncode == 1
    assert "reason: unreachable" in done.stdout
    said = (done.stdout + done.stderr).replace("ksz-proxy", "").replace("ksz_proxy", "")
    assert "fix:    check DNS" in said
    assert "prox" not in said.lower()
    # What the running proxy logs as the hint says the same.
    assert HINTS["unreachable"] == "check DNS and the firewall flow to the token endpoint"


# -- cert-info in its own words (item 11) --------------------------------------------------------


def test_cert_info_without_arguments_shows_how_to_call_it(tmp_path: Path) -> None:
    env_free = {k: v for k, v in os.environ.items() if k != "KSZ_PROXY_CONFIG"}
    done = subprocess.run(  # noqa: S603  # our own console script
        [str(KSZ_PROXY), "cert-info"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env_free,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: ksz-proxy cert-info")
    assert "give a FILE (.p12, .pfx, .crt, .pem) or -c CONFIG" in done.stderr


def test_cert_info_speaks_of_its_own_options(tmp_path: Path) -> None:
    issued = CertificateAuthority().issue_client("words")
    issued.write_pkcs12(tmp_path / "x.p12", b"right")
    write_private(tmp_path / "wrong", "wrong\n")
    done = ksz("cert-info", "x.p12", "--password-file", "wrong", cwd=tmp_path)
    assert done.returncode == 2
    assert "(--password-file / --password-env)" in done.stderr
    assert "client.password" not in done.stderr
    write_private(tmp_path / "k.pem", issued.key_pem())
    done = ksz("cert-info", "k.pem", cwd=tmp_path)
    assert done.returncode == 2
    assert "k.pem holds a private key and no certificate" in done.stderr
    write_private(tmp_path / "enc.pem", issued.key_pem(b"pw") + issued.cert_pem())
    done = ksz("cert-info", "enc.pem", cwd=tmp_path, stdin="")
    assert done.returncode == 2
    assert "client." not in done.stderr


def test_cert_info_refuses_to_export_an_expired_certificate(tmp_path: Path) -> None:
    now = datetime.now(UTC)
    issued = CertificateAuthority().issue_client(
        "old", not_before=now - timedelta(days=400), not_after=now - timedelta(days=2)
    )
    (tmp_path / "old.crt").write_bytes(issued.cert_pem())
    done = ksz("cert-info", "old.crt", "--export-crt", "to-ksz.crt", cwd=tmp_path)
    assert done.returncode == 1
    assert "Not exported to to-ksz.crt" in done.stdout
    assert "EXPIRED" in done.stdout
    assert not (tmp_path / "to-ksz.crt").exists()
