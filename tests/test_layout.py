"""The package layout as a code check: one-way imports between the rooms of the code.

The runtime modules import one way only, as docs/architecture.md draws it;
``proxy/onboarding/`` is reached from ``proxy/cli.py`` only, and a test module never imports another
test module: shared helpers live in ``tests/support/``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
PROXY: Final = ROOT / "proxy"

# Lower rank first; a module may import only from lower ranks (rank 0 among itself).
RANKS: Final[dict[str, int]] = {
    **dict.fromkeys(
        (
            "__init__",
            "errors",
            "scopes",
            "secret",
            "endpoints",
            "suggest",
            "config_reader",
            "egress",
            "config_sections",  # the config dataclasses (proxy/config_sections.py)
            "config_egress",  # the [egress] builder
            "config_clients",  # the [client] / [[clients]] builders
            "config",
            "reload",
            "credentials",
            "clients",  # every client's credentials (proxy/clients.py)
            "tls",
            "assertion",
            "headers",
            "inbound",
            "metrics",
            "problems",
            "logs",
            "drain",
            "framing",
            "admission",
        ),
        0,
    ),
    "_aiohttp": 1,
    "upstream_protocol": 1,  # one upstream connection, imported by upstream_client only
    "oauth": 2,
    "upstream_client": 2,
    "tokens": 3,
    "forward": 4,
    "health": 4,  # reads tokens.TokenStatus
    "handler": 5,
    "admin": 5,
    "running": 6,  # RunningProxy and the whole-config reload (proxy/running.py)
    "server": 7,
    "workers": 8,
    "cli": 9,
}


def imported(path: Path) -> set[str]:
    """Return the ``proxy`` modules ``path`` imports (first component below ``proxy``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            parts = node.module.split(".")
            if parts[0] != "proxy":
                continue
            if len(parts) > 1:
                names.add(parts[1])
            else:  # from proxy import tokens, __version__
                names.update(
                    "__init__" if alias.name.startswith("__") else alias.name
                    for alias in node.names
                )
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "proxy" and len(parts) > 1:
                    names.add(parts[1])
    return names


def test_runtime_imports_flow_one_way() -> None:
    wrong = []
    for module, rank in RANKS.items():
        if module == "cli":
            continue  # the command line may use anything, the commands beside the runtime too
        for name in imported(PROXY / f"{module}.py"):
            other = RANKS.get(name)
            if name == module:
                continue
            if other is None or other > rank or (other == rank and rank > 0):
                wrong.append(f"{module} -> {name}")
    assert not wrong, "imports against the one-way order: " + ", ".join(sorted(wrong))


def test_every_runtime_module_has_a_rank() -> None:
    beside = {"__main__"}  # the commands live in proxy/onboarding/, beside the runtime
    modules = {p.stem for p in PROXY.glob("*.py")} - beside
    assert modules == set(RANKS), "give a new module its place in RANKS and docs/architecture.md"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_only_the_cli_imports_the_onboarding_package() -> None:
    onboarding = PROXY / "onboarding"
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(PROXY.rglob("*.py"))
        if path != PROXY / "cli.py"
        and onboarding not in path.parents
        and any(name.startswith("proxy.onboarding") for name in _imports(path))
    ]
    assert offenders == []


def test_the_onboarding_package_imports_no_command_line_parsing() -> None:
    for path in sorted((PROXY / "onboarding").glob("*.py")):
        assert "argparse" not in _imports(path), path.name


def test_no_test_module_imports_another_test_module() -> None:
    tests = ROOT / "tests"
    offenders = {
        str(path.relative_to(ROOT)): sorted(
            name
            for name in _imports(path)
            if name.startswith(("tests.test_", "tests.conftest"))
            or name in ("tests.proxyfixtures", "tests.rawhttp", "tests.faultproxy")
        )
        for path in sorted(tests.rglob("*.py"))
    }
    assert {path: names for path, names in offenders.items() if names} == {}
