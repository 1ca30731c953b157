"""Build the container image with buildah and run it with podman, hardened (issue 18).

The module's fixture does what a partner does, through the project's own scripts: it installs the
tools when missing (deploy/image/tools.sh: buildah, podman, runc, debootstrap from Debian),
imports the stand-in for the Dockerfile's base image (deploy/image/base.sh: Docker Hub is out of
reach here; its root filesystem is cached under ~/.cache/ksz-proxy) and builds the Dockerfile
with the host's route to the package index and its CA bundle handed in as build argument and
build secret (deploy/image/build.sh = ``make image``, SBOM included).

Every container runs with the hardened flags of docs/container.md: read-only root, tmpfs /tmp,
no capabilities, no-new-privileges, no network but its own loopback, explicit ulimits; podman
with runc and cgroupfs (no systemd here). ``ksz-proxy run`` is PID 1 of its container with the
config mounted; the fake KSZ (tests/support/image_fakes.py: the sandbox's fakes from the image
itself) runs in a second container that joins the proxy's network namespace, and calls are made
from there with ``podman exec``: nothing crosses a real network.

The tests skip, saying why, only where no container can run at all (not root and no rootless
podman, or tools missing with no way to install them).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import pytest
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

from proxy import __version__
from proxy.sandbox.pki import CertificateAuthority
from tests.support import image_fakes

ROOT: Final = Path(__file__).resolve().parent.parent
UID: Final = 10001
PODMAN: Final = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
HARDENED: Final = [
    "--read-only",
    "--tmpfs",
    "/tmp",  # noqa: S108 (the container's own tmpfs)
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
    "--ulimit",
    "nofile=4096:4096",
    "--ulimit",
    "nproc=512:512",
]
API: Final = "/REST/image/v1"
PROXY: Final = "http://127.0.0.1:8080"
ADMIN: Final = "http://127.0.0.1:9090"
# Building can take a while with a cold cache (the stand-in base, the dependencies from PyPI).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _run(argv: list[str], *, timeout: float, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a fixed command of ours (no shell) and return what it did."""
    return subprocess.run(  # noqa: S603
        argv, capture_output=True, text=True, check=False, timeout=timeout, **kwargs
    )


def _must(argv: list[str], *, timeout: float = 60, **kwargs: Any) -> str:
    done = _run(argv, timeout=timeout, **kwargs)
    assert done.returncode == 0, f"{argv}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    sbom: Path

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a throw-away hardened container without network."""
        return _run(
            [
                *PODMAN,
                "run",
                "--rm",
                *HARDENED,
                "--network",
                "none",
                "--no-healthcheck",
                self.name,
                *argv,
            ],
            timeout=timeout,
        )


def _script(name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run deploy/image/<name>; its time shows with ``pytest -s``. Exit 3: cannot run here."""
    started = time.monotonic()
    done = _run(["bash", f"deploy/image/{name}"], cwd=ROOT, timeout=900, env=env)
    print(f"deploy/image/{name}: exit {done.returncode} in {time.monotonic() - started:.0f} s")
    if done.returncode == 3:
        pytest.skip(f"deploy/image/{name}: {done.stderr.strip()}")
    assert done.returncode == 0, f"deploy/image/{name}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    _script("tools.sh")  # exit 3: tools missing and no way to install them (not root)
    if os.geteuid() != 0:
        rootless = _run(["podman", "info"], timeout=60)
        if rootless.returncode != 0:
            pytest.skip(f"not root and no rootless podman: {rootless.stderr.strip()[-300:]}")
    _script("base.sh")  # exit 3: not root and no base image in the user's storage
    dist = tmp_path_factory.mktemp("dist")
    _script("build.sh", env={**os.environ, "VENV": sys.prefix, "KSZ_IMAGE_DIST": str(dist)})
    return Image(
        name=f"localhost/ksz-proxy:{__version__}", sbom=dist / f"ksz-proxy-{__version__}.cdx.json"
    )


