"""Log output: the JSON and text formatters, ``setup``, the access log, token events, the canary.

The canary test drives the error paths of a running chain (token endpoint faults, upstream 401,
reset and TLS failures, refused requests) with everything captured at DEBUG, then looks for the
issued tokens, the client assertions, the keystore password and key material in every place an
operator or a caller could read: log text, record attributes, formatted lines, /metrics, /health,
/readyz and every answer.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import re
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import pytest

from proxy import logs
from proxy.logs import JsonFormatter, TextFormatter, record_fields
from proxy.sandbox.authserver import Fault
from proxy.sandbox.pki import Issued
from proxy.secret import Secret
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO, OTHER
from tests.support.fakes import AuthServerHandle
from tests.support.partner import PKCS12_PASSWORD

RFC3339_UTC: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|\+00:00)")
REQUIRED_KEYS: Final = {"level", "time", "logger", "message"}
DEMO_SCOPES: Final = frozenset({"scope:demo:consult"})
CALLER_CANARY: Final = "caller-canary-credential-4711"
PROXY_CANARY: Final = "proxy-canary-password-0815"


class Leaky:
    """An object whose repr and str carry a secret, as a careless exception might."""

    def __repr__(self) -> str:
        return "Leaky(password='leaky-canary')"

    __str__ = __repr__


def make_record(
    message: str = "hello %s",
    args: tuple[Any, ...] = ("world",),
    level: int = logging.INFO,
    extra: dict[str, Any] | None = None,
    exc_info: Any = None,
) -> logging.LogRecord:
    """Build a record the way ``Logger.info(message, *args, extra=extra)`` would."""
    logger = logging.getLogger("ksz_proxy.test")
    return logger.makeRecord(logger.name, level, __file__, 1, message, args, exc_info, extra=extra)


# -- formatters ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("level", "name"),
    [
        (logging.DEBUG, "debug"),
        (logging.INFO, "info"),
        (logging.WARNING, "warning"),
        (logging.ERROR, "error"),
        (logging.CRITICAL, "critical"),
    ],
)
def test_json_line_has_level_time_logger_message(level: int, name: str) -> None:
    record = make_record(level=level)
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert list(entry)[:4] == ["level", "time", "logger", "message"]
    assert entry["level"] == name
    assert entry["logger"] == "ksz_proxy.test"
    assert entry["message"] == "hello world"
    assert RFC3339_UTC.fullmatch(entry["time"])
    when = datetime.fromisoformat(entry["time"].replace("Z", "+00:00"))
    assert when.utcoffset() is not None and when.utcoffset() == UTC.utcoffset(None)
    assert abs(when.timestamp() - record.created) < 0.001


def test_json_line_carries_plain_structured_fields() -> None:
    fields = {"route": DEMO, "status": 200, "duration_s": 0.25, "retried": False, "reason": None}
    entry = json.loads(JsonFormatter().format(make_record(extra=fields)))
    assert {k: entry[k] for k in fields} == fields


def test_fields_never_replace_the_promised_keys() -> None:
    record = make_record(extra={"time": "yesterday", "level": "none", "logger": "x", "n": 1})
    entry = json.loads(JsonFormatter().format(record))
    assert RFC3339_UTC.fullmatch(entry["time"])
    assert (entry["level"], entry["logger"], entry["n"]) == ("info", "ksz_proxy.test", 1)


def test_json_line_is_one_line_whatever_the_message() -> None:
    record = make_record("multi\nline \u20ac %s", ("\r\n",), extra={"detail": "a\nb"})
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\r" not in line
    entry = json.loads(line)
    assert entry["message"] == "multi\nline \u20ac \r\n"
    assert entry["detail"] == "a\nb"


def test_json_line_names_the_exception_and_its_traceback() -> None:
    try:
        raise ValueError("broken on purpose")
    except ValueError:
        record = make_record("failed", (), level=logging.ERROR, exc_info=sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["exception"] == "ValueError"
    assert "broken on purpose" in entry["traceback"]


def test_text_line_reads_for_people() -> None:
    record = make_record(level=logging.WARNING, extra={"route": DEMO, "status": 503})
    line = TextFormatter().format(record)
    assert re.fullmatch(
        rf"\d\d:\d\d:\d\d WARNING ksz_proxy\.test: hello world  route={DEMO} status=503", line
    )
    assert TextFormatter().format(make_record()).endswith("ksz_proxy.test: hello world")


def test_record_fields_keep_plain_values_only() -> None:
    record = make_record(
        extra={
            "route": DEMO,
            "count": 3,
            "ratio": 0.5,
            "flag": True,
            "nothing": None,
            "leaky": Leaky(),
            "secret": Secret("secret-canary"),
            "items": ["list-canary"],
            "mapping": {"k": "dict-canary"},
            "raw": b"bytes-canary",
        }
    )
    assert record_fields(record) == {
        "route": DEMO,
        "count": 3,
        "ratio": 0.5,
        "flag": True,
        "nothing": None,
    }
    for formatter in (JsonFormatter(), TextFormatter()):
        line = formatter.format(record)
        for canary in ("leaky-canary", "secret-canary", "list-canary", "dict-canary", "bytes"):
            assert canary not in line
    # The standard record attributes are not fields either.
    assert not set(record_fields(make_record())) & {"name", "msg", "args", "levelname", "created"}


# -- setup ---------------------------------------------------------------------------------------


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """Put the root logger and aiohttp's access logger back as they were."""
    root = logging.getLogger()
    access = logging.getLogger("aiohttp.access")
    handlers, level, access_level = root.handlers[:], root.level, access.level
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        access.setLevel(access_level)


