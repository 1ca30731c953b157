"""Own the "did you mean" of configuration errors: an unknown key named with its likely intent.

Pure functions: ``unknown_key("listener", {...}, ["listen", ...])`` returns
``listener: unknown table [listener] (did you mean [listen]?)``. Known names are those the
reader asked for at that level, so a new key needs no list kept here.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


def close_to(name: str, known: Iterable[str]) -> str | None:
    """Return the known name ``name`` most likely misspells (case and ``-``/``_`` ignored)."""
    names = sorted(known)
    folded = {_fold(k): k for k in names}
    if _fold(name) in folded:
        return folded[_fold(name)]
    match = difflib.get_close_matches(_fold(name), list(folded), n=1, cutoff=0.7)
    return folded[match[0]] if match else None


def unknown_key(path: str, value: Any, known: Iterable[str]) -> str:
    """Return the error for the unknown key at ``path`` (``oauth.timout_s``) holding ``value``."""
    leaf = path.rpartition(".")[2]
    parent = path[: len(path) - len(leaf)]
    what, shape = "key", "{}"
    if isinstance(value, dict):
        what, shape = "table", "[{}]"
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        what, shape = "table", "[[{}]]"
    found = f"unknown {what} {shape.format(path)}" if what == "table" else "unknown key"
    near = close_to(leaf, known)
    hint = f"did you mean {shape.format(parent + near)}?" if near else "check the spelling"
    return f"{path}: {found} ({hint})"


def _fold(name: str) -> str:
    return name.lower().replace("-", "_")
