"""Own reading a parsed TOML document: typed values, each error naming its key path.

``Table`` wraps one TOML table and remembers which keys were read, so ``finish()`` can refuse
the ones nobody asked for (a typo never falls back silently to a default). Each typed method
returns the value, checked, or ``None`` when the key is absent: the defaults live in the config
dataclasses, written once, and the section builders in ``proxy.config`` pass on only the keys
that are present.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import urlsplit

from proxy.errors import ConfigError
from proxy.suggest import close_to, unknown_key

T = TypeVar("T")
S = TypeVar("S", bound=str)

# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
SCOPE_TOKEN: Final = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_MISSING: Final = object()


def present(**values: object) -> dict[str, Any]:
    """Return the keyword arguments that were given (not ``None``): the dataclass fills the rest."""
    return {name: value for name, value in values.items() if value is not None}


class Table:
    """One TOML table at key path ``where``; relative file paths resolve against ``base_dir``."""

    def __init__(self, data: Mapping[str, object], where: str, base_dir: Path) -> None:
        self.data = data
        self.where = where
        self.base_dir = base_dir
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        """Return the full key path of ``name`` (``oauth.timeout_s``)."""
        return f"{self.where}.{name}" if self.where else name

    def _get(self, name: str) -> object:
        self.used.add(name)
        return self.data.get(name, _MISSING)

    def finish(self) -> None:
        """Refuse any key of this table that was not read."""
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            raise ConfigError(unknown_key(self.key(unknown[0]), self.data[unknown[0]], self.used))

    def refuse_near(self, name: str) -> None:
        """Before calling ``name`` missing, refuse an unknown key that looks like a typo of it."""
        for other in sorted(set(self.data) - self.used - {name}):
            if close_to(other, [name]):
                raise ConfigError(unknown_key(self.key(other), self.data[other], [name]))

    def table(self, name: str, *, required: bool = False) -> Table:
        """Return the sub-table ``name`` (empty when absent and not required)."""
        value = self._get(name)
        if value is _MISSING:
            if required:
                self.refuse_near(name)
                raise ConfigError(f"{self.key(name)}: section [{self.key(name)}] is required")
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.key(name)}: must be a table [{self.key(name)}]")
        return Table(value, self.key(name), self.base_dir)

    def table_list(self, name: str) -> list[Table]:
        """Return the array of tables ``[[name]]`` (empty when absent)."""
        value = self._get(name)
        if value is _MISSING:
            return []
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ConfigError(f"{self.key(name)}: must be an array of tables [[{name}]]")
        return [Table(v, f"{self.key(name)}[{i}]", self.base_dir) for i, v in enumerate(value)]

    def _typed(self, name: str, kind: type[T], label: str) -> T | None:
        value = self._get(name)
        if value is _MISSING:
            return None
        # bool is an int in Python; TOML keeps them apart, so do we.
        if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"{self.key(name)}: must be {label}")
        return value

    def string(self, name: str) -> str | None:
        """Return the string ``name``, or None when absent."""
        return self._typed(name, str, "a string")

    def required_string(self, name: str) -> str:
        """Return the string ``name``; refuse its absence."""
        value = self.string(name)
        if value is None:
            raise ConfigError(f"{self.key(name)}: required")
        return value

    def boolean(self, name: str) -> bool | None:
        """Return the boolean ``name``, or None when absent."""
        return self._typed(name, bool, "true or false")

    def integer(self, name: str, *, low: int, high: int) -> int | None:
        """Return the integer ``name`` within ``low``..``high``, or None when absent."""
        value = self._typed(name, int, "an integer")
        if value is not None and not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: must be between {low} and {high}")
        return value

    def number(self, name: str, *, low: float, high: float) -> float | None:
        """Return the number ``name`` (integer or float) within ``low``..``high``, or None."""
        value = self._get(name)
        if value is _MISSING:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.key(name)}: must be a number")
        if not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: must be between {low:g} and {high:g}")
        return float(value)

    def choice(self, name: str, options: tuple[S, ...]) -> S | None:
        """Return the string ``name`` when it is one of ``options``, or None when absent."""
        value = self.string(name)
        if value is None:
            return None
        for option in options:
            if value == option:
                return option
        raise ConfigError(f"{self.key(name)}: must be one of {', '.join(options)}")

    def string_list(self, name: str) -> list[str] | None:
        """Return the list of strings ``name``, or None when absent."""
        value = self._get(name)
        if value is _MISSING:
            return None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{self.key(name)}: must be a list of strings")
        return list(value)

    def scopes(self, name: str) -> frozenset[str] | None:
        """Return the OAuth scopes listed at ``name``, or None when absent."""
        values = self.string_list(name)
        if values is None:
            return None
        for i, scope in enumerate(values):
            if not SCOPE_TOKEN.fullmatch(scope):
                raise ConfigError(
                    f"{self.key(name)}[{i}]: not a valid OAuth scope (no spaces, quotes or "
                    "backslashes)"
                )
        return frozenset(values)

    def path(self, name: str) -> Path | None:
        """Return the file path ``name`` (``~`` expanded, relative to ``base_dir``), or None."""
        value = self.string(name)
        if value is None:
            return None
        if not value:
            raise ConfigError(f"{self.key(name)}: must not be empty")
        if "\x00" in value:
            raise ConfigError(f"{self.key(name)}: must not contain a NUL character")
        p = Path(value).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def existing_file(self, name: str) -> Path | None:
        """Return the path of an existing file ``name``, or None when absent."""
        p = self.path(name)
        if p is not None and not p.is_file():
            raise ConfigError(f"{self.key(name)}: file {p} does not exist")
        return p

    def ca_bundle(self, name: str) -> Path | None:
        """Return the path of a PEM CA bundle ``name`` that TLS can load, or None when absent.

        Checked here, not first when a connection is made: a file that exists but holds no
        certificate would otherwise fail start-up with a traceback, or a reload half-way.
        """
        p = self.existing_file(name)
        if p is not None:
            try:
                ssl.create_default_context().load_verify_locations(cafile=str(p))
            except (ssl.SSLError, OSError, ValueError) as exc:
                why = getattr(exc, "reason", None) or type(exc).__name__
                raise ConfigError(
                    f"{self.key(name)}: {p} holds no PEM CA certificate TLS can use ({why})"
                ) from None
        return p

    def host(self, name: str) -> str | None:
        """Return the host name or IP address ``name``, or None when absent."""
        value = self.string(name)
        if value is not None and (not value or any(c in value for c in "/ \t@?#[]")):
            raise ConfigError(f"{self.key(name)}: must be a host name or IP address")
        return value

    def https_url(self, name: str) -> str | None:
        """Return the https URL ``name`` (no credentials, no fragment), or None when absent."""
        value = self.string(name)
        if value is None:
            return None
        # urlsplit drops tabs and newlines silently; the raw value must not carry them on.
        if any(c.isspace() or not c.isprintable() for c in value):
            raise ConfigError(f"{self.key(name)}: must be an https URL (no spaces or controls)")
        parts = urlsplit(value)
        if parts.scheme != "https" or not parts.hostname:
            raise ConfigError(f"{self.key(name)}: must be an https URL")
        if parts.username or parts.password:
            raise ConfigError(f"{self.key(name)}: must not contain credentials")
        if parts.fragment:
            raise ConfigError(f"{self.key(name)}: must not contain a fragment")
        try:
            parts.port  # noqa: B018  # raises on a bad port
        except ValueError:
            raise ConfigError(f"{self.key(name)}: has an invalid port") from None
        return value

    def origin(self, name: str) -> str | None:
        """Return the https origin ``name`` as ``https://host[:port]``, or None when absent."""
        value = self.https_url(name)
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.path not in ("", "/") or parts.query:
            raise ConfigError(
                f"{self.key(name)}: must be an origin only (https://host[:port]); the request "
                "path is appended as sent"
            )
        return f"https://{parts.netloc}"
