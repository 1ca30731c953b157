"""Own secret values: the ``Secret`` wrapper and the private files secrets are read from.

A ``Secret`` shows ``***`` in ``repr`` and ``str`` and refuses to be pickled, so it never lands
in a log, an error or a worker's copy by accident. A secret file must be a regular file readable
by its owner only; errors name the key, the file and its mode, never its content.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from proxy.errors import ConfigError


class Secret:
    """Hold a secret string; ``repr`` and ``str`` show ``***`` so it never lands in a log."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """Return the secret itself; call only where it is used."""
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Secret cannot be pickled")


def check_private_file(path: Path, key: str) -> None:
    """Refuse a secret file that is missing or readable by group or others.

    The error names the key, the file and its mode, never its content.
    """
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{key}: {path} is not a regular file")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o044:
        raise ConfigError(
            f"{key}: {path} is readable by group or others (mode {mode:04o}); run: chmod 600 {path}"
        )


def read_secret_file(path: Path, key: str) -> Secret:
    """Read a secret from a private file, dropping one trailing newline."""
    check_private_file(path, key)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {path} ({exc.strerror})") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{key}: {path} is empty")
    return Secret(text)
