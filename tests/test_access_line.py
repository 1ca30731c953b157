"""The access line built directly (``logs.write_request``) and the batches it goes out in.

The direct line must be, byte for byte, the line ``JsonFormatter`` writes for a record with the
same fields: a differential test over hostile values. The batching: a line waits at most
``FLUSH_DELAY_S`` (a timer on the loop), a full batch goes out at once, cut on line boundaries, a
warning goes out at once after the pending lines, ``flush`` writes everything.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final

from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy import logs
from proxy.logs import JsonFormatter

ACCESS: Final = logging.getLogger("ksz_proxy.access")


class CountingStream(io.StringIO):
    """A stream that keeps each write call's text."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


@contextmanager
def json_logging(stream: io.StringIO, **context: int) -> Iterator[logs.LoopStreamHandler]:
    """Run logs.setup("info", "json", stream) with ``context``; put logging back afterwards."""
    root = logging.getLogger()
    aiohttp_access = logging.getLogger("aiohttp.access")
    saved = (root.handlers[:], root.level, aiohttp_access.level, dict(logs._CONTEXT))
    logs.setup("info", "json", stream)
    logs.set_context(**context)
    handler = root.handlers[0]
    assert isinstance(handler, logs.LoopStreamHandler)
    try:
        yield handler
    finally:
        root.handlers[:], _, _, old_context = saved
        root.setLevel(saved[1])
        aiohttp_access.setLevel(saved[2])
        logs._CONTEXT.clear()
        logs.set_context(**old_context)


class Counted(logging.Filter):
    """Count the records that reach the logger (none when the direct path is taken)."""

    records = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.records += 1
        return True


def request_fields(**changes: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "trace_id": "0b1f7a42-8e1c-4f5e-9d3a-2f6b7c8d9e0f",
        "method": "GET",
        "route": "/REST/demo/v1",
        "path": "/REST/demo/v1/x",
        "status": 200,
        "upstream_status": 200,
        "duration_s": 0.000234,
        "bytes_in": 0,
        "bytes_out": 105,
        "retried": False,
        "reason": None,
    }
    return fields | changes


def formatter_line(fields: dict[str, Any], time_text: str, context: dict[str, int]) -> str:
    """Return JsonFormatter's line for a record of ``fields`` logged at ``time_text``."""
    record = ACCESS.makeRecord(ACCESS.name, logging.INFO, "x", 0, "request", (), None)
    record.__dict__.update(fields)
    # Within the millisecond the direct line names: the formatter then writes the same time.
    record.created = datetime.fromisoformat(time_text).timestamp() + 0.0004
    saved = dict(logs._CONTEXT)
    logs._CONTEXT.clear()
    logs._CONTEXT.update(context)
    try:
        return JsonFormatter().format(record)
    finally:
        logs._CONTEXT.clear()
        logs._CONTEXT.update(saved)


def direct_line(fields: dict[str, Any], context: dict[str, int]) -> str:
    """Return the line write_request writes for ``fields``, checking it built it directly."""
    stream = io.StringIO()
    counted = Counted()
    ACCESS.addFilter(counted)
    try:
        with json_logging(stream, **context):
            logs.write_request(ACCESS, **fields)  # outside a loop: written at once
    finally:
        ACCESS.removeFilter(counted)
    assert counted.records == 0  # no LogRecord: the direct path
    text = stream.getvalue()
    assert text.endswith("\n") and text.count("\n") == 1
    return text[:-1]


def assert_same_line(fields: dict[str, Any], context: dict[str, int]) -> None:
    direct = direct_line(fields, context)
    entry = json.loads(direct)
    formatted = formatter_line(fields, entry["time"], context)
    assert direct == formatted  # byte for byte: key order, separators, escapes
    assert direct.isascii()
    assert len(direct.splitlines()) == 1  # U+2028, U+0085, \r stay escaped
    assert list(entry)[:4] == ["level", "time", "logger", "message"]
    # Parsed back, every field is the value given (compared as json writes it: NaN, surrogates).
    assert {k: json.dumps(entry[k]) for k in fields} == {
        k: json.dumps(v) for k, v in fields.items()
    }
    # The context's own fields follow; one named like a field or a head key is left out.
    own = {k: v for k, v in context.items() if k not in fields and k not in HEAD}
    assert list(entry)[len(HEAD) + len(fields) :] == list(own)
    assert {k: entry[k] for k in own} == own


