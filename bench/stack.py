"""Own the benchmark's stack: certificates, configurations, and starting every server.

All on 127.0.0.1, in processes of their own (see bench/README.md):

- ``upstream``: nginx over TLS serving a small JSON document and a 64 KiB one (the REST API);
- ``fakes``: bench/fakes.py -- the fake authorization server and the fake KSZ REST API;
- ``nginx``: the reference proxy, nginx adding a static ``Authorization`` header;
- ``bare``: bench/bare.py, the bare aiohttp pass-through proxy;
- ``floor``: bench/floor.py, ksz-proxy's stack (aiohttp server, its own upstream client) and
  nothing else -- the ceiling for one ksz-proxy process;
- ``ksz`` / ``ksz-warn``: ksz-proxy at the default log level and at ``--log-level warning``;
- ``ksz-w2``: ksz-proxy at the default log level with ``listen.workers = 2``;
- ``cand1``, ``cand2``, ... (optional): ksz-proxy from other source trees (``PYTHONPATH``),
  to try a change side by side.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from procs import Proc, Processes, free_port, http_call, port_open, rss_kib, wait_until

from proxy.sandbox.pki import CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
API = "/REST/bench/v1"
STREAM_API = "/REST/stream/v1"
CLIENT_ID = "bench:client:confidential"  # as registered by bench/fakes.py
SCOPE = "scope:bench:consult"
GiB = 1 << 30
SMALL_BODY = (
    b'{"status": "UP", "service": "bench", "ssin": "85073003328", '
    b'"name": {"first": "Jan", "last": "Peeters"}}\n'
)
# body label -> (document name, content)
BODIES = {"small": ("small.json", SMALL_BODY), "64KiB": ("large.bin", os.urandom(64 * 1024))}
LABELS = {
    "direct": "direct (https)",
    "nginx": "nginx proxy",
    "bare": "bare aiohttp",
    "floor": "floor (aiohttp server + own client)",
    "ksz": "ksz-proxy (info)",
    "ksz-warn": "ksz-proxy (warning)",
    "ksz-w2": "ksz-proxy (info, 2 workers)",
}


@dataclass(slots=True)
class KszProxy:
    """One running ksz-proxy process."""

    proc: Proc
    port: int
    admin_port: int
    started_s: float  # from spawn to /readyz 200
    idle_rss_kib: int  # summed over the supervisor and its workers (listen.workers > 1)
    workers: int = 1


@dataclass(slots=True)
class Stack:
    """Where everything listens, and the processes behind it."""

    folder: Path
    keys: Path
    procs: Processes
    upstream: Proc | None = None
    nginx: Proc | None = None
    bare: Proc | None = None
    floor: Proc | None = None
    upstream_port: int = 0
    nginx_port: int = 0
    bare_port: int = 0
    floor_port: int = 0
    fakes: dict[str, str] = field(default_factory=dict)
    ksz: dict[str, KszProxy] = field(default_factory=dict)

    @property
    def origin(self) -> str:
        """Return the upstream nginx's origin (https)."""
        return f"https://127.0.0.1:{self.upstream_port}"

    @property
    def targets(self) -> tuple[str, ...]:
        """Return the targets wrk measures, direct first."""
        return ("direct", "nginx", "bare", "floor", *self.ksz)

    def url(self, target: str, body: str) -> str:
        """Return the URL wrk calls for ``target`` and ``body``."""
        path = f"{API}/{BODIES[body][0]}"
        if target == "direct":
            return f"https://127.0.0.1:{self.upstream_port}{path}"
        port = {"nginx": self.nginx_port, "bare": self.bare_port, "floor": self.floor_port}.get(
            target
        )
        if port is None:
            port = self.ksz[target].port
        return f"http://127.0.0.1:{port}{path}"

    def proxy_pids(self, target: str) -> list[int]:
        """Return the processes doing the proxy's work for ``target`` (none for direct)."""
        if target == "direct":
            return []
        proc = {"nginx": self.nginx, "bare": self.bare, "floor": self.floor}.get(target)
        if proc is None:
            proc = self.ksz[target].proc
        return proc.tree()

    def upstream_pids(self) -> list[int]:
        """Return the upstream nginx's processes."""
        return self.upstream.tree() if self.upstream is not None else []


