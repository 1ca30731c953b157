"""Own log output: one JSON object per line on stderr (or plain text for people).

Structured fields come from ``extra=``; only plain values (str, int, float, bool, None) are
emitted, so an object whose repr could carry a secret never reaches a log line by accident.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from datetime import UTC, datetime
from typing import Any, Final, TextIO

# Attributes every LogRecord has; anything else on a record came from ``extra=``.
_STANDARD: Final = frozenset(
    vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))
) | {"message", "asctime", "taskName"}
_PLAIN: Final = (str, int, float, bool, type(None))
# One encoder for every line: json.dumps with keyword arguments builds a new one per call.
# ASCII only: a U+2028 or U+0085 in a path stays one escaped character, so a reader splitting on
# any line break (Python's splitlines, some shippers) still sees one line per entry.
_ENCODER: Final = json.JSONEncoder(ensure_ascii=True, default=str)
# Several workers (listen.workers) share stderr: a pipe write up to PIPE_BUF bytes is never
# interleaved with another process's, so batches are cut at this size on line boundaries.
_ATOMIC_WRITE_BYTES: Final = 4096


# Fields every line of this process carries (a worker's index with listen.workers), added after
# the record's own; set once at start by set_context().
_CONTEXT: dict[str, Any] = {}


def set_context(**fields: str | int) -> None:
    """Add ``fields`` to every line this process logs from now on (``worker=2``)."""
    _CONTEXT.update(fields)


def record_fields(record: logging.LogRecord) -> dict[str, Any]:
    """Return the structured fields a record carries, plain values only, then the context's."""
    fields = {k: v for k, v in vars(record).items() if k not in _STANDARD and isinstance(v, _PLAIN)}
    for key, value in _CONTEXT.items():
        fields.setdefault(key, value)
    return fields


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: level, time (RFC 3339 UTC), logger, message, fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": record.levelname.lower(),
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record_fields(record).items():
            # A field named like a promised key (time, level, ...) must not replace it.
            entry.setdefault(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = record.exc_info[0].__name__
            entry["traceback"] = self.formatException(record.exc_info)
        return _ENCODER.encode(entry)


class TextFormatter(logging.Formatter):
    """Format a record for people: time, level, logger, message, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        fields = " ".join(f"{k}={v}" for k, v in record_fields(record).items())
        line = f"{when} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if fields:
            line += "  " + fields
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return line


class LoopStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write the lines emitted during one event-loop iteration with one write.

    Under load many requests end in the same iteration; their access lines then cost one write
    system call instead of one each. Warnings and errors, and lines from outside a running loop,
    are written at once, after any pending lines, so the order is kept. ``flush`` (called by
    ``logging.shutdown`` at exit) writes what is pending.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop a flush is scheduled on; None when nothing is scheduled.
        self._flush_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.write_line(line, urgent=record.levelno >= logging.WARNING)

    def write_line(self, line: str, *, urgent: bool = False) -> None:
        """Queue ``line`` for the end of this loop iteration, or write it now."""
        loop: asyncio.AbstractEventLoop | None = None
        if not urgent:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        with self.lock:  # type: ignore[union-attr]
            self._pending.append(line)
            if loop is None:
                self._write_pending()
            elif self._flush_on is not loop:
                # A flush scheduled on another loop (one that has since stopped) may never run.
                self._write_pending(keep_last=True)
                self._flush_on = loop
                loop.call_soon(self._flush_scheduled)

    def _flush_scheduled(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._flush_on = None
            self._write_pending()

    def _write_pending(self, *, keep_last: bool = False) -> None:
        lines = self._pending[:-1] if keep_last else self._pending
        batch: list[str] = []
        size = 0
        for line in lines:
            # ASCII lines (see _ENCODER): characters are bytes. A longer line goes alone.
            if batch and size + len(line) + 1 > _ATOMIC_WRITE_BYTES:
                self._write_batch(batch)
                batch, size = [], 0
            batch.append(line)
            size += len(line) + 1
        if batch:
            self._write_batch(batch)
        self._pending = self._pending[-1:] if keep_last else []

    def _write_batch(self, lines: list[str]) -> None:
        self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()
        super().flush()


# The handler setup() installed when it writes JSON: access lines are built for it directly.
_JSON_HANDLER: LoopStreamHandler | None = None
# The current second, formatted once: [epoch second, "YYYY-MM-DDTHH:MM:SS"].
_SECOND: list[Any] = [-1, ""]


def _now_rfc3339() -> str:
    """Return the time as JsonFormatter writes it (milliseconds, UTC), formatting once a second."""
    now = time.time()
    second = int(now)
    if second != _SECOND[0]:
        _SECOND[0] = second
        _SECOND[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{_SECOND[1]}.{int((now - second) * 1000):03d}+00:00"


# The keys every JSON line starts with; a field of the same name takes the slow path below.
_PROMISED: Final = frozenset({"level", "time", "logger", "message"})
# Logger names as JSON strings, encoded once.
_NAMES: dict[str, str] = {}


def _json_name(name: str) -> str:
    encoded = _NAMES.get(name)
    if encoded is None:
        encoded = _NAMES[name] = _ENCODER.encode(name)
    return encoded


def write_access(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Log one access line (message ``request``) with ``fields``, all plain values.

    The line is the one JsonFormatter would write, built without a LogRecord when the JSON
    handler of setup() is the only output (the access log is about a tenth of the proxy's CPU
    otherwise); through ``logger`` as usual in every other case (text format, tests capturing).
    """
    handler = _JSON_HANDLER
    root = logging.root.handlers
    if _CONTEXT:
        fields = {**fields, **{k: v for k, v in _CONTEXT.items() if k not in fields}}
    if handler is None or logger.handlers or not logger.propagate or root != [handler]:
        logger.info("request", extra=fields)
        return
    if fields and _PROMISED.isdisjoint(fields):
        # The fixed head is formatted, and only the caller's fields go through the encoder, so
        # every caller-controlled value (path, method, trace id) is still escaped by json.
        head = f'{{"level": "info", "time": "{_now_rfc3339()}", "logger": {_json_name(logger.name)}'
        handler.write_line(f'{head}, "message": "request", {_ENCODER.encode(fields)[1:]}')
        return
    entry: dict[str, Any] = {
        "level": "info",
        "time": _now_rfc3339(),
        "logger": logger.name,
        "message": "request",
    }
    for key, value in fields.items():
        entry.setdefault(key, value)  # as JsonFormatter: a field never replaces a promised key
    handler.write_line(_ENCODER.encode(entry))


# The threshold setup() was given, and whether it came from --log-level (which then wins over the
# configuration's log.level, at start and on every reload).
_LEVEL: dict[str, Any] = {"default": "info", "pinned": False}


def use_config_level(level: str | None) -> None:
    """Apply the configuration's ``log.level`` (None: back to the default) unless pinned."""
    if not _LEVEL["pinned"]:
        logging.getLogger().setLevel((level or _LEVEL["default"]).upper())


def setup(
    level: str = "info", fmt: str = "json", stream: TextIO | None = None, *, pinned: bool = False
) -> None:
    """Send every log record to ``stream`` (stderr) in the chosen format.

    ``pinned``: the level was given on the command line; the configuration cannot change it.
    """
    global _JSON_HANDLER
    _LEVEL.update(default=level, pinned=pinned)
    handler = LoopStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    _JSON_HANDLER = handler if fmt == "json" else None
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's own access log is replaced by ksz_proxy.access.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