HEAD: Final = ("level", "time", "logger", "message")


SPECIAL: Final = (
    '"',
    "\\",
    "\x00",
    "\x1f",
    "\x7f",
    "\n",
    "\r",
    "\u0085",
    "\u2028",
    "\u2029",
    "é",
    "🙂",
    "\udcff",  # a byte that was not UTF-8, as surrogateescape leaves it
    "\ud800",
    "/",
    "%2F",
)
caller_text = st.lists(st.sampled_from(SPECIAL) | st.characters(), max_size=40).map("".join)
small_int = st.integers(min_value=-(2**63), max_value=2**63)


@settings(max_examples=300, deadline=None)
@given(
    trace_id=caller_text,
    method=st.sampled_from(["GET", "POST", "PATCH", "M-SEARCH", "get"]) | caller_text,
    route=st.sampled_from(["/REST/demo/v1", "unrouted", "/é"]) | caller_text,
    path=caller_text,
    status=small_int,
    upstream_status=st.none() | small_int,
    duration_s=st.floats(),
    bytes_in=small_int,
    bytes_out=small_int,
    retried=st.booleans(),
    reason=st.none() | st.sampled_from(["no_route", "upstream_timeout"]) | caller_text,
    context=st.sampled_from([{}, {"worker": 0}, {"worker": 7}]),
)
@example(
    trace_id='"}, "level": "error", "x": "',
    method="GET",
    route="/REST/demo/v1",
    path="/a\nb\r\x00\u2028\udcff",
    status=200,
    upstream_status=None,
    duration_s=2.5e-05,
    bytes_in=0,
    bytes_out=0,
    retried=True,
    reason="no_route",
    context={"worker": 1},
).via("hostile")
def test_the_direct_line_is_the_formatters_line(context: dict[str, int], **fields: Any) -> None:
    assert_same_line(fields, context)


def test_a_context_field_named_like_an_access_field_is_left_out_as_the_formatter_does() -> None:
    assert_same_line(request_fields(), {"status": 1, "level": 2, "worker": 3})


def test_floats_are_written_as_json_writes_them() -> None:
    for value in (0.0, -0.0, 1e-05, 2.5e-05, 0.1, 1e16, 123.456789, math.inf, -math.inf, math.nan):
        assert_same_line(request_fields(duration_s=value), {})


def test_write_request_goes_through_logging_when_someone_else_listens() -> None:
    stream = io.StringIO()
    counted = Counted()
    with json_logging(stream, worker=2):
        ACCESS.addFilter(counted)
        try:
            logging.getLogger().addHandler(logging.NullHandler())  # a second output
            logs.write_request(ACCESS, **request_fields())
        finally:
            ACCESS.removeFilter(counted)
    assert counted.records == 1
    entry = json.loads(stream.getvalue())
    assert entry["worker"] == 2 and entry["trace_id"] == request_fields()["trace_id"]


# -- batching -------------------------------------------------------------------------------------


async def test_lines_go_out_once_the_delay_is_over() -> None:
    stream = CountingStream()
    with json_logging(stream):
        loop = asyncio.get_running_loop()
        logs.write_request(ACCESS, **request_fields(path="/first"))
        await asyncio.sleep(0)
        logs.write_request(ACCESS, **request_fields(path="/second"))
        await asyncio.sleep(0)
        assert stream.writes == []  # held back for the batch
        logged_at = loop.time()
        # The batch's timer (scheduled at the first line) is due before this sleep's timer.
        await asyncio.sleep(logs.FLUSH_DELAY_S + 0.01)
        assert loop.time() - logged_at >= logs.FLUSH_DELAY_S
        assert len(stream.writes) == 1
        assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == [
            "/first",
            "/second",
        ]


