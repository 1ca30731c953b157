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
from json.encoder import encode_basestring_ascii as _json_str
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
# The longest a line logged in a running event loop waits for its batch (docs/operations.md, Logs).
FLUSH_DELAY_S: Final = 0.05


# Fields every line of this process carries (a worker's index with listen.workers), added after
# the record's own; set once at start by set_context().
_CONTEXT: dict[str, Any] = {}


# The context's fields as the end of an access line (write_request), kept by set_context().
_SUFFIX: list[str] = [""]


def set_context(**fields: str | int) -> None:
    """Add ``fields`` to every line this process logs from now on (``worker=2``)."""
    _CONTEXT.update(fields)
    _SUFFIX[0] = _context_suffix()


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


def _bytes(line: str) -> int:
    """Return the bytes ``line`` and its newline take on stderr (UTF-8).

    JSON lines are ASCII (see _ENCODER): characters are bytes. Text lines may not be.
    """
    if line.isascii():
        return len(line) + 1
    return len(line.encode("utf-8", "backslashreplace")) + 1


class LoopStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Write lines in batches: one write per 4096 bytes, or 50 ms after the first pending line.

    Under load a write system call per line (or per event-loop iteration) is a measurable part of
    a request's cost; batched, the access lines of many requests go out together. A line logged
    in a running event loop waits for its batch: at most ``FLUSH_DELAY_S`` (a ``call_later`` on
    that loop), less once the batch is full. Warnings and errors, and lines from outside a running
    loop (another thread, start-up, exit), are written at once, after any pending lines, so the
    order is kept. ``flush`` (called by ``logging.shutdown`` at exit, also in a worker before it
    ends) writes what is pending, so a stop by SIGTERM loses nothing; a SIGKILL loses at most
    the lines of the last ``FLUSH_DELAY_S``.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._pending_bytes = 0
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
        """Queue ``line`` for the next batch, or write it now with what is pending."""
        loop: asyncio.AbstractEventLoop | None = None
        if not urgent:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                pass
        size = _bytes(line)
        with self.lock:  # type: ignore[union-attr]
            if loop is None:
                self._pending.append(line)
                self._write_pending()
                return
            if self._flush_on is not loop:
                # A flush scheduled on another loop (one that has since stopped) may never run:
                # what that loop left goes now, and this loop gets its own.
                self._write_pending()
                self._flush_on = loop
                loop.call_later(FLUSH_DELAY_S, self._flush_due, loop)
            elif self._pending_bytes + size > _ATOMIC_WRITE_BYTES:
                self._write_pending()  # the batch is full: cut it before this line
            self._pending.append(line)
            self._pending_bytes += size
            if self._pending_bytes >= _ATOMIC_WRITE_BYTES:
                self._write_pending()  # nothing more fits (or one line is that long on its own)

    def _flush_due(self, loop: asyncio.AbstractEventLoop) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self._flush_on is loop:
                self._flush_on = None
            self._write_pending()

    def _write_pending(self) -> None:
        lines, self._pending, self._pending_bytes = self._pending, [], 0
        batch: list[str] = []
        size = 0
        for line in lines:
            line_bytes = _bytes(line)
            # A longer line goes alone.
            if batch and size + line_bytes > _ATOMIC_WRITE_BYTES:
                self._write_batch(batch)
                batch, size = [], 0
            batch.append(line)
            size += line_bytes
        if batch:
            self._write_batch(batch)

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
# The end of a time for each millisecond, so no number is formatted per line.
_MILLIS: Final = tuple(f".{ms:03d}+00:00" for ms in range(1000))


def _now_rfc3339() -> str:
    """Return the time as JsonFormatter writes it (milliseconds, UTC), formatting once a second."""
    now = time.time()
    second = int(now)
    if second != _SECOND[0]:
        _SECOND[0] = second
        _SECOND[1] = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    prefix: str = _SECOND[1]
    return prefix + _MILLIS[int((now - second) * 1000)]


