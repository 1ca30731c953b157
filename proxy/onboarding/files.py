"""Own what the onboarding commands read and write: passwords and files they create.

Passwords come from a private file, an environment variable or a prompt, and are never printed.
Files are created, never overwritten (a ``ConfigError`` naming the option and the file).
"""

from __future__ import annotations

import getpass
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from proxy.errors import ConfigError
from proxy.secret import Secret, read_secret_file


@dataclass(frozen=True, slots=True, kw_only=True)
class PasswordSource:
    """Where a password comes from: ``--password-file``, ``--password-env``, else a prompt."""

    file: str | None = None
    env: str | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)

    @property
    def given(self) -> bool:
        """Return True when ``--password-file`` or ``--password-env`` was given."""
        return bool(self.file or self.env)

    def read(self, what: str, *, confirm: bool = False) -> Secret:
        """Return the password from the file, the variable, or a prompt (stdin if no TTY)."""
        if self.file:
            return read_secret_file(Path(self.file), "--password-file")
        if self.env:
            value = self.environ.get(self.env)
            if not value:
                raise ConfigError(f"--password-env: environment variable {self.env} is not set")
            return Secret(value)
        stream = sys.stdin
        if stream is None or stream.closed:
            raise ConfigError(f"{what}: needed; use --password-file or --password-env")
        if stream.isatty():
            value = getpass.getpass(f"{what}: ")
            if confirm and getpass.getpass(f"{what} (again): ") != value:
                raise ConfigError(f"{what}: the two entries differ")
        else:
            # Piped in (a secret store, a script): one line, its line ending dropped.
            value = stream.readline().removesuffix("\n").removesuffix("\r")
        if not value:
            raise ConfigError(f"{what}: empty; use --password-file or --password-env")
        return Secret(value)


def refuse_existing(path: Path, option: str) -> None:
    """Raise ``ConfigError`` when ``path`` exists (or is a dangling link): never overwrite."""
    if path.exists() or path.is_symlink():
        raise ConfigError(f"{option}: {path} already exists; refusing to overwrite it")


def write_new(path: Path, data: bytes, mode: int, option: str) -> None:
    """Create ``path`` with ``mode`` and write ``data``; never replace an existing file."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise ConfigError(f"{option}: {path} already exists; refusing to overwrite it") from None
    except OSError as exc:
        raise ConfigError(f"{option}: cannot create {path} ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # the umask must not loosen (or tighten) the mode asked
        fh.write(data)