def _lock(path: Path) -> dict[str, str]:
    """Return name -> version of every requirement pinned in a lock file, names normalised."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\]+)", path.read_text(), re.M)
    return {_normal(name): version for name, version in pins}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_locks_follow_pyproject() -> None:
    # No container needed: the locks name what pyproject.toml asks for (the image build's
    # `pip check` then proves the versions satisfy it).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    [backend] = project["build-system"]["requires"]
    name, _, version = backend.partition("==")
    assert version, f"the build backend is not pinned: {backend}"
    assert _lock(ROOT / "requirements-build.lock")[_normal(name)] == version
    wanted = {
        _normal(re.split(r"[\[<>=!~; ]", dep)[0]) for dep in project["project"]["dependencies"]
    }
    assert wanted <= set(_lock(ROOT / "requirements.lock"))
    # Every pin carries its hashes (pip's --require-hashes refuses the lock otherwise).
    for file in ("requirements.lock", "requirements-build.lock"):
        text = (ROOT / file).read_text(encoding="utf-8")
        hashed = re.findall(r"^\S+==\S+ \\\n\s+--hash=sha256:[0-9a-f]{64}", text, re.M)
        assert len(hashed) == len(_lock(ROOT / file)) > 0
        assert "make lock" in text


def test_image_metadata_user_and_version(image: Image) -> None:
    [inspected] = json.loads(_must([*PODMAN, "image", "inspect", image.name]))
    config = inspected["Config"]
    assert config["User"] == f"{UID}:{UID}"
    # Built with --format docker: the OCI format would have dropped the HEALTHCHECK.
    assert "/livez" in " ".join(inspected["Healthcheck"]["Test"])
    assert inspected["ManifestType"] == "application/vnd.docker.distribution.manifest.v2+json"
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.base.name"] == "python:3.13-slim-trixie"
    assert config["Cmd"] == ["ksz-proxy", "run"]

    done = image.run("id")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"uid={UID}(ksz-proxy) gid={UID}(ksz-proxy)")
    done = image.run("ksz-proxy", "--version")
    assert (done.returncode, done.stdout.strip()) == (0, f"ksz-proxy {__version__}")


def test_the_build_refuses_a_version_label_other_than_the_package(
    image: Image, tmp_path: Path
) -> None:
    # Same script, same cached layers; a later --build-arg overrides build.sh's own.
    env = {**os.environ, "VENV": sys.prefix, "KSZ_IMAGE_DIST": str(tmp_path)}
    env["KSZ_IMAGE"] = "localhost/ksz-proxy:version-refused"
    argv = ["bash", "deploy/image/build.sh", "--target", "build", "--build-arg", "VERSION=0.0.0"]
    done = _run(argv, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 1
    said = done.stdout + done.stderr
    assert f"--build-arg VERSION=0.0.0 but the package says: ksz-proxy {__version__}" in said
    assert _run([*PODMAN, "image", "exists", env["KSZ_IMAGE"]], timeout=60).returncode == 1
    assert list(tmp_path.iterdir()) == []  # no SBOM for an image that was not built


def test_sandbox_demo_runs_in_the_hardened_image(image: Image) -> None:
    done = image.run("ksz-proxy", "sandbox", "--demo", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Demo succeeded." in done.stdout
    assert done.stdout.count("-> 200") == 2


def test_installed_packages_match_the_lock_and_the_sbom(image: Image) -> None:
    lock = _lock(ROOT / "requirements.lock")
    listing = (
        "import importlib.metadata as m, json; "
        "print(json.dumps([[d.metadata['Name'], d.version] for d in m.distributions()]))"
    )
    done = image.run("python", "-c", listing)
    assert done.returncode == 0, done.stderr
    installed = {_normal(name): version for name, version in json.loads(done.stdout)}
    # Exactly the lock and the package itself: no pip, no build backend, nothing unlocked.
    assert installed == {**lock, "ksz-proxy": __version__}

    text = image.sbom.read_text(encoding="utf-8")
    # Valid CycloneDX 1.6 also after build.sh named the root's version and dependencies.
    assert JsonStrictValidator(SchemaVersion.V1_6).validate_str(text) is None
    sbom = json.loads(text)
    assert (sbom["bomFormat"], sbom["specVersion"]) == ("CycloneDX", "1.6")
    root = sbom["metadata"]["component"]
    assert (root["name"], root["version"]) == ("ksz-proxy", __version__)
    components = {_normal(c["name"]): c["version"] for c in sbom["components"]}
    assert components == lock
    assert all(c["purl"].startswith("pkg:pypi/") for c in sbom["components"])
    [root_deps] = [d for d in sbom["dependencies"] if d["ref"] == root["bom-ref"]]
    assert len(root_deps["dependsOn"]) == len(lock)


@dataclass(slots=True)
class Pair:
    """The proxy container (PID 1: ksz-proxy run) and the fake KSZ in its network namespace."""

    proxy: str
    fake: str

    def get(self, url: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """GET ``url`` from inside the namespace; the client prints status and body."""
        return _run([*PODMAN, "exec", self.fake, "python", "-c", _CLIENT, url], timeout=timeout)

    def fake_saw(self) -> list[dict[str, Any]]:
        logs = _must([*PODMAN, "logs", self.fake])
        return [json.loads(line) for line in logs.splitlines() if line.startswith("{")]


_CLIENT: Final = (
    "import sys, urllib.request as u\n"
    "request = u.Request(sys.argv[1], "
    "headers={'BelGov-Trace-Id': 'image-test'})\n"
    "with u.build_opener(u.ProxyHandler({})).open(request, timeout=20) as r:\n"
    "    print(r.status, r.read().decode())\n"
)


def _config(folder: Path) -> None:
    """Write the proxy's mounted config folder and the fake KSZ's files, owned by the image user."""
    tls = CertificateAuthority("image test TLS CA")
    server = tls.issue_server("127.0.0.1")
    partner = CertificateAuthority("image test partner CA").issue_client("image test partner")
    config, fakes = folder / "config", folder / "fakes"
    for path in (config, fakes):
        path.mkdir(mode=0o700)
    password = uuid.uuid4().hex
    files = {
        config / "partner.p12": partner.pkcs12(password.encode()),
        config / "partner.password": password.encode(),
        config / "tls-ca.pem": tls.cert_pem(),
        fakes / "server-cert.pem": server.cert_pem(),
        fakes / "server-key.pem": server.key_pem(),
        fakes / "partner-cert.pem": partner.cert_pem(),
        fakes / "image_fakes.py": Path(image_fakes.__file__).read_bytes(),
        config / "ksz-proxy.toml": f"""\