@pytest.mark.usefixtures("restore_logging")
def test_setup_json_sends_every_record_as_one_json_line() -> None:
    stream = io.StringIO()
    logs.setup("debug", "json", stream)
    logging.getLogger("ksz_proxy.test").debug("first", extra={"n": 1})
    logging.getLogger("ksz_proxy.other").error("second")
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]
    assert [(e["level"], e["logger"], e["message"]) for e in entries] == [
        ("debug", "ksz_proxy.test", "first"),
        ("error", "ksz_proxy.other", "second"),
    ]
    assert entries[0]["n"] == 1
    assert all(REQUIRED_KEYS <= set(e) for e in entries)


@pytest.mark.usefixtures("restore_logging")
def test_setup_text_honours_the_level() -> None:
    stream = io.StringIO()
    logs.setup("warning", "text", stream)
    log = logging.getLogger("ksz_proxy.test")
    log.info("hidden")
    log.warning("shown", extra={"k": "v"})
    logging.getLogger("aiohttp.access").warning("aiohttp access")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\d\d:\d\d:\d\d WARNING ksz_proxy\.test: shown  k=v", lines[0])
    assert logging.getLogger().handlers[0].stream is stream  # type: ignore[attr-defined]
    assert logging.getLogger("aiohttp.access").level == logging.WARNING


class CountingStream(io.StringIO):
    """A stream that counts its write calls."""

    writes = 0

    def write(self, s: str) -> int:
        self.writes += 1
        return super().write(s)


ACCESS_FIELDS: Final = {
    "trace_id": "t-1",
    "method": "GET",
    "route": "/REST/demo/v1",
    "path": "/REST/demo/v1/x",
    "status": 200,
    "upstream_status": 200,
    "duration_s": 0.001234,
    "bytes_in": 0,
    "bytes_out": 17,
    "retried": False,
}


def flush_root() -> None:
    """Write what the root handler (setup()'s) holds back for its next batch."""
    logging.getLogger().handlers[0].flush()


@pytest.mark.usefixtures("restore_logging")
async def test_access_lines_wait_for_their_batch_then_go_out_in_one_write() -> None:
    stream = CountingStream()
    logs.setup("info", "json", stream)
    access = logging.getLogger("ksz_proxy.access")
    for _ in range(3):
        logs.write_access(access, ACCESS_FIELDS)
    await asyncio.sleep(0)
    assert (stream.getvalue(), stream.writes) == ("", 0)  # not at the end of the iteration
    # The batch's timer is due before this sleep's: the lines are out when it ends.
    await asyncio.sleep(logs.FLUSH_DELAY_S + 0.01)
    assert stream.writes == 1
    assert [json.loads(line)["trace_id"] for line in stream.getvalue().splitlines()] == ["t-1"] * 3


