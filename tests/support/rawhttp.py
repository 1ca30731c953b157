"""A tiny HTTP/1.1 client on a raw socket, for tests that must send and read exact bytes.

aiohttp's client normalises what it sends (it merges case-variant duplicates, frames bodies its
own way, refuses control characters); these helpers write bytes as given and parse the answers
by hand: status, headers (case and order kept), chunked or sized bodies, pipelined responses.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any, Final

from multidict import CIMultiDict

READ_TIMEOUT_S: Final = 5.0
PROBLEM_FIELDS: Final = {"type", "title", "status", "detail", "instance", "reason"}


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One response as parsed from the raw bytes."""

    status: int
    headers: CIMultiDict[str]
    body: bytes

    def problem(self) -> dict[str, Any]:
        """Return the body as a JSON object."""
        return dict(json.loads(self.body))


@dataclass(frozen=True, slots=True)
class RawResult:
    """Every complete response read, and whether the server closed the connection."""

    responses: list[RawResponse]
    closed: bool

    @property
    def statuses(self) -> list[int]:
        return [r.status for r in self.responses]

    @property
    def only(self) -> RawResponse:
        """Return the single response; fail when there is not exactly one."""
        assert len(self.responses) == 1, self.statuses
        return self.responses[0]


def build(
    method: str,
    target: str,
    port: int,
    headers: list[tuple[str, str]] | None = None,
    *,
    body: bytes = b"",
    version: str = "HTTP/1.1",
    host: str | None = "",
    close: bool = True,
) -> bytes:
    """Return the bytes of one request; ``host=""`` means ``127.0.0.1:<port>``, None no Host."""
    lines = [f"{method} {target} {version}"]
    if host is not None:
        lines.append(f"Host: {host or f'127.0.0.1:{port}'}")
    lines.extend(f"{name}: {value}" for name, value in headers or ())
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def parse_responses(data: bytes, *, at_eof: bool) -> tuple[list[RawResponse], bytes]:
    """Split ``data`` into complete responses and the unparsed rest."""
    responses: list[RawResponse] = []
    while True:
        head_end = data.find(b"\r\n\r\n")
        if head_end < 0:
            return responses, data
        lines = data[:head_end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        rest = data[head_end + 4 :]
        if 100 <= status < 200 or status in (204, 304):
            body, after = b"", rest
        elif "Content-Length" in headers:
            size = int(headers["Content-Length"])
            if len(rest) < size:
                return responses, data
            body, after = rest[:size], rest[size:]
        elif headers.get("Transfer-Encoding", "").lower() == "chunked":
            parsed = _dechunk(rest)
            if parsed is None:
                return responses, data
            body, after = parsed
        elif at_eof:
            body, after = rest, b""
        else:
            return responses, data
        responses.append(RawResponse(status=status, headers=headers, body=body))
        data = after


def _dechunk(data: bytes) -> tuple[bytes, bytes] | None:
    parts: list[bytes] = []
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return None
        size = int(data[:line_end].split(b";")[0], 16)
        start = line_end + 2
        if size == 0:
            trailer_end = data.find(b"\r\n", start)
            return (b"".join(parts), data[trailer_end + 2 :]) if trailer_end >= 0 else None
        if len(data) < start + size + 2:
            return None
        parts.append(data[start : start + size])
        data = data[start + size + 2 :]


async def read_responses(
    reader: asyncio.StreamReader, *, count: int | None = None, timeout_s: float = READ_TIMEOUT_S
) -> RawResult:
    """Read until EOF, until ``count`` responses are complete, or fail after ``timeout_s``."""
    data = b""
    responses: list[RawResponse] = []
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                chunk = b""
            more, data = parse_responses(data + chunk, at_eof=not chunk)
            responses.extend(more)
            if not chunk:
                return RawResult(responses=responses, closed=True)
            if count is not None and len(responses) >= count:
                return RawResult(responses=responses, closed=False)


async def close_writer(writer: asyncio.StreamWriter) -> None:
    """Close a raw connection and wait for it, whatever state the peer left it in."""
    writer.close()
    try:
        await writer.wait_closed()
    except (ConnectionError, BrokenPipeError):
        pass


async def exchange(
    port: int,
    data: bytes,
    *,
    count: int | None = None,
    timeout_s: float = READ_TIMEOUT_S,
) -> RawResult:
    """Write ``data`` in one go to the proxy listener and read the answers."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await read_responses(reader, count=count, timeout_s=timeout_s)
    finally:
        await close_writer(writer)


def assert_problem(response: RawResponse, status: int, reason: str | None = None) -> None:
    """Assert a problem+json answer made by the proxy itself."""
    assert response.status == status
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.headers.get("BelGov-Trace-Id")
    problem = response.problem()
    assert set(problem) >= PROBLEM_FIELDS
    assert problem["status"] == status
    if reason is not None:
        assert problem["reason"] == reason
    assert_no_cors(response)


def assert_no_cors(response: RawResponse) -> None:
    assert not [name for name in response.headers if name.lower().startswith("access-control-")]
