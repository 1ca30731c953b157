"""Test the deployment files: Dockerfile, Kubernetes, Compose, systemd, alert rules, dashboard.

``deploy/check.sh`` runs the tools that are not Python (hadolint, yamllint, promtool,
systemd-analyze). This module checks what needs ksz-proxy itself or a Kubernetes schema: the
overlays are rendered (a small renderer for the kustomize features used here, cross-checked with
``kubectl kustomize`` where it is installed) and validated with kubernetes-validate; every
shipped ksz-proxy.toml is loaded by ``parse_config``; the Kubernetes copy step is run on real
files; the Dockerfile's HEALTHCHECK probes a running proxy; the metric names in the alert rules
and the dashboard are compared with a running proxy's ``/metrics``; and the image's entry point
is run from a fresh virtual environment built from the wheel, as the Dockerfile builds it.
"""

from __future__ import annotations

import asyncio
import importlib
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Final, cast

import pytest
import yaml

from proxy import __version__
from proxy.config import Config, parse_config
from proxy.credentials import load_credentials
from proxy.endpoints import ENDPOINTS, Environment
from proxy.errors import ConfigError
from proxy.secret import check_private_file
from tests.support.chain import Chain
from tests.support.config import DEMO
from tests.support.partner import PartnerFiles

ROOT: Final = Path(__file__).resolve().parent.parent
DEPLOY: Final = ROOT / "deploy"
K8S: Final = DEPLOY / "kubernetes"
ENVIRONMENTS: Final[tuple[Environment, ...]] = ("test", "acpt", "prod")
# KSZ.md: the extranet REST entry points (port 4543).
KSZ_ENTRY_POINTS: Final = {"test": "85.91.184.96", "acpt": "85.91.184.103", "prod": "85.91.184.102"}
# RFC 5737 TEST-NET-1: the token endpoint placeholders match nothing until replaced.
PLACEHOLDER_NET: Final = ipaddress.IPv4Network("192.0.2.0/24")
UID: Final = 10001
CONTAINER_TMP: Final = "/tmp"  # noqa: S108  # a path inside the container, compared only
# The oldest Kubernetes with native sidecars, and the newest schema kubernetes-validate has.
KUBERNETES_VERSIONS: Final = ("1.29.0", "1.37.0")

kubernetes_validate = importlib.import_module("kubernetes_validate")

Manifest = dict[str, Any]


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a fixed command of ours (no shell) and return what it did."""
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)  # noqa: S603


def load_yaml(path: Path) -> Any:
    """Return the one YAML document in ``path``."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


# -- a small kustomize ---------------------------------------------------------------------------


def render(directory: Path) -> list[Manifest]:
    """Render a kustomization: resources (files and directories) and configMapGenerator files.

    The generated ConfigMap keeps its plain name (kustomize appends a content hash); anything
    else in a kustomization.yaml is refused, so a new feature fails here rather than being
    silently ignored.
    """
    kustomization = load_yaml(directory / "kustomization.yaml")
    unknown = set(kustomization) - {"apiVersion", "kind", "resources", "configMapGenerator"}
    assert not unknown, f"{directory}: the test renderer does not handle {sorted(unknown)}"
    manifests: list[Manifest] = []
    for entry in kustomization.get("resources", []):
        path = directory / entry
        if path.is_dir():
            manifests.extend(render(path))
        else:
            manifests.extend(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "files"}, generator
        data = {
            Path(name).name: (directory / name).read_text(encoding="utf-8")
            for name in generator["files"]
        }
        manifests.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": generator["name"]},
                "data": data,
            }
        )
    return manifests


def by_kind(manifests: list[Manifest]) -> dict[tuple[str, str], Manifest]:
    """Index manifests by (kind, name)."""
    return {(m["kind"], m["metadata"]["name"]): m for m in manifests}


def _without_hash(value: Any, names: set[str]) -> Any:
    if isinstance(value, dict):
        return {k: _without_hash(v, names) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_hash(v, names) for v in value]
    if isinstance(value, str):
        for name in names:
            if re.fullmatch(re.escape(name) + r"-[a-z0-9]{10}", value):
                return name
    return value


