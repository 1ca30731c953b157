"""Checks on the code and the installed environment rather than on a running proxy.

- SECURITY 1: the installed aiohttp and the declared requirement are >= 3.14.5;
- SECURITY 19, 20, 21: no code under ``proxy/`` switches TLS verification off, trusts proxy
  variables or follows redirects (aiohttp follows them by default, so every session call outside
  ``proxy/sandbox/``, which sends no token out, must say ``allow_redirects=False``); the upstream
  client reads no proxy variable and decodes nothing;
- SECURITY 22, 23: no log call formats a value with its repr (``%r``, ``repr()``, ``!r``), which
  for an aiohttp client error can carry the Authorization header;
- SECURITY 5: the shared secret is compared with ``hmac.compare_digest`` only;
- dependencies: ``pip-audit`` over the installed environment fails on a known vulnerability in a
  runtime dependency, and skips, saying why, when the advisory database cannot be reached.

The AST checks are tested on small samples first, so that a check that finds nothing is known
to be able to find something.
"""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from proxy import forward, oauth
from proxy.credentials import load_credentials
from proxy.upstream_client import UpstreamClient
from tests.support.config import make_config
from tests.support.partner import PartnerFiles

ROOT: Final = Path(__file__).resolve().parent.parent
PROXY_SOURCES: Final = sorted((ROOT / "proxy").rglob("*.py"))
SANDBOX: Final = ROOT / "proxy" / "sandbox"
MIN_AIOHTTP: Final = Version("3.14.5")
LOG_METHODS: Final = frozenset(
    {"debug", "info", "warning", "error", "exception", "critical", "log"}
)
HTTP_METHODS: Final = frozenset(
    {"request", "get", "post", "put", "patch", "delete", "head", "options"}
)


# -- SECURITY 1: aiohttp ----------------------------------------------------------------------


def test_aiohttp_installed_and_required_is_at_least_3_14_5() -> None:
    assert Version(metadata.version("aiohttp")) >= MIN_AIOHTTP
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    (declared,) = [
        Requirement(r) for r in project["dependencies"] if Requirement(r).name == "aiohttp"
    ]
    # Every version the requirement admits is a fixed one.
    assert declared.specifier.contains(MIN_AIOHTTP)
    assert not declared.specifier.contains("3.14.4", prereleases=True)
    assert not declared.specifier.contains("3.13.99", prereleases=True)


# -- the AST checks -------------------------------------------------------------------------


