"""Own the request-framing rules aiohttp's C parser leaves to the proxy, as plain code.

llhttp (inside aiohttp's C parser) already refuses conflicting ``Content-Length`` and
``Transfer-Encoding``, obs-fold, bare LF and NUL. What it accepts and ksz-proxy does not:

- a ``Transfer-Encoding`` other than exactly ``chunked`` (``identity, chunked``, ``gzip,
  chunked``), or any ``Transfer-Encoding`` on an HTTP/1.0 request (RFC 9112 section 6.1): 400;
- a chunked body whose framing (chunk-size lines with their extensions, trailer fields) grows
  beyond ``MAX_CHUNK_FRAMING_BYTES`` without data in between: llhttp skips extensions without any
  limit, so a 20 MiB extension would count toward no limit at all. 400 (``ChunkFramingGuard``);
- trailer fields: never forwarded (aiohttp's client sends none), and, because aiohttp's C parser
  carries the last trailer field of a chunked request into the headers of the *next* request on
  the connection (docs/aiohttp-trailer-leak.md), the connection is closed after every chunked
  request (``closes_connection``): there is then no next request for a trailer to land in. aiohttp
  does not say whether a request carried trailers, so every chunked request pays one new
  connection -- the price of having one place for the workaround.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from multidict import CIMultiDictProxy

from proxy.errors import RequestRejected

# Non-data bytes a chunked body may carry in one run: a chunk-size line with its extensions, or
# the trailer section. Clients that use neither send a few bytes per chunk.
MAX_CHUNK_FRAMING_BYTES: Final = 4096
# Framing a plain chunk legitimately costs: CRLF after the data, a size line of up to 16 hex
# digits and its CRLF, with room to spare. A feed with N data bytes holds at most N chunks.
_PER_CHUNK_BYTES: Final = 32
_HTTP10: Final = (1, 0)


def check_transfer_encoding(headers: CIMultiDictProxy[str], version: tuple[int, int]) -> None:
    """Refuse a ``Transfer-Encoding`` other than exactly ``chunked``, and any on HTTP/1.0."""
    codings = headers.getall("Transfer-Encoding", ())
    if not codings:
        return
    if tuple(version) == _HTTP10:
        raise _bad_framing()
    if len(codings) != 1 or codings[0].strip(" \t").lower() != "chunked":
        raise _bad_framing()


def closes_connection(headers: CIMultiDictProxy[str]) -> bool:
    """Return True when the connection must close after this request: it was chunked.

    The one place that works around aiohttp's trailer leak (docs/aiohttp-trailer-leak.md).
    """
    return "Transfer-Encoding" in headers


def _bad_framing() -> RequestRejected:
    return RequestRejected(
        "Transfer-Encoding must be exactly chunked, on HTTP/1.1 only.",
        status=400,
        reason="bad_framing",
    )


class Payload(Protocol):
    """What the guard reads of a request body stream (aiohttp's ``StreamReader``)."""

    total_bytes: int

    def is_eof(self) -> bool: ...

    def set_exception(self, exc: BaseException) -> None: ...


class Head(Protocol):
    """What the guard reads of a parsed request head (aiohttp's ``RawRequestMessage``)."""

    @property
    def method(self) -> str: ...

    @property
    def path(self) -> str: ...

    @property
    def raw_headers(self) -> tuple[tuple[bytes, bytes], ...]: ...

    @property
    def chunked(self) -> bool: ...


def head_bytes(head: Head) -> int:
    """Return the size of ``head`` on the wire, written the usual way (``Name: value``)."""
    line = len(head.method) + len(head.path) + len(" HTTP/1.1\r\n") + 1
    return line + sum(len(name) + len(value) + 4 for name, value in head.raw_headers) + 2


@dataclass(slots=True)
class _Body:
    payload: Payload
    counted: int  # payload.total_bytes when last seen
    run: int = 0  # non-data bytes since the last data, at worst


class ChunkFramingGuard:
    """Bound the non-data bytes of chunked bodies, read by read, on one connection.

    Fed once per read from the socket with the number of bytes read and the requests whose heads
    that read completed. What a read holds beyond those heads (``head_bytes``) and the body data
    it gave is framing: chunk-size lines with their extensions, trailers. When a chunked body is
    among them, a run of framing longer than ``limit`` fails that body with 400 ``bad_chunk``.
    Bytes after a chunked body's end count too: they are never read (the connection closes after
    a chunked request, ``closes_connection``), so counting them costs nothing.
    """

    def __init__(self, limit: int = MAX_CHUNK_FRAMING_BYTES) -> None:
        self._limit = limit
        self._body: _Body | None = None

    @property
    def watching(self) -> bool:
        """Return True while a chunked body read earlier is still open."""
        return self._body is not None

    def received(self, size: int, new: Sequence[tuple[Head, Payload]]) -> bool:
        """Account for ``size`` bytes read; ``new`` holds the requests this read completed.

        Return False when a chunked body broke the limit (it is failed with 400).
        """
        body = self._body
        if body is None and not any(head.chunked for head, _ in new):
            return True  # the common case: no chunked body in sight
        data = 0
        run = 0
        chunked: list[Payload] = []
        if body is not None:
            data = body.payload.total_bytes - body.counted
            run = body.run
            chunked.append(body.payload)
        framing = size - data
        for head, payload in new:
            framing -= head_bytes(head) + payload.total_bytes
            data += payload.total_bytes
            if head.chunked:
                chunked.append(payload)
        allowance = _PER_CHUNK_BYTES * data
        if run + framing - allowance > self._limit:
            self._body = None
            chunked[-1].set_exception(_bad_chunk())
            return False
        open_body = chunked[-1] if not chunked[-1].is_eof() else None
        if open_body is None:
            self._body = None
        else:
            # Data breaks a run; at worst all framing of this read came after the data.
            run = max(0, framing - allowance) if data else run + framing
            self._body = _Body(payload=open_body, counted=open_body.total_bytes, run=run)
        return True


def _bad_chunk() -> RequestRejected:
    return RequestRejected(
        "The chunked body carries too long chunk extensions or trailers.",
        status=400,
        reason="bad_chunk",
    )