@pytest.fixture(scope="module", params=ENVIRONMENTS)
def environment(request: pytest.FixtureRequest) -> Environment:
    return cast(Environment, request.param)


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[tuple[str, str], Manifest]]:
    return {env: by_kind(render(K8S / "overlays" / env)) for env in ENVIRONMENTS}


def _deployment(manifests: Mapping[tuple[str, str], Manifest]) -> Manifest:
    return manifests[("Deployment", "legacy-app")]


def _pod(manifests: Mapping[tuple[str, str], Manifest]) -> Manifest:
    spec: Manifest = _deployment(manifests)["spec"]["template"]["spec"]
    return spec


def _container(pod: Manifest, name: str) -> Manifest:
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        if container["name"] == name:
            return dict(container)
    raise AssertionError(f"no container {name}")


def _mount(container: Manifest, volume: str) -> Manifest:
    mounts = [m for m in container.get("volumeMounts", []) if m["name"] == volume]
    assert len(mounts) == 1, f"{container['name']} mounts {volume} {len(mounts)} times"
    return dict(mounts[0])


def _config_text(manifests: Mapping[tuple[str, str], Manifest]) -> str:
    return str(manifests[("ConfigMap", "ksz-proxy-config")]["data"]["ksz-proxy.toml"])


def deployed_config(text: str, tmp_path: Path) -> Config:
    """Parse a shipped ksz-proxy.toml with its password file replaced by a private local one."""
    data = tomllib.loads(text)
    password = tmp_path / "password"
    if not password.exists():
        password.write_text("not-the-real-password\n", encoding="utf-8")
        password.chmod(0o400)
    data["client"]["password_file"] = str(password)
    return parse_config(data, {})


# -- Kubernetes ------------------------------------------------------------------------------


def test_overlays_render_like_kubectl_kustomize(
    rendered: dict[str, dict[tuple[str, str], Manifest]],
) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: overlays checked with the test renderer only")
    for env in ENVIRONMENTS:
        done = _run([kubectl, "kustomize", str(K8S / "overlays" / env)], timeout=60)
        assert done.returncode == 0, done.stderr
        theirs = by_kind(_without_hash(list(yaml.safe_load_all(done.stdout)), {"ksz-proxy-config"}))
        assert theirs == rendered[env]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_match_the_kubernetes_schema(
    rendered: dict[str, dict[tuple[str, str], Manifest]], environment: Environment, version: str
) -> None:
    manifests = rendered[environment]
    assert set(manifests) == {
        ("Deployment", "legacy-app"),
        ("ConfigMap", "ksz-proxy-config"),
        ("NetworkPolicy", "legacy-app-egress"),
    }
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, version, True)


def test_schema_check_catches_a_misspelt_field(
    rendered: dict[str, dict[tuple[str, str], Manifest]],
) -> None:
    deployment = json.loads(json.dumps(_deployment(rendered["prod"])))
    deployment["spec"]["template"]["spec"]["initContainers"][1]["readinessprobe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], True)


def test_configmap_holds_a_config_for_its_environment(
    rendered: dict[str, dict[tuple[str, str], Manifest]], environment: Environment, tmp_path: Path
) -> None:
    manifests = rendered[environment]
    config = deployed_config(_config_text(manifests), tmp_path)
    token_url, rest_base = ENDPOINTS[(environment, "extranet")]
    assert config.environment == environment
    assert config.oauth.token_url == token_url
    assert config.upstream.url == rest_base
    assert all(route.upstream == rest_base for route in config.routes)
    # The proxy listener stays in the pod; the admin listener is reachable by kubelet probes.
    assert config.listen.host == "127.0.0.1"
    assert config.listen.is_loopback
    assert config.admin.host == "0.0.0.0"  # noqa: S104  # the manifest's choice under test
    pod = _pod(manifests)
    proxy = _container(pod, "ksz-proxy")
    ports = {p["name"]: p["containerPort"] for p in proxy["ports"]}
    assert ports == {"admin": config.admin.port}
    assert pod["terminationGracePeriodSeconds"] > config.listen.drain_timeout_s
    # The config is mounted where the image looks for it.
    assert _mount(proxy, "ksz-proxy-config")["mountPath"] == str(
        Path(dockerfile_env()["KSZ_PROXY_CONFIG"]).parent
    )


def test_no_environment_names_another_environments_hosts(environment: Environment) -> None:
    texts = "\n".join(
        path.read_text(encoding="utf-8")
        for path in sorted((K8S / "overlays" / environment).iterdir())
    )
    for (other, _channel), urls in ENDPOINTS.items():
        if other == environment:
            continue
        for url in urls:
            host = url.split("/")[2].split(":")[0]
            assert host not in texts, f"overlay {environment} names {other}'s {host}"
        assert KSZ_ENTRY_POINTS[other] not in texts


def test_pod_is_hardened(rendered: dict[str, dict[tuple[str, str], Manifest]]) -> None:
    pod = _pod(rendered["prod"])
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] == UID
    # The copy step reads the Secret files through their group (see deployment.yaml).
    assert security["fsGroup"] == UID
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in [*pod["initContainers"], *pod["containers"]]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        for kind in ("requests", "limits"):
            assert set(container["resources"][kind]) == {"cpu", "memory"}, container["name"]