async def test_a_full_batch_goes_out_at_once_cut_on_line_boundaries() -> None:
    stream = CountingStream()
    with json_logging(stream) as handler:
        paths = [f"/p{i}/" + "x" * 300 for i in range(40)]
        for path in paths:
            logs.write_request(ACCESS, **request_fields(path=path))
        # No await: what fills 4096 bytes was written on the spot.
        assert len(stream.writes) >= 3
        assert all(len(w) <= 4096 and w.endswith("\n") for w in stream.writes)
        line_bytes = len(stream.writes[0].splitlines()[0]) + 1
        assert all(len(w) > 4096 - line_bytes - 2 for w in stream.writes)  # full, not dribbled
        handler.flush()
    lines = stream.getvalue().splitlines()
    assert [json.loads(x)["path"] for x in lines] == paths


async def test_a_warning_goes_out_at_once_after_the_pending_access_lines() -> None:
    stream = CountingStream()
    with json_logging(stream):
        logs.write_request(ACCESS, **request_fields(path="/before"))
        logs.write_request(ACCESS, **request_fields(path="/also-before"))
        logging.getLogger("ksz_proxy.test").warning("careful")
        assert len(stream.writes) == 1
        entries = [json.loads(x) for x in stream.getvalue().splitlines()]
        assert [e.get("path", e["message"]) for e in entries] == [
            "/before",
            "/also-before",
            "careful",
        ]
        await asyncio.sleep(logs.FLUSH_DELAY_S + 0.01)
        assert len(stream.writes) == 1  # the timer found nothing left


async def test_flush_writes_every_pending_line() -> None:
    # logging.shutdown() at exit (also a worker's, before os._exit) calls flush.
    stream = CountingStream()
    with json_logging(stream) as handler:
        for i in range(5):
            logs.write_request(ACCESS, **request_fields(path=f"/{i}"))
        logging.getLogger("ksz_proxy.cli").info("ksz-proxy stopped")
        assert stream.writes == []
        handler.flush()
        assert len(stream.writes) == 1
    messages = [json.loads(x)["message"] for x in stream.getvalue().splitlines()]
    assert messages == ["request"] * 5 + ["ksz-proxy stopped"]


def test_lines_from_a_loop_that_stopped_go_out_with_the_next_line() -> None:
    stream = CountingStream()
    with json_logging(stream):

        async def log(path: str) -> None:
            logs.write_request(ACCESS, **request_fields(path=path))

        asyncio.run(log("/in-a-loop"))  # the loop ends before its batch's timer
        assert stream.writes == []
        asyncio.run(log("/in-the-next-loop"))
        assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == ["/in-a-loop"]
        logs.write_request(ACCESS, **request_fields(path="/outside"))  # no loop: at once
    assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == [
        "/in-a-loop",
        "/in-the-next-loop",
        "/outside",
    ]


def test_lines_from_another_thread_go_out_at_once_in_order() -> None:
    stream = CountingStream()
    with json_logging(stream):

        async def main() -> None:
            logs.write_request(ACCESS, **request_fields(path="/loop"))
            await asyncio.to_thread(logs.write_request, ACCESS, **request_fields(path="/thread"))
            assert [json.loads(x)["path"] for x in stream.getvalue().splitlines()] == [
                "/loop",
                "/thread",
            ]

        asyncio.run(main())


async def test_text_batches_are_cut_by_bytes_not_characters() -> None:
    # --log-format text: lines may hold non-ASCII (a certificate subject, a file name); a batch
    # must stay within 4096 bytes on stderr (PIPE_BUF), not 4096 characters (review finding).
    stream = CountingStream()
    handler = logs.LoopStreamHandler(stream)
    handler.setFormatter(logs.TextFormatter())
    for i in range(40):
        handler.write_line(f"line {i} " + "é" * 150)
    handler.flush()
    assert len(stream.writes) >= 3
    assert all(len(w.encode("utf-8")) <= 4096 and w.endswith("\n") for w in stream.writes)
    assert len(stream.getvalue().splitlines()) == 40
