"""The package layout as a code check: one-way imports between the rooms of the code.

``proxy/onboarding/`` is reached from ``proxy/cli.py`` only, and a test module never imports another
test module: shared helpers live in ``tests/support/``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent
PROXY: Final = ROOT / "proxy"


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