def test_proxy_is_a_native_sidecar_with_probes_on_the_admin_port(
    rendered: dict[str, dict[tuple[str, str], Manifest]],
) -> None:
    pod = _pod(rendered["prod"])
    assert [c["name"] for c in pod["initContainers"]] == ["ksz-credentials", "ksz-proxy"]
    proxy = _container(pod, "ksz-proxy")
    assert proxy["restartPolicy"] == "Always"
    assert "restartPolicy" not in _container(pod, "ksz-credentials")
    probes = {
        kind: (proxy[kind]["httpGet"]["path"], proxy[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert probes == {
        "startupProbe": ("/livez", "admin"),
        "livenessProbe": ("/livez", "admin"),
        "readinessProbe": ("/readyz", "admin"),
    }
    annotations = _deployment(rendered["prod"])["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(proxy["ports"][0]["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"
    # A read-only root filesystem, and /tmp in memory for the mTLS key's temporary file.
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = [m for m in proxy["volumeMounts"] if m["mountPath"] == CONTAINER_TMP]
    assert len(tmp) == 1 and volumes[tmp[0]["name"]]["emptyDir"]["medium"] == "Memory"


def test_secret_reaches_the_proxy_only_as_private_copies(
    rendered: dict[str, dict[tuple[str, str], Manifest]], tmp_path: Path
) -> None:
    manifests = rendered["prod"]
    pod = _pod(manifests)
    volumes = {v["name"]: v for v in pod["volumes"]}
    secret = volumes["ksz-proxy-secret"]["secret"]
    assert secret["defaultMode"] == 0o400
    assert volumes["ksz-proxy-credentials"]["emptyDir"]["medium"] == "Memory"
    copier = _container(pod, "ksz-credentials")
    proxy = _container(pod, "ksz-proxy")
    secret_dir = _mount(copier, "ksz-proxy-secret")["mountPath"]
    copies_dir = _mount(proxy, "ksz-proxy-credentials")["mountPath"]
    assert _mount(copier, "ksz-proxy-secret")["readOnly"] is True
    assert _mount(proxy, "ksz-proxy-credentials")["readOnly"] is True
    # Only the copy step mounts the Secret itself.
    for container in [*pod["initContainers"], *pod["containers"]]:
        if container["name"] != "ksz-credentials":
            names = {m["name"] for m in container.get("volumeMounts", [])}
            assert "ksz-proxy-secret" not in names, container["name"]
    keys = [item["path"] for item in secret["items"]]
    assert copier["command"] == [
        "install",
        "-m",
        "0400",
        "-t",
        copies_dir,
        *(f"{secret_dir}/{key}" for key in keys),
    ]
    client = tomllib.loads(_config_text(manifests))["client"]
    assert {client["pkcs12"], client["password_file"]} == {f"{copies_dir}/{k}" for k in keys}


def test_copy_step_turns_fsgroup_files_into_files_ksz_proxy_accepts(
    rendered: dict[str, dict[tuple[str, str], Manifest]],
    partner_files: PartnerFiles,
    tmp_path: Path,
) -> None:
    if shutil.which("install") is None:
        pytest.skip("coreutils install not available")
    manifests = rendered["acpt"]
    pod = _pod(manifests)
    copier = _container(pod, "ksz-credentials")

    def local(path: str) -> Path:
        return tmp_path / path.lstrip("/")

    # What kubelet makes of the Secret with fsGroup: group-readable files, refused as they are.
    secret_dir = local(_mount(copier, "ksz-proxy-secret")["mountPath"])
    secret_dir.mkdir(parents=True)
    shutil.copyfile(partner_files.pkcs12, secret_dir / "keystore.p12")
    shutil.copyfile(partner_files.password_file, secret_dir / "key-password")
    for path in secret_dir.iterdir():
        path.chmod(0o440)
    with pytest.raises(ConfigError, match="readable by group or others"):
        check_private_file(secret_dir / "keystore.p12", "client.pkcs12")

    local(_mount(copier, "ksz-proxy-credentials")["mountPath"]).mkdir(parents=True)
    command = [arg if not arg.startswith("/") else str(local(arg)) for arg in copier["command"]]
    done = _run([str(shutil.which(command[0])), *command[1:]], timeout=30)
    assert done.returncode == 0, done.stderr

    data = tomllib.loads(_config_text(manifests))
    for key in ("pkcs12", "password_file"):
        copy = local(data["client"][key])
        assert copy.stat().st_mode & 0o777 == 0o400
        data["client"][key] = str(copy)
    config = parse_config(data, {})
    credentials = load_credentials(config.client)
    assert credentials.days_left() > 0


def test_network_policy_allows_only_dns_token_endpoint_and_ksz(
    rendered: dict[str, dict[tuple[str, str], Manifest]], environment: Environment
) -> None:
    manifests = rendered[environment]
    policy = manifests[("NetworkPolicy", "legacy-app-egress")]["spec"]
    pod_labels = _deployment(manifests)["spec"]["template"]["metadata"]["labels"]
    assert policy["policyTypes"] == ["Egress"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    allowed: dict[tuple[str, int], list[Manifest]] = {}
    for rule in policy["egress"]:
        for port in rule["ports"]:
            allowed.setdefault((port["protocol"], port["port"]), []).extend(rule["to"])
    assert set(allowed) == {("UDP", 53), ("TCP", 53), ("TCP", 443), ("TCP", 4543)}
    dns = {json.dumps(peer, sort_keys=True) for peer in allowed[("UDP", 53)]}
    assert len(dns) == 1 and "kube-dns" in dns.pop()
    ksz = [peer["ipBlock"]["cidr"] for peer in allowed[("TCP", 4543)]]
    assert ksz == [f"{KSZ_ENTRY_POINTS[environment]}/32"]
    token = [ipaddress.IPv4Network(peer["ipBlock"]["cidr"]) for peer in allowed[("TCP", 443)]]
    assert token and all(net.subnet_of(PLACEHOLDER_NET) for net in token)
    # Each placeholder is marked as such on its line, naming the host to resolve.
    text = (K8S / "overlays" / environment / "networkpolicy.yaml").read_text(encoding="utf-8")
    token_host = ENDPOINTS[(environment, "extranet")][0].split("/")[2]
    for net in token:
        assert re.search(rf"cidr: {re.escape(str(net))}\s+# PLACEHOLDER: {token_host}\n", text)


def test_pod_monitor_scrapes_the_admin_port_as_the_rules_job(
    rendered: dict[str, dict[tuple[str, str], Manifest]],
) -> None:
    monitor = load_yaml(K8S / "extras" / "podmonitor.yaml")
    assert monitor["kind"] == "PodMonitor"
    pod_labels = _deployment(rendered["prod"])["spec"]["template"]["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    proxy = _container(_pod(rendered["prod"]), "ksz-proxy")
    assert endpoint["port"] in {p["name"] for p in proxy["ports"]}
    assert endpoint["path"] == "/metrics"
    [relabel] = endpoint["relabelings"]
    assert relabel["targetLabel"] == "job"
    jobs = {job for rule in rules() for job in re.findall(r'job="([^"]+)"', rule["expr"])}
    assert jobs == {relabel["replacement"]}


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """Return the Dockerfile's instructions as (INSTRUCTION, arguments), continuations joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        word, _, rest = (pending + stripped).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    return instructions


def dockerfile_env() -> dict[str, str]:
    """Return the ENV of the Dockerfile's final stage."""
    final: dict[str, str] = {}
    for word, rest in dockerfile():
        if word == "FROM":
            final = {}
        elif word == "ENV":
            for assignment in re.findall(r"(\w+=\S+)", rest):
                name, _, value = assignment.partition("=")
                final[name] = value
    return final


def healthcheck_command() -> list[str]:
    """Return the HEALTHCHECK's exec-form command."""
    [rest] = [rest for word, rest in dockerfile() if word == "HEALTHCHECK"]
    _, _, command = rest.partition(" CMD ")
    argv: list[str] = json.loads(command)
    return argv


def test_dockerfile_contract() -> None:
    instructions = dockerfile()
    words = [word for word, _ in instructions]
    stages = [i for i, word in enumerate(words) if word == "FROM"]
    assert len(stages) == 2
    final = instructions[stages[-1] :]
    build = instructions[: stages[-1]]
    assert build[stages[0]][1].endswith(" AS build")
    final_dict: dict[str, list[str]] = {}
    for word, rest in final:
        final_dict.setdefault(word, []).append(rest)
    # A fixed, numeric, non-root user (Kubernetes' runAsNonRoot can only verify a number).
    assert final_dict["USER"] == [f"{UID}:{UID}"]
    assert final_dict["EXPOSE"] == ["8080 9090"]
    assert final_dict["STOPSIGNAL"] == ["SIGTERM"]
    assert json.loads(final_dict["CMD"][0]) == ["ksz-proxy", "run"]
    assert "ENTRYPOINT" not in final_dict
    assert dockerfile_env()["KSZ_PROXY_CONFIG"] == "/etc/ksz-proxy/ksz-proxy.toml"
    labels = " ".join(final_dict["LABEL"])
    for label in ("title", "description", "version", "revision", "licenses", "created"):
        assert f"org.opencontainers.image.{label}=" in labels
    # No build tools in the final stage: it copies the environment built in the first.
    assert not any("apt-get" in rest or "pip" in rest for word, rest in final if word == "RUN")
    assert [rest for word, rest in final if word == "COPY"] == [
        "--from=build /opt/ksz-proxy /opt/ksz-proxy"
    ]
    # Only the package and its metadata enter the image: never a config or key material.
    copied = [rest for word, rest in build if word == "COPY"]
    assert copied == [
        "requirements.lock requirements-build.lock ./",
        "pyproject.toml README.md ./",
        "proxy ./proxy",
    ]
    # What is fetched is hash-checked against the locks (tests/test_image.py compares the
    # result); the package's own wheel is then built and installed offline.
    [fetch] = [rest for word, rest in build if word == "RUN" and "-r requirements.lock" in rest]
    assert fetch.count("--require-hashes") == fetch.count(" -r ") == 2
    offline = [rest for word, rest in build if word == "RUN" and rest != fetch]
    assert all(rest.count("--no-index") == 2 for rest in offline if " pip " in rest)
    argv = healthcheck_command()
    assert argv[:2] == ["python", "-c"]
    assert "http://127.0.0.1:9090/livez" in argv[2]


def test_dockerignore_is_an_allow_list() -> None:
    lines = [
        line
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line and not line.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {
        "pyproject.toml",
        "requirements.lock",
        "requirements-build.lock",
        "README.md",
        "proxy",
    }
    for pattern in ("**/*.p12", "**/*.pfx", "**/*.key", "**/*.pem"):
        assert pattern in lines


async def _healthcheck(url: str) -> int:
    # A proxy in the environment must not catch the loopback probe.
    environ = {**os.environ, "KSZ_PROXY_HEALTHCHECK_URL": url, "HTTP_PROXY": "http://127.0.0.1:9"}
    environ["http_proxy"] = environ["HTTP_PROXY"]
    argv = healthcheck_command()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *argv[1:],
        env=environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    return await asyncio.wait_for(process.wait(), timeout=30)


async def test_healthcheck_probes_livez_on_the_admin_listener(chain: Chain) -> None:
    assert await _healthcheck(chain.proxy.admin_url + "/livez") == 0
    # The admin paths do not exist on the proxy listener: the probe must fail there.
    assert await _healthcheck(chain.url + "/livez") != 0


@pytest.mark.slow
def test_image_entry_point_runs_from_a_venv_built_from_the_wheel(tmp_path: Path) -> None:
    # The Dockerfile's build stage, step by step: wheel, venv without pip, binary-only install.
    dist = tmp_path / "dist"
    done = _run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(dist), "."],
        cwd=ROOT,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    [wheel] = dist.glob("ksz_proxy-*.whl")
    env_dir = tmp_path / "opt-ksz-proxy"
    done = _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], timeout=60)
    assert done.returncode == 0, done.stderr
    python = env_dir / "bin" / "python"
    pip = [sys.executable, "-m", "pip", "--python", str(python)]
    done = _run([*pip, "install", "-q", "--only-binary=:all:", str(wheel)], timeout=120)
    assert done.returncode == 0, done.stderr
    ksz_proxy = str(env_dir / "bin" / "ksz-proxy")
    # Run from elsewhere, so the source tree is not what gets imported.
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    done = _run([ksz_proxy, "--version"], cwd=tmp_path, env=environ, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ksz-proxy {__version__}"

    done = _run([ksz_proxy, "sandbox", "--demo"], cwd=tmp_path, env=environ, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "-> 200" in done.stdout

    # The image's CMD with the image's KSZ_PROXY_CONFIG: with nothing mounted there, it says so.
    config = dockerfile_env()["KSZ_PROXY_CONFIG"]
    if Path(config).exists():
        pytest.skip(f"{config} exists on this machine")
    environ["KSZ_PROXY_CONFIG"] = config
    done = _run([ksz_proxy, "run"], cwd=tmp_path, env=environ, timeout=30)
    assert done.returncode == 2
    assert f"config: file {config} does not exist" in done.stderr


# -- Compose ---------------------------------------------------------------------------------


def test_compose_runs_the_proxy_as_a_hardened_sidecar(tmp_path: Path) -> None:
    compose = load_yaml(DEPLOY / "compose" / "compose.yaml")
    proxy = compose["services"]["ksz-proxy"]
    app = compose["services"]["app"]
    assert app["network_mode"] == "service:ksz-proxy"
    assert app["depends_on"]["ksz-proxy"]["condition"] == "service_healthy"
    assert "ports" not in app
    assert proxy["user"] == f"{UID}:{UID}"
    assert proxy["read_only"] is True
    assert [mount.split(":")[0] for mount in proxy["tmpfs"]] == [CONTAINER_TMP]
    assert proxy["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in proxy["security_opt"]
    assert all(port.startswith("127.0.0.1:") for port in proxy["ports"])
    config_path = dockerfile_env()["KSZ_PROXY_CONFIG"]
    [mount] = proxy["volumes"]
    assert (mount["target"], mount["read_only"]) == (config_path, True)
    text = (DEPLOY / "compose" / mount["source"]).read_text(encoding="utf-8")
    config = deployed_config(text, tmp_path)
    assert config.listen.is_loopback
    assert f"0:{config.admin.port}" in " ".join(proxy["ports"])
    grace_s = int(proxy["stop_grace_period"].removesuffix("s"))
    assert grace_s > config.listen.drain_timeout_s
    targets = {secret["target"] for secret in proxy["secrets"]}
    client = tomllib.loads(text)["client"]
    assert targets == {client["pkcs12"], client["password_file"]}
    assert {s["source"] for s in proxy["secrets"]} == set(compose["secrets"])


# -- systemd ---------------------------------------------------------------------------------


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Return each ``[Service]``/``[Unit]``/``[Install]`` key with all its values, in order."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(value)
    return settings


def test_systemd_unit_hardening_and_credentials(tmp_path: Path) -> None:
    unit = unit_settings(DEPLOY / "systemd" / "ksz-proxy.service")

    def one(key: str) -> str:
        [value] = unit[f"Service.{key}"]
        return value

    assert one("User") == "ksz-proxy"
    users = (DEPLOY / "systemd" / "ksz-proxy.sysusers.conf").read_text(encoding="utf-8")
    assert re.search(r"^u\s+ksz-proxy\s", users, re.MULTILINE)
    assert one("ExecStart") == "/opt/ksz-proxy/bin/ksz-proxy run -c /etc/ksz-proxy/ksz-proxy.toml"
    assert one("ExecReload").endswith("kill -HUP $MAINPID")
    assert one("Restart") == "on-failure"
    for key, value in {
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert one(key) == value, key
    name, _, source = one("LoadCredential").partition(":")
    assert source.startswith("/etc/ksz-proxy/")

    text = (DEPLOY / "systemd" / "ksz-proxy.toml").read_text(encoding="utf-8")
    client = tomllib.loads(text)["client"]
    # The config is static TOML: the literal path of %d/<name> for this unit.
    assert client["password_file"] == f"/run/credentials/ksz-proxy.service/{name}"
    config = deployed_config(text, tmp_path)
    assert config.listen.is_loopback
    assert float(one("TimeoutStopSec").removesuffix("s")) > config.listen.drain_timeout_s


# -- alert rules and dashboard -----------------------------------------------------------------

METRIC: Final = re.compile(r"\bkszproxy_[a-z_]+\b")


def rules() -> list[Manifest]:
    """Return every rule of the alert rules file."""
    groups = load_yaml(DEPLOY / "prometheus" / "ksz-proxy.rules.yml")["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> Manifest:
    """Return the Grafana dashboard."""
    board: Manifest = json.loads(
        (DEPLOY / "grafana" / "ksz-proxy-dashboard.json").read_text(encoding="utf-8")
    )
    return board


def dashboard_panels() -> Iterator[Manifest]:
    """Yield every panel of the dashboard, rows excluded."""
    for panel in dashboard()["panels"]:
        if panel["type"] != "row":
            yield panel


def dashboard_queries() -> list[str]:
    """Return every PromQL query of the dashboard: panel targets and template variables."""
    queries = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["query"]["query"])
    return queries


def test_alert_rules_cover_the_operational_failures() -> None:
    alerts = {rule["alert"]: rule for rule in rules()}
    expected = {
        "KszProxyDown": "critical",
        "KszProxyCertificateExpiresSoon": "warning",
        "KszProxyCertificateExpiresVerySoon": "critical",
        "KszProxyTokenFetchFailing": "warning",
        "KszProxyNoUsableToken": "critical",
        "KszProxyUpstreamErrors": "warning",
    }
    for name, severity in expected.items():
        assert alerts[name]["labels"]["severity"] == severity
    assert "30 * 86400" in alerts["KszProxyCertificateExpiresSoon"]["expr"]
    assert "7 * 86400" in alerts["KszProxyCertificateExpiresVerySoon"]["expr"]
    for rule in alerts.values():
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert set(rule["annotations"]) == {"summary", "description"}
    # Every alert has a promtool unit test in which it fires.
    tests = load_yaml(DEPLOY / "prometheus" / "ksz-proxy.rules.test.yml")["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert fired == set(alerts)


def test_dashboard_is_well_formed() -> None:
    board = dashboard()
    assert board["uid"] == "ksz-proxy"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    boxes: list[tuple[int, int, int, int]] = []
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
        box = (grid["x"], grid["y"], grid["x"] + grid["w"], grid["y"] + grid["h"])
        for other in boxes:
            overlap = box[0] < other[2] and other[0] < box[2] and box[1] < other[3]
            assert not (overlap and other[1] < box[3]), panel["title"]
        boxes.append(box)
    for panel in dashboard_panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert 'job=~"$job"' in target["expr"], panel["title"]


def _exposed(text: str) -> tuple[set[str], set[str]]:
    """Return (sample names a query may use, metric families) of a /metrics page."""
    names: set[str] = set()
    families: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if name.endswith("_created"):
                continue
            families.add(name)
            names.add(name)
            if kind == "histogram":
                names.update(f"{name}_{suffix}" for suffix in ("bucket", "sum", "count"))
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names, families


async def test_every_metric_in_rules_and_dashboard_is_exposed(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/health") as response:
        assert response.status == 200
        await response.read()
    async with chain.session.get(chain.proxy.admin_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    names, families = _exposed(text)

    in_rules = {name for rule in rules() for name in METRIC.findall(rule["expr"])}
    in_dashboard = {name for query in dashboard_queries() for name in METRIC.findall(query)}
    assert in_rules and in_dashboard
    assert in_rules <= names, in_rules - names
    assert in_dashboard <= names, in_dashboard - names
    # The dashboard shows every metric ksz-proxy exposes.
    for family in families:
        variants = {family, f"{family}_bucket", f"{family}_sum", f"{family}_count"}
        assert variants & in_dashboard, f"{family} is on no dashboard panel"