channel = "extranet"

[client]
id = "{image_fakes.CLIENT_ID}"
pkcs12 = "partner.p12"
password_file = "partner.password"

[oauth]
token_url = "https://127.0.0.1:{image_fakes.AUTH_PORT}/REST/oauth/v5/token"
ca_file = "tls-ca.pem"
# The fake KSZ starts after the proxy: retry the first token quickly.
retry_initial_s = 0.1
retry_max_s = 0.5

[upstream]
url = "https://127.0.0.1:{image_fakes.API_PORT}"
ca_file = "tls-ca.pem"

[listen]
port = 8080
drain_timeout_s = 15

[admin]
port = 9090

[[routes]]
prefix = "{API}"
scopes = ["{image_fakes.SCOPE}"]
""".encode(),
    }
    for path, data in files.items():
        path.write_bytes(data)
        path.chmod(0o400)
    # Owned by the image's user, as a partner's key files must be (rootless podman maps the
    # container's 10001 to a subordinate UID of the caller: chown from inside its namespace).
    owned = [str(path) for path in (config, fakes, *files)]
    if os.geteuid() == 0:
        for name in owned:
            os.chown(name, UID, UID)
    else:
        _must(["podman", "unshare", "chown", f"{UID}:{UID}", *owned])


@pytest.fixture
def pair(image: Image, tmp_path: Path) -> Iterator[Pair]:
    tmp_path.chmod(0o755)
    _config(tmp_path)
    name = f"ksz-proxy-image-test-{uuid.uuid4().hex[:8]}"
    pair = Pair(proxy=f"{name}-proxy", fake=f"{name}-fake")
    try:
        _must(
            [
                *PODMAN,
                "run",
                "--detach",
                "--name",
                pair.proxy,
                *HARDENED,
                "--network",
                "none",
                # No systemd here to run the HEALTHCHECK on a timer; `healthcheck run` runs it.
                "--health-interval",
                "disable",
                "--volume",
                f"{tmp_path / 'config'}:/etc/ksz-proxy:ro",
                image.name,
            ]
        )
        _must(
            [
                *PODMAN,
                "run",
                "--detach",
                "--name",
                pair.fake,
                *HARDENED,
                "--network",
                f"container:{pair.proxy}",
                # Its HEALTHCHECK probes a port where nothing listens: the unhealthy case.
                "--health-interval",
                "disable",
                "--env",
                "KSZ_PROXY_HEALTHCHECK_URL=http://127.0.0.1:9091/livez",
                "--volume",
                f"{tmp_path / 'fakes'}:/fakes:ro",
                image.name,
                "python",
                "/fakes/image_fakes.py",
                "/fakes",
            ]
        )
        yield pair
    finally:
        for container in (pair.fake, pair.proxy):
            _run([*PODMAN, "rm", "--force", "--time", "0", container], timeout=60)
        if os.geteuid() != 0:  # give the files back, so that pytest can remove them
            _run(["podman", "unshare", "chown", "-R", "0:0", str(tmp_path)], timeout=60)


def _until(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_run_as_pid_1_serves_a_call_is_healthy_and_drains_on_sigterm(pair: Pair) -> None:
    # Ready once the proxy holds its first token from the fake KSZ, started after it.
    _until(lambda: pair.get(ADMIN + "/readyz").returncode == 0, "the proxy's readiness")
    cmdline = _must([*PODMAN, "exec", pair.proxy, "cat", "/proc/1/cmdline"])
    assert cmdline.split("\0")[:3] == [
        "/opt/ksz-proxy/bin/python",
        "/opt/ksz-proxy/bin/ksz-proxy",
        "run",
    ]

    # The HEALTHCHECK: healthy against the admin port; unhealthy where nothing listens (the
    # fake's container, whose probe is pointed at a free port; still "starting" as a status, as
    # failures within the start period do not count yet).
    assert _run([*PODMAN, "healthcheck", "run", pair.proxy], timeout=60).returncode == 0
    status = [*PODMAN, "inspect", "--format", "{{.State.Health.Status}}"]
    assert _must([*status, pair.proxy]).strip() == "healthy"
    done = _run([*PODMAN, "healthcheck", "run", pair.fake], timeout=60)
    assert (done.returncode, done.stdout.strip()) == (1, "unhealthy"), done.stderr

    # A call through the proxy: the fake KSZ API saw it with a bearer token.
    done = pair.get(f"{PROXY}{API}/persons/85073003328")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("200 ")
    _until(
        lambda: any(s["target"] == f"{API}/persons/85073003328" for s in pair.fake_saw()),
        "the call",
    )
    [seen] = [s for s in pair.fake_saw() if s["target"] == f"{API}/persons/85073003328"]
    assert (seen["bearer"], seen["trace_id"]) == (1, "image-test")

    # SIGTERM while a call is in flight: the call completes, then ksz-proxy exits 0.
    slow = subprocess.Popen(  # noqa: S603
        [*PODMAN, "exec", pair.fake, "python", "-c", _CLIENT, f"{PROXY}{API}/stall?seconds=5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _until(
            lambda: any(s["target"].endswith("/stall?seconds=5") for s in pair.fake_saw()),
            "the slow call",
        )
        _must([*PODMAN, "kill", "--signal", "TERM", pair.proxy])
        out, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert slow.returncode == 0, err
    assert out.startswith("200 ")
    assert _must([*PODMAN, "wait", pair.proxy], timeout=60).strip() == "0"
    # The slow call's access line comes after the drain began: it was served while draining.
    logs = _run([*PODMAN, "logs", pair.proxy], timeout=60)
    lines = (logs.stdout + logs.stderr).splitlines()
    [stopping] = [i for i, line in enumerate(lines) if "stopping: draining in-flight" in line]
    stall = f'"path": "{API}/stall"'  # the access line names the path without its query
    [served] = [i for i, line in enumerate(lines) if '"request"' in line and stall in line]
    assert stopping < served
    assert '"ksz-proxy stopped"' in lines[-1]
    assert not any("drain time over" in line for line in lines)


def test_no_container_or_process_of_the_tests_is_left() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed")
    names = _must([*PODMAN, "ps", "--all", "--format", "{{.Names}}"])
    assert "ksz-proxy-image-test-" not in names
    # Nor a conmon or `podman exec` still naming one of them (conmon carries the name).
    left = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if b"ksz-proxy-image-test-" in cmdline.read_bytes():
                left.append(cmdline.parent.name)
    assert left == []
