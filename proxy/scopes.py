"""Own how a scope set is written: one rule for metrics, /health, logs and the onboarding text.

A scope set is its scopes sorted and space-separated. The empty set (the client's default scopes)
has two spellings, both a contract: ``default`` in metric labels and ``/health`` (``DEFAULT``),
``(default)`` in log lines and text for people (``DEFAULT_TEXT``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

DEFAULT: Final = "default"
DEFAULT_TEXT: Final = "(default)"


def scope_label(scopes: Iterable[str], *, default: str = DEFAULT) -> str:
    """Return ``scopes`` sorted and space-separated, or ``default`` when there are none."""
    return " ".join(sorted(scopes)) or default