def write_files(folder: Path) -> Path:
    """Write the certificates, keys, partner keystore and the upstream's documents."""
    keys = folder / "keys"
    keys.mkdir(mode=0o700)
    tls_ca = CertificateAuthority("ksz-proxy bench TLS CA")
    server = tls_ca.issue_server("localhost", "127.0.0.1")
    server.write_pem(keys / "server.key", keys / "server.pem")
    (keys / "ca.pem").write_bytes(tls_ca.cert_pem())
    partner = CertificateAuthority("ksz-proxy bench partner CA").issue_client("bench partner")
    password = secrets.token_urlsafe(16)
    partner.write_pkcs12(keys / "partner.p12", password.encode())
    fd = os.open(keys / "partner.password", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
    (keys / "partner.pem").write_bytes(partner.cert_pem())
    # nginx workers run as an unprivileged user when started by root: documents world-readable.
    www = folder / "www"
    docs = www / API.strip("/")
    docs.mkdir(parents=True)
    for name, content in BODIES.values():
        (docs / name).write_bytes(content)
    for path in [www, *www.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return keys


def _nginx_common(folder: Path) -> str:
    temp = "\n".join(
        f"    {kind}_temp_path {folder}/{kind}_temp;"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
daemon off;
master_process on;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
{temp}
    keepalive_requests 1000000;
    keepalive_timeout 75s;
"""


def upstream_conf(folder: Path, keys: Path, www: Path, port: int) -> str:
    """Return the upstream nginx configuration: TLS, static documents."""
    return _nginx_common(folder) + (
        f"""\
    types {{ application/json json; }}
    default_type application/octet-stream;
    sendfile on;
    open_file_cache max=16;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {keys}/server.pem;
        ssl_certificate_key {keys}/server.key;
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache shared:SSL:1m;
        root {www};
    }}
}}
"""
    )


def proxy_conf(folder: Path, keys: Path, port: int, upstream_port: int) -> str:
    """Return the reference nginx proxy: HTTP in, verified TLS with keep-alive out, a token."""
    return _nginx_common(folder) + (
        f"""\
    upstream rest {{
        server 127.0.0.1:{upstream_port};
        keepalive 128;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass https://rest;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host 127.0.0.1:{upstream_port};
            proxy_set_header Authorization "Bearer bench-static-token";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {keys}/ca.pem;
            proxy_ssl_name localhost;
            proxy_ssl_protocols TLSv1.2 TLSv1.3;
            proxy_ssl_session_reuse on;
            proxy_buffer_size 16k;
            proxy_buffers 16 16k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""
    )


def ksz_conf(
    stack: Stack, *, port: int, admin_port: int, max_in_flight: int = 256, workers: int = 1
) -> str:
    """Return a ksz-proxy configuration against the bench upstream and the fakes."""
    return f"""\
# Generated by bench/bench.py: the defaults, except body limits the 1 GiB streams need.
channel = "extranet"

[client]
id = "{CLIENT_ID}"
pkcs12 = "partner.p12"
password_file = "partner.password"

[oauth]
token_url = "{stack.fakes["auth"]}/REST/oauth/v5/token"
ca_file = "ca.pem"

[upstream]
url = "https://127.0.0.1:{stack.upstream_port}"
ca_file = "ca.pem"

[listen]
port = {port}
max_body_bytes = {2 * GiB}
body_read_timeout_s = 600
max_in_flight = {max_in_flight}
workers = {workers}

[admin]
port = {admin_port}

[[routes]]
prefix = "{API}"
scopes = ["{SCOPE}"]

[[routes]]
prefix = "{STREAM_API}"
scopes = ["{SCOPE}"]
upstream = "{stack.fakes["upstream"]}"
"""


def start_nginx(procs: Processes, name: str, folder: Path, conf: str, port: int) -> Proc:
    """Start an nginx master (in the foreground) with ``conf``; return once it listens."""
    folder.mkdir()
    (folder / "nginx.conf").write_text(conf)
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    argv = [nginx, "-p", str(folder), "-e", str(folder / "error.log"), "-c", "nginx.conf"]
    proc = procs.start(name, argv)
    wait_until(lambda: port_open(port), f"{name} listening on {port}", proc)
    return proc


def start_ksz(
    stack: Stack,
    name: str,
    log_level: str,
    *,
    max_in_flight: int = 256,
    workers: int = 1,
    pythonpath: str | None = None,
    wait_ready: bool = True,
    wrap: Sequence[str] = (),
    ready_timeout_s: float = 30.0,
) -> KszProxy:
    """Start ksz-proxy; measure the time from spawn to ``/readyz`` 200 and the idle RSS.

    ``wrap`` goes before the interpreter (valgrind, for the instruction counts).
    """
    port, admin_port = free_port(), free_port()
    config = stack.keys / f"{name}.toml"
    config.write_text(
        ksz_conf(
            stack, port=port, admin_port=admin_port, max_in_flight=max_in_flight, workers=workers
        )
    )
    argv = [
        *wrap,
        sys.executable,
        "-m",
        "proxy",
        "--log-level",
        log_level,
        "run",
        "-c",
        str(config),
    ]
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
        _check_source(pythonpath, env, stack.keys)
    started = time.perf_counter()
    # Not the repository: ``-m`` puts the working directory first on sys.path.
    proc = stack.procs.start(name, argv, cwd=stack.keys, env=env)
    if not wait_ready:
        wait_until(lambda: port_open(port), f"{name} listening", proc)
        return KszProxy(proc=proc, port=port, admin_port=admin_port, started_s=0, idle_rss_kib=0)
    wait_until(
        lambda: http_call(admin_port, "/readyz")[0] == 200,
        f"{name} ready",
        proc,
        timeout_s=ready_timeout_s,
    )
    started_s = time.perf_counter() - started
    time.sleep(0.5)  # the idle figure, once start-up has settled
    return KszProxy(
        proc=proc,
        port=port,
        admin_port=admin_port,
        started_s=started_s,
        idle_rss_kib=tree_rss_kib(proc),
        workers=workers,
    )


def tree_rss_kib(proc: Proc) -> int:
    """Return the RSS of a process and its children (a supervisor and its workers), summed.

    Forked workers share pages with their supervisor, so the sum overstates what they use.
    """
    return sum(rss_kib(pid) for pid in proc.tree())


def _check_source(pythonpath: str, env: dict[str, str], cwd: Path) -> None:
    """Fail unless ``python -m proxy`` with this environment imports the package from there."""
    probe = [sys.executable, "-c", "import proxy; print(proxy.__file__)"]
    done = subprocess.run(  # noqa: S603  # argv built here, no shell
        probe, env=env, cwd=cwd, capture_output=True, text=True, check=True
    )
    where = Path(done.stdout.strip()).resolve()
    if not where.is_relative_to(Path(pythonpath).resolve()):
        raise RuntimeError(f"PYTHONPATH={pythonpath} imports proxy from {where}")


def label_candidates(candidates: Sequence[str]) -> list[str]:
    """Name the ``--candidate`` trees cand1, cand2, ... (in LABELS too); return the names."""
    names = []
    for number, source in enumerate(candidates, 1):
        name = f"cand{number}"
        LABELS[name] = f"{name} ({Path(source).name}, info)"
        names.append(name)
    return names


def start_base(folder: Path, procs: Processes) -> Stack:
    """Write the files and start what every proxy needs: the upstream nginx and the fakes."""
    keys = write_files(folder)
    stack = Stack(folder=folder, keys=keys, procs=procs)
    stack.upstream_port = free_port()
    up = folder / "nginx-upstream"
    stack.upstream = start_nginx(
        procs,
        "upstream",
        up,
        upstream_conf(up, keys, folder / "www", stack.upstream_port),
        stack.upstream_port,
    )
    fakes = procs.start("fakes", [sys.executable, str(BENCH / "fakes.py"), str(keys)], cwd=ROOT)
    wait_until(lambda: (keys / "fakes.json").exists(), "fakes ready", fakes)
    stack.fakes = json.loads((keys / "fakes.json").read_text())
    return stack


def start_stack(folder: Path, procs: Processes, candidates: Sequence[str] = ()) -> Stack:
    """Write the files and start every server; return where they listen."""
    stack = start_base(folder, procs)
    keys = stack.keys
    stack.ksz["ksz"] = start_ksz(stack, "ksz", "info")
    stack.ksz["ksz-warn"] = start_ksz(stack, "ksz-warn", "warning")
    stack.ksz["ksz-w2"] = start_ksz(stack, "ksz-w2", "info", workers=2)
    for name, source in zip(label_candidates(candidates), candidates, strict=True):
        stack.ksz[name] = start_ksz(stack, name, "info", pythonpath=source)
    stack.nginx_port = free_port()
    ngx = folder / "nginx-proxy"
    stack.nginx = start_nginx(
        procs,
        "nginx",
        ngx,
        proxy_conf(ngx, keys, stack.nginx_port, stack.upstream_port),
        stack.nginx_port,
    )
    stack.bare_port = free_port()
    stack.bare = start_bare(procs, stack.bare_port, stack.origin, keys)
    stack.floor_port = free_port()
    stack.floor = start_floor(procs, stack.floor_port, stack.origin, keys)
    return stack


def start_bare(
    procs: Processes,
    port: int,
    origin: str,
    keys: Path,
    *,
    name: str = "bare",
    wrap: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> Proc:
    """Start bench/bare.py (``wrap`` before the interpreter); return once it listens."""
    argv = [*wrap, sys.executable, str(BENCH / "bare.py"), str(port), origin, str(keys / "ca.pem")]
    proc = procs.start(name, argv, cwd=ROOT)
    wait_until(lambda: port_open(port), f"{name} listening", proc, timeout_s=timeout_s)
    return proc


def start_floor(
    procs: Processes,
    port: int,
    origin: str,
    keys: Path,
    *,
    name: str = "floor",
    wrap: Sequence[str] = (),
    timeout_s: float = 30.0,
) -> Proc:
    """Start bench/floor.py on the tree under test (``PYTHONPATH``, checked), not a candidate."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT)
    _check_source(str(ROOT), env, keys)
    argv = [
        *wrap,
        sys.executable,
        str(BENCH / "floor.py"),
        str(port),
        origin,
        str(keys / "ca.pem"),
    ]
    proc = procs.start(name, argv, cwd=keys, env=env)
    wait_until(lambda: port_open(port), f"{name} listening", proc, timeout_s=timeout_s)
    return proc


async def check_targets(stack: Stack) -> None:
    """Fail unless every target answers 200 with the exact document, for every body."""
    context = ssl.create_default_context(cafile=str(stack.keys / "ca.pem"))
    connector = aiohttp.TCPConnector(ssl=context)
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        for target in stack.targets:
            for body, (_name, content) in BODIES.items():
                async with session.get(stack.url(target, body)) as response:
                    got = await response.read()
                    if response.status != 200 or got != content:
                        raise RuntimeError(
                            f"{target} {body}: status {response.status}, "
                            f"{len(got)} bytes instead of {len(content)}"
                        )
