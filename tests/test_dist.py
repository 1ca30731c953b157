"""``make dist``: the wheel and the sdist a server installs from (README, Install).

Runs the Makefile target itself (into a temporary directory), then looks inside both archives:
the console script is declared, the package is complete, and no key material or local file
travels with it. Building fetches the build backend from the package index, as ``pip wheel``
does in tests/test_deploy.py.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from proxy import __version__

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(sys.executable).parent.parent
SECRET_SUFFIXES = (".p12", ".pfx", ".key", ".pem", ".password")


@pytest.mark.slow
def test_make_dist_builds_a_wheel_and_an_sdist(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    done = subprocess.run(  # noqa: S603  # make with our own arguments
        ["make", "-C", str(ROOT), "dist", f"DIST={dist}", f"VENV={VENV}"],  # noqa: S607
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    wheel = dist / f"ksz_proxy-{__version__}-py3-none-any.whl"
    sdist = dist / f"ksz_proxy-{__version__}.tar.gz"
    assert sorted(p.name for p in dist.iterdir()) == sorted([wheel.name, sdist.name])

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "ksz-proxy = proxy.cli:main" in archive.read(entry_points).decode()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "proxy").rglob("*.py")}
    assert modules <= set(names)
    assert not [n for n in names if n.startswith("tests/")]

    with tarfile.open(sdist) as archive:
        members = [m.name.split("/", 1)[1] for m in archive.getmembers() if "/" in m.name]
    for needed in ("pyproject.toml", "README.md", "Makefile", "proxy/cli.py", "config/acpt.toml"):
        assert needed in members, needed
    assert not [m for m in members if m.endswith(SECRET_SUFFIXES)]
    assert not [m for m in members if m.startswith((".venv", "dist/", "bench/"))]