# The keys every JSON line starts with; a field of the same name takes the slow path below.
_PROMISED: Final = frozenset({"level", "time", "logger", "message"})
# The fields of an access line, in their order (docs/operations.md, "Logs").
ACCESS_FIELDS: Final = (
    "trace_id",
    "method",
    "route",
    "path",
    "status",
    "upstream_status",
    "duration_s",
    "bytes_in",
    "bytes_out",
    "retried",
    "reason",
)
# Strings we choose (logger names, route prefixes, reason codes) as JSON strings, encoded once;
# bounded, though their number is fixed by the code and the configuration.
_ENCODED: dict[str, str] = {}
_ENCODED_MAX: Final = 1024
# The methods a REST client sends, as JSON strings; any other is encoded each time.
_METHODS: Final = {m: f'"{m}"' for m in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")}
# What json writes for the floats that are not numbers in JSON (allow_nan, its default).
_NOT_FINITE: Final = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def _json_name(name: str) -> str:
    encoded = _ENCODED.get(name)
    if encoded is None:
        encoded = _json_str(name)
        if len(_ENCODED) < _ENCODED_MAX:
            _ENCODED[name] = encoded
    return encoded


def _context_suffix() -> str:
    """Return the context's fields as an access line ends with them: ``, "worker": 2``."""
    return "".join(
        f", {_json_str(key)}: {_ENCODER.encode(value)}"
        for key, value in _CONTEXT.items()
        if key not in _PROMISED and key not in ACCESS_FIELDS
    )


def _direct_handler(logger: logging.Logger) -> LoopStreamHandler | None:
    """Return setup()'s JSON handler when it is the only output of ``logger``'s records."""
    handler = _JSON_HANDLER
    root = logging.root.handlers
    if (
        handler is None
        or logger.handlers
        or not logger.propagate
        or len(root) != 1
        or root[0] is not handler
    ):
        return None
    return handler


def write_request(
    logger: logging.Logger,
    *,
    trace_id: str,
    method: str,
    route: str,
    path: str,
    status: int,
    upstream_status: int | None,
    duration_s: float,
    bytes_in: int,
    bytes_out: int,
    retried: bool,
    reason: str | None,
) -> None:
    """Log one request's access line (message ``request``), the line JsonFormatter would write.

    When the JSON handler of setup() is the only output, the line is built as one string: the
    values the caller of the proxy controls (trace id, method, path) are escaped by json's own C
    string encoder (ASCII only; the trace id too, although headers.py checked it: it costs little
    and keeps this function right for any string), the names we chose (logger, route, reason) are
    encoded once, the usual methods are looked up, the numbers (plain ints, a float) are written
    as json writes them. tests/test_access_line.py compares it with JsonFormatter's line byte for
    byte. Otherwise (text format, tests capturing, another handler) the fields go through
    ``logger`` as usual (write_access).
    """
    handler = _direct_handler(logger)
    if handler is None:
        fields = {
            "trace_id": trace_id,
            "method": method,
            "route": route,
            "path": path,
            "status": status,
            "upstream_status": upstream_status,
            "duration_s": duration_s,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "retried": retried,
            "reason": reason,
        }  # in the order of ACCESS_FIELDS
        write_access(logger, fields)
        return
    duration = repr(duration_s)
    names = _ENCODED  # a dict look-up first: cheaper than a call to _json_name
    handler.write_line(
        f'{{"level": "info", "time": "{_now_rfc3339()}", '
        f'"logger": {names.get(logger.name) or _json_name(logger.name)}, '
        f'"message": "request", "trace_id": {_json_str(trace_id)}, '
        f'"method": {_METHODS.get(method) or _json_str(method)}, '
        f'"route": {names.get(route) or _json_name(route)}, '
        f'"path": {_json_str(path)}, "status": {status}, '
        f'"upstream_status": {"null" if upstream_status is None else upstream_status}, '
        f'"duration_s": {_NOT_FINITE.get(duration, duration)}, '
        f'"bytes_in": {bytes_in}, "bytes_out": {bytes_out}, '
        f'"retried": {"true" if retried else "false"}, '
        f'"reason": {"null" if reason is None else names.get(reason) or _json_name(reason)}'
        f"{_SUFFIX[0]}}}"
    )


def write_access(logger: logging.Logger, fields: dict[str, Any]) -> None:
    """Log one access line (message ``request``) with ``fields``, all plain values.

    The line is the one JsonFormatter would write, built without a LogRecord when the JSON
    handler of setup() is the only output; through ``logger`` as usual in every other case (text
    format, tests capturing). The proxy's own lines go through write_request.
    """
    handler = _direct_handler(logger)
    if _CONTEXT:
        fields = {**fields, **{k: v for k, v in _CONTEXT.items() if k not in fields}}
    if handler is None:
        logger.info("request", extra=fields)
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
