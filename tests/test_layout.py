"""The runtime modules import one way only, as docs/architecture.md draws it."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

PROXY: Final = Path(__file__).resolve().parent.parent / "proxy"

# Lower rank first; a module may import only from lower ranks (rank 0 among itself).
RANKS: Final[dict[str, int]] = {
    **dict.fromkeys(
        (
            "__init__",
            "errors",
            "config",
            "credentials",
            "tls",
            "assertion",
            "headers",
            "inbound",
            "metrics",
            "problems",
            "logs",
            "drain",
        ),
        0,
    ),
    "_aiohttp": 1,
    "oauth": 2,
    "tokens": 3,
    "forward": 4,
    "health": 4,  # reads tokens.TokenStatus
    "handler": 5,
    "admin": 5,
    "server": 6,
    "workers": 7,
    "cli": 8,
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
    beside = {"__main__", "check", "onboarding", "probes", "proof"}  # the commands, not runtime
    modules = {p.stem for p in PROXY.glob("*.py")} - beside
    assert modules == set(RANKS), "give a new module its place in RANKS and docs/architecture.md"