def _is_const(node: ast.AST, value: object) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _name_of(node: ast.AST) -> str:
    """Return the last dotted name part of ``node`` (``self._session`` -> ``_session``)."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def insecure_settings(tree: ast.AST, *, egress: bool = True) -> Iterator[tuple[int, str]]:
    """Yield (line, what) for each setting that weakens TLS, proxies or redirects.

    ``egress``: the code talks to KSZ or the token endpoint, so every session call must also
    say ``allow_redirects=False`` (aiohttp's default is True).
    """
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg is not None:
            if node.arg in ("ssl", "verify_ssl") and _is_const(node.value, False):
                yield node.value.lineno, f"{node.arg}=False"
            if node.arg in ("allow_redirects", "trust_env") and _is_const(node.value, True):
                yield node.value.lineno, f"{node.arg}=True"
        if isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                name = _name_of(target)
                value = node.value
                if name == "verify_mode" and value is not None and _name_of(value) == "CERT_NONE":
                    yield node.lineno, "verify_mode = ssl.CERT_NONE"
                if name == "check_hostname" and value is not None and _is_const(value, False):
                    yield node.lineno, "check_hostname = False"
        if isinstance(node, ast.Call):
            called = _name_of(node.func)
            if called == "_create_unverified_context":
                yield node.lineno, "ssl._create_unverified_context()"
            receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
            is_session = receiver is not None and "session" in _name_of(receiver).lower()
            if egress and called in HTTP_METHODS and is_session:
                keywords = {k.arg: k.value for k in node.keywords}
                redirects = keywords.get("allow_redirects")
                if redirects is None or not _is_const(redirects, False):
                    yield node.lineno, f"session.{called}() without allow_redirects=False"


def repr_in_log_calls(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Yield (line, what) for each logging call that formats something with its repr."""
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        receiver = _name_of(node.func.value).lower()
        if node.func.attr not in LOG_METHODS or not (
            receiver == "logging" or receiver.endswith(("log", "logger"))
        ):
            continue
        for argument in [*node.args, *(k.value for k in node.keywords)]:
            for inner in ast.walk(argument):
                if isinstance(inner, ast.Constant) and isinstance(inner.value, str):
                    if "%r" in inner.value or "!r}" in inner.value:
                        yield inner.lineno, "a %r or !r format in a log call"
                elif isinstance(inner, ast.Call) and _name_of(inner.func) == "repr":
                    yield inner.lineno, "repr() in a log call"
                elif isinstance(inner, ast.FormattedValue) and inner.conversion == ord("r"):
                    yield inner.lineno, "an f-string !r in a log call"


INSECURE_SAMPLE: Final = """
import ssl, aiohttp
context = ssl.create_default_context()
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
unverified = ssl._create_unverified_context()
connector = aiohttp.TCPConnector(ssl=False)
session = aiohttp.ClientSession(trust_env=True)
session.get(url, allow_redirects=True)
self._session.request("GET", url)
config.get("key")  # a dict, not a session: fine
session.post(url, allow_redirects=False)  # fine
"""

LOGGING_SAMPLE: Final = """
log.info("token %r", token)
log.warning("failed", extra={"error": repr(exc)})
access_log.error(f"failed {exc!r}")
logger.exception("failed {!r}".format(exc))
logging.debug("%s", repr(x))
log.info("fine %s", value, extra={"reason": error.reason})
print(repr(x))  # not a log call
"""


def test_the_checks_find_what_they_look_for() -> None:
    found = sorted(what for _line, what in insecure_settings(ast.parse(INSECURE_SAMPLE)))
    assert found == sorted(
        [
            "check_hostname = False",
            "verify_mode = ssl.CERT_NONE",
            "ssl._create_unverified_context()",
            "ssl=False",
            "trust_env=True",
            "allow_redirects=True",
            "session.get() without allow_redirects=False",
            "session.request() without allow_redirects=False",
        ]
    )
    lines = sorted(line for line, _what in repr_in_log_calls(ast.parse(LOGGING_SAMPLE)))
    assert lines == [2, 3, 4, 5, 6]


@pytest.mark.parametrize("path", PROXY_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_insecure_tls_proxy_or_redirect_setting(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    # The sandbox (fake KSZ and the demo's own client calling the proxy) sends no token out.
    egress = SANDBOX not in path.parents
    assert list(insecure_settings(tree, egress=egress)) == []


@pytest.mark.parametrize("path", PROXY_SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_repr_in_log_calls(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    assert list(repr_in_log_calls(tree)) == []


def test_shared_secret_is_compared_in_constant_time_only() -> None:
    source = (ROOT / "proxy" / "inbound.py").read_text(encoding="utf-8")
    (function,) = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef) and node.name == "check_proxy_key"
    ]
    calls = {ast.unparse(n.func) for n in ast.walk(function) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls
    # No ==/!= (short-circuiting) on the secret or on what the caller sent.
    for compare in (n for n in ast.walk(function) if isinstance(n, ast.Compare)):
        if all(isinstance(op, ast.Is | ast.IsNot) for op in compare.ops):
            continue  # "expected is None": no secret configured
        names = {n.id for n in ast.walk(compare) if isinstance(n, ast.Name)}
        assert not names & {"expected", "given"}, ast.unparse(compare)


async def test_sessions_ignore_proxy_variables_and_never_resend(
    partner_files: PartnerFiles, ca_file: Path
) -> None:
    config = make_config("https://127.0.0.1:9/token", partner_files, ca_file)
    credentials = load_credentials(config.client)
    async with forward.make_session(config, credentials) as upstream:
        assert isinstance(upstream, UpstreamClient)
    # The upstream client reads no environment (proxy variables), decodes no body and resends
    # only through its one documented path (the idle-close race, tests/test_upstream_client.py).
    for module in ("upstream_client.py", "upstream_protocol.py"):
        tree = ast.parse((ROOT / "proxy" / module).read_text(encoding="utf-8"))
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        attributes = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        forbidden = {"os", "environ", "getenv", "zlib", "gzip", "getproxies"}
        assert not forbidden & (names | attributes), module
    async with oauth.make_session(config) as token_session:
        assert token_session.trust_env is False


# -- dependencies: pip-audit -----------------------------------------------------------------


def runtime_dependencies(root: str = "ksz-proxy") -> dict[str, str]:
    """Return {canonical name: installed version} of what ``root`` needs at run time."""
    found: dict[str, str] = {}
    stack: list[tuple[str, frozenset[str]]] = [(root, frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while stack:
        name, extras = stack.pop()
        key = str(canonicalize_name(name))
        if (key, extras) in done:
            continue
        done.add((key, extras))
        distribution = metadata.distribution(name)
        found[key] = distribution.version
        for raw in distribution.requires or ():
            requirement = Requirement(raw)
            marker = requirement.marker
            # The root's extras (test tools) stay out; a dependency's requested extras count.
            if marker is not None and not any(
                marker.evaluate({"extra": extra}) for extra in (extras or {""})
            ):
                continue
            stack.append((requirement.name, frozenset(requirement.extras)))
    del found[str(canonicalize_name(root))]
    return found


_UNREACHABLE: Final = ("ConnectionError", "NameResolution", "Max retries", "timed out", "Temporary")


@pytest.mark.slow
def test_pip_audit_finds_no_known_vulnerability_in_runtime_dependencies() -> None:
    runtime = runtime_dependencies()
    assert {"aiohttp", "pyjwt", "cryptography", "cachetools", "prometheus-client"} <= set(runtime)
    executable = Path(sys.executable).with_name("pip-audit")
    assert executable.exists(), "pip-audit is a pinned test tool: pip install -e '.[test]'"
    try:
        result = subprocess.run(  # noqa: S603  # our own venv's tool, fixed arguments
            [str(executable), "--progress-spinner", "off", "--skip-editable", "--format", "json"],
            capture_output=True,
            text=True,
            timeout=100,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip("pip-audit: the advisory database did not answer within 100 s")
    if result.returncode not in (0, 1) or not result.stdout.strip():
        tail = result.stderr.strip().splitlines()[-1:] or ["no output"]
        if any(word in result.stderr for word in _UNREACHABLE):
            pytest.skip(f"pip-audit cannot reach the advisory database: {tail[0]}")
        pytest.fail(f"pip-audit failed (exit {result.returncode}): {tail[0]}")
    skip, vulnerable = audit_verdict(json.loads(result.stdout), runtime)
    if skip is not None:
        pytest.skip(skip)
    assert vulnerable == {}, f"known vulnerabilities in runtime dependencies: {vulnerable}"


def audit_verdict(
    report: dict[str, Any], runtime: dict[str, str]
) -> tuple[str | None, dict[str, list[str]]]:
    """Return (why the audit says nothing, or None) and {runtime dependency: advisory ids}."""
    audited: dict[str, Any] = {str(canonicalize_name(d["name"])): d for d in report["dependencies"]}
    missing = sorted(set(runtime) - set(audited))
    assert not missing, f"pip-audit did not look at {missing}"
    # pip-audit says "No known vulnerabilities found" also when it could look nothing up.
    not_audited = {n: audited[n]["skip_reason"] for n in runtime if "skip_reason" in audited[n]}
    if not_audited:
        name, why = min(not_audited.items())
        return (
            f"pip-audit cannot reach the advisory database: {len(not_audited)} of "
            f"{len(runtime)} runtime dependencies not audited (e.g. {name}: {why})"
        ), {}
    vulnerable = {
        f"{name} {audited[name]['version']}": [v["id"] for v in audited[name]["vulns"]]
        for name in runtime
        if audited[name].get("vulns")
    }
    return None, vulnerable


def test_audit_verdict_fails_on_runtime_vulnerabilities_only() -> None:
    runtime = {"aiohttp": "3.14.5", "yarl": "1.0"}
    report: dict[str, Any] = {
        "dependencies": [
            {
                "name": "aiohttp",
                "version": "3.14.5",
                "vulns": [{"id": "GHSA-x", "fix_versions": []}],
            },
            {"name": "yarl", "version": "1.0", "vulns": []},
            {"name": "pytest", "version": "9.2.0", "vulns": [{"id": "PYSEC-y"}]},
        ]
    }
    assert audit_verdict(report, runtime) == (None, {"aiohttp 3.14.5": ["GHSA-x"]})
    report["dependencies"][1] = {"name": "yarl", "skip_reason": "Dependency not found on PyPI"}
    skip, vulnerable = audit_verdict(report, runtime)
    assert skip is not None and "1 of 2 runtime dependencies not audited" in skip
    assert vulnerable == {}