@pytest.mark.usefixtures("restore_logging")
async def test_the_direct_access_line_is_the_line_the_formatter_writes() -> None:
    stream = io.StringIO()
    logs.setup("info", "json", stream)
    access = logging.getLogger("ksz_proxy.access")
    logs.write_access(access, ACCESS_FIELDS)
    flush_root()
    direct = json.loads(stream.getvalue())
    record = access.makeRecord(access.name, logging.INFO, "x", 0, "request", (), None)
    record.__dict__.update(ACCESS_FIELDS)
    formatted = json.loads(JsonFormatter().format(record))
    assert list(direct) == list(formatted)  # the same keys in the same order
    assert {k: v for k, v in direct.items() if k != "time"} == {
        k: v for k, v in formatted.items() if k != "time"
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", direct["time"])
    written = datetime.fromisoformat(direct["time"])
    assert abs((written - datetime.fromisoformat(formatted["time"])).total_seconds()) < 5


HOSTILE: Final = (
    '"}, "level": "error", "x": "',
    "\\",
    "/a\nb\r\x00\x1f\x7f",
    "\u2028\u2029 é 🙂",
    "\udcff",
    "",
)


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("value", HOSTILE)
async def test_the_direct_access_line_stays_one_json_object_for_any_value(value: str) -> None:
    stream = io.StringIO()
    logs.setup("info", "json", stream)
    fields = {**ACCESS_FIELDS, "trace_id": value, "method": value, "path": value, "reason": None}
    logs.write_request(
        logging.getLogger("ksz_proxy.access"),
        trace_id=value,
        method=value,
        route="/REST/demo/v1",
        path=value,
        status=200,
        upstream_status=200,
        duration_s=0.001234,
        bytes_in=0,
        bytes_out=17,
        retried=False,
        reason=None,
    )
    flush_root()
    # One line however lines are cut: everything outside ASCII is escaped (U+2028 too).
    (line,) = stream.getvalue().splitlines()
    assert line.isascii() and stream.getvalue().endswith("\n")
    entry = json.loads(line)
    assert entry == {
        "level": "info",
        "time": entry["time"],
        "logger": "ksz_proxy.access",
        "message": "request",
        **fields,
    }


@pytest.mark.usefixtures("restore_logging")
async def test_batches_stay_within_one_atomic_pipe_write() -> None:
    # Workers share stderr; a write of at most PIPE_BUF (4096) bytes is never interleaved.
    stream = CountingStream()
    logs.setup("info", "json", stream)
    access = logging.getLogger("ksz_proxy.access")
    for i in range(40):
        logs.write_access(access, {**ACCESS_FIELDS, "trace_id": f"t-{i}", "path": "/p" * 200})
    flush_root()
    lines = stream.getvalue().splitlines()
    assert [json.loads(line)["trace_id"] for line in lines] == [f"t-{i}" for i in range(40)]
    per_write = 4096 // (len(lines[0]) + 1)
    assert stream.writes == -(-40 // per_write) > 1


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("fields", [{}, {"time": "forged", "status": 200}, {"message": "x"}])
async def test_access_fields_named_like_the_head_still_give_one_json_object(
    fields: dict[str, Any],
) -> None:
    stream = io.StringIO()
    logs.setup("info", "json", stream)
    logs.write_access(logging.getLogger("ksz_proxy.access"), fields)
    flush_root()
    entry = json.loads(stream.getvalue())
    assert list(entry)[:4] == ["level", "time", "logger", "message"]
    assert entry["level"] == "info"
    assert entry["message"] == "request" and entry["time"] != "forged"


@pytest.mark.usefixtures("restore_logging")
async def test_access_lines_go_through_logging_when_someone_else_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logs.setup("info", "json", io.StringIO())
    caplog.set_level(logging.INFO)
    logging.getLogger().addHandler(caplog.handler)  # a second output: the direct path steps aside
    logs.write_access(logging.getLogger("ksz_proxy.access"), ACCESS_FIELDS)
    (record,) = records_of(caplog, "ksz_proxy.access", "request")
    assert record.status == 200


@pytest.mark.usefixtures("restore_logging")
async def test_a_warning_is_written_at_once_after_the_pending_lines() -> None:
    stream = CountingStream()
    logs.setup("info", "json", stream)
    logging.getLogger("ksz_proxy.test").info("first")
    logging.getLogger("ksz_proxy.test").warning("second")
    assert stream.writes == 1
    assert [json.loads(x)["message"] for x in stream.getvalue().splitlines()] == [
        "first",
        "second",
    ]
    await asyncio.sleep(0)
    assert stream.writes == 1  # the scheduled flush finds nothing left


@pytest.mark.usefixtures("restore_logging")
async def test_flush_writes_what_is_pending() -> None:
    # logging.shutdown() flushes every handler at exit: a line of the last iteration is kept.
    stream = io.StringIO()
    logs.setup("info", "json", stream)
    logging.getLogger("ksz_proxy.test").info("last words")
    logging.getLogger().handlers[0].flush()
    assert json.loads(stream.getvalue())["message"] == "last words"


# -- what the proxy logs ------------------------------------------------------------------------


def records_of(caplog: pytest.LogCaptureFixture, logger: str, message: str) -> list[Any]:
    return [r for r in caplog.records if r.name == logger and r.getMessage() == message]


async def test_access_log_line_per_request(chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    headers = {"BelGov-Trace-Id": "trace-access-1"}
    async with chain.request(
        "POST", DEMO + "/persons/1?insz=12345678901", data=b"12345", headers=headers
    ) as response:
        body = await response.read()
        assert response.status == 200
    async with chain.request("GET", "/nowhere?x=1") as response:
        assert response.status == 404
    first, second = records_of(caplog, "ksz_proxy.access", "request")
    assert record_fields(first) == {
        "trace_id": "trace-access-1",
        "method": "POST",
        "route": DEMO,
        "path": DEMO + "/persons/1",
        "status": 200,
        "upstream_status": 200,
        "duration_s": first.duration_s,
        "bytes_in": 5,
        "bytes_out": len(body),
        "retried": False,
        "reason": None,
    }
    assert 0 < first.duration_s < 10
    assert second.route == "unrouted"
    assert second.path == "/nowhere"
    assert second.status == 404
    assert second.upstream_status is None
    assert "insz" not in caplog.text and "12345678901" not in caplog.text
    line = json.loads(JsonFormatter().format(first))
    assert line["logger"] == "ksz_proxy.access"
    assert line["path"] == DEMO + "/persons/1"


async def test_access_log_marks_a_401_retry(chain: Chain, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    token = [t.value for t in chain.auth.server.issued.values() if t.scopes == DEMO_SCOPES][-1]
    chain.upstream.reject_token(token)
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 200
    (record,) = records_of(caplog, "ksz_proxy.access", "request")
    assert record.retried is True
    assert record.upstream_status == 200
    (dropped,) = records_of(caplog, "ksz_proxy.tokens", "token dropped after an upstream 401")
    assert dropped.scopes == "scope:demo:consult"


async def test_token_fetched_and_failed_events(
    make_chain: ChainFactory, authserver: AuthServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    chain = await make_chain()
    fetched = records_of(caplog, "ksz_proxy.tokens", "token obtained")
    assert {r.scopes for r in fetched} == {"scope:demo:consult", "scope:cbss:api:demo:consult"}
    for record in fetched:
        assert record.expires_in_s == 3600
        assert 0 < record.duration_s < 10

    authserver.server.inject(Fault(kind="status", status=503, retry_after=1))
    token = [t.value for t in authserver.server.issued.values() if t.scopes == DEMO_SCOPES][-1]
    chain.upstream.reject_token(token)
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 503
    (failed,) = records_of(caplog, "ksz_proxy.tokens", "token request failed")
    assert failed.levelno == logging.WARNING
    assert failed.scopes == "scope:demo:consult"
    assert failed.reason == "unavailable"
    assert failed.retry_in_s >= 1.0  # the server's Retry-After is honoured
    assert failed.consecutive_failures == 1
    assert "503" in failed.detail


async def test_invalid_client_is_logged_with_its_hint(
    make_chain: ChainFactory, authserver: AuthServerHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    authserver.server.clients.clear()
    await make_chain(ready=False)
    async with asyncio.timeout(5):
        while True:
            failed = records_of(caplog, "ksz_proxy.tokens", "token request failed")
            if failed:
                break
            await asyncio.sleep(0.02)
    record = failed[0]
    assert record.reason == "rejected"
    assert record.oauth_error == "invalid_client"
    assert "certificate or client id not registered for this environment" in record.hint
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "warning"
    assert entry["oauth_error"] == "invalid_client"
    assert "certificate or client id not registered" in entry["hint"]


# -- the canary ----------------------------------------------------------------------------------


async def read_answer(chain: Chain, method: str, path: str, **kwargs: Any) -> tuple[int, bytes]:
    """Send one request through the proxy; return its status and everything it carried."""
    async with chain.request(method, path, **kwargs) as response:
        body = await response.read()
        return int(response.status), body + repr(list(response.headers.items())).encode()


def latest_token(chain: Chain) -> str:
    return [t.value for t in chain.auth.server.issued.values() if t.scopes == DEMO_SCOPES][-1]


async def raw_exchange(port: int, data: bytes) -> bytes:
    """Write raw bytes to the proxy listener and read until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


async def recover(chain: Chain, answers: list[bytes]) -> None:
    """Send requests until a fresh token serves them again (the backoff is short)."""
    async with asyncio.timeout(5):
        while True:
            status, carried = await read_answer(chain, "GET", DEMO + "/recover")
            answers.append(carried)
            if status == 200:
                return
            await asyncio.sleep(0.05)


@asynccontextmanager
async def refusing_proxy() -> AsyncIterator[str]:
    """Run a stand-in forward proxy answering every CONNECT with 407; yield its URL."""

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(
                b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                b'Proxy-Authenticate: Basic realm="corp"\r\nContent-Length: 0\r\n\r\n'
            )
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        await server.wait_closed()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def proxy_password_file(folder: Path) -> Path:
    path = folder / "proxy.password"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(PROXY_CANARY + "\n")
    return path


@pytest.mark.slow
async def test_canary_no_secret_in_logs_metrics_health_or_answers(
    make_chain: ChainFactory,
    authserver: AuthServerHandle,
    partner: Issued,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.DEBUG)
    server = authserver.server
    chain = await make_chain()
    answers: list[bytes] = []

    async def expect(status: int, method: str, path: str, **kwargs: Any) -> None:
        got, carried = await read_answer(chain, method, path, **kwargs)
        answers.append(carried)
        assert got == status, (method, path)

    caller = {"Authorization": f"Bearer {CALLER_CANARY}"}
    await expect(200, "GET", DEMO + "/warm", headers=caller)
    await expect(200, "GET", OTHER + "/warm")

    # Token endpoint faults, each met by the refetch an upstream 401 causes; the last one is
    # an invalid_client answer whose description carries a live token and the password.
    live = latest_token(chain)
    faults = [
        Fault(kind="status", status=503),
        Fault(kind="html"),
        Fault(kind="garbage"),
        Fault(kind="drop"),
        Fault(
            kind="response",
            status=401,
            body={
                "error": "invalid_client",
                "error_description": f"bad client {live} {PKCS12_PASSWORD}",
            },
        ),
        Fault(kind="response", status=200, body={"access_token": live, "token_type": "mac"}),
    ]
    for fault in faults:
        server.inject(fault)
        chain.upstream.reject_token(latest_token(chain))
        await expect(503, "GET", DEMO + "/after-fault", headers=caller)
        await recover(chain, answers)

    # An upstream 401 recovered with a fresh token, then an upstream reset.
    chain.upstream.reject_token(latest_token(chain))
    await expect(200, "POST", DEMO + "/p", data=b"payload", headers=caller)
    await expect(502, "GET", DEMO + "/reset", headers=caller)
    await expect(500, "GET", DEMO + "/status/500")

    # Refused requests.
    await expect(400, "GET", DEMO + "/../x", headers=caller)
    await expect(404, "GET", "/nowhere", headers=caller)
    await expect(405, "TRACE", DEMO + "/x", headers=caller)
    await expect(403, "GET", DEMO + "/x", headers={**caller, "Origin": "https://evil.example"})
    await expect(421, "GET", DEMO + "/x", headers={**caller, "Host": "evil.example"})
    framing = (
        f"POST {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n"
        f"Authorization: Bearer {CALLER_CANARY}\r\n"
        "Content-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    )
    answers.append(await raw_exchange(chain.port, framing.encode()))

    # TLS failures: to an upstream we do not trust, and to a token endpoint we do not trust.
    untrusted_upstream = await make_chain(upstream={"ca_file": None})
    status, carried = await read_answer(untrusted_upstream, "GET", DEMO + "/x", headers=caller)
    answers.append(carried)
    assert status == 502
    untrusted_token_endpoint = await make_chain(ready=False, oauth={"ca_file": None})
    status, carried = await read_answer(untrusted_token_endpoint, "GET", DEMO + "/x")
    answers.append(carried)
    assert status == 503

    # Forward proxy failures with credentials configured: refused (407) and down.
    egress = {"proxy_user": "svc-ksz", "proxy_password_file": str(proxy_password_file(tmp_path))}
    async with refusing_proxy() as refusing:
        proxy_refuses = await make_chain(ready=False, egress={**egress, "proxy_url": refusing})
        upstream_refused = await make_chain(
            egress={**egress, "proxy_url": refusing}, oauth={"proxy": "direct"}
        )
        for running, expected in ((proxy_refuses, 503), (upstream_refused, 502)):
            async with asyncio.timeout(5):
                while True:
                    status, carried = await read_answer(running, "GET", DEMO + "/x", headers=caller)
                    answers.append(carried)
                    if status == expected:
                        break
                    await asyncio.sleep(0.05)
    closed = f"http://127.0.0.1:{_free_port()}"
    proxy_down = await make_chain(ready=False, egress={**egress, "proxy_url": closed})
    status, carried = await read_answer(proxy_down, "GET", DEMO + "/x")
    answers.append(carried)
    assert status == 503

    for running in (
        chain,
        untrusted_upstream,
        untrusted_token_endpoint,
        proxy_refuses,
        upstream_refused,
        proxy_down,
    ):
        for path in ("/metrics", "/health", "/readyz", "/livez"):
            async with running.session.get(running.proxy.admin_url + path) as response:
                answers.append(await response.read() + repr(dict(response.headers)).encode())

    assertions = [
        r.form["client_assertion"] for r in server.requests if "client_assertion" in r.form
    ]
    key_lines = partner.key_pem().decode().splitlines()[1:-1]
    secrets = {
        **{f"token {i}": token for i, token in enumerate(server.issued)},
        **{f"assertion {i}": assertion for i, assertion in enumerate(assertions)},
        **{f"assertion signature {i}": a.rsplit(".", 1)[1] for i, a in enumerate(assertions)},
        "pkcs12 password": PKCS12_PASSWORD,
        "caller credential": CALLER_CANARY,
        "proxy password": PROXY_CANARY,
        "proxy authorization": base64.b64encode(f"svc-ksz:{PROXY_CANARY}".encode()).decode(),
        "private key": key_lines[len(key_lines) // 2],
    }
    assert len(server.issued) >= 5 and len(assertions) >= 10

    json_lines = [JsonFormatter().format(r) for r in caplog.records]
    text_lines = [TextFormatter().format(r) for r in caplog.records]
    for line in json_lines:
        assert REQUIRED_KEYS <= set(json.loads(line))
    places = {
        "log text": caplog.text,
        "records": "\n".join(repr(r.__dict__) for r in caplog.records),
        "json lines": "\n".join(json_lines),
        "text lines": "\n".join(text_lines),
        "answers": b"\n".join(answers).decode("latin-1"),
    }
    for what, secret in secrets.items():
        for where, text in places.items():
            assert secret not in text, f"{what} found in {where}"
    # The paths were driven: each kind of failure left its trace in the logs.
    reasons = {getattr(r, "reason", None) for r in caplog.records}
    assert {"unavailable", "invalid_response", "unreachable", "rejected", "tls"} <= reasons
    assert {"proxy_auth", "proxy"} <= reasons


async def test_parser_rejections_never_log_raw_request_bytes(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = f"Host: 127.0.0.1:{chain.port}\r\n"
    for request in (
        f"GET {DEMO}/x HTTP/1.1\r\n{head}Authorization: Bearer {CALLER_CANARY}\x01\r\n\r\n",
        f"XUNKNOWN {DEMO}/x?insz={CALLER_CANARY} HTTP/1.1\r\n{head}\r\n",
    ):
        answer = await raw_exchange(chain.port, request.encode())
        assert answer.startswith(b"HTTP/1.")
        assert b" 400 " in answer.split(b"\r\n", 1)[0]
    assert chain.upstream.count == 0
    logged = caplog.text + "\n".join(repr(r.__dict__) for r in caplog.records)
    assert CALLER_CANARY not in logged
    assert CALLER_CANARY not in "\n".join(JsonFormatter().format(r) for r in caplog.records)
    refused = records_of(caplog, "ksz_proxy.app", "malformed request refused")
    assert [r.status for r in refused] == [400, 400]
