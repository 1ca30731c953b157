"""Own the sandbox's fake KSZ REST API: it checks the bearer token, answers, and records.

``FakeUpstream`` plays a KSZ-BCSS REST service behind TLS for the demo and the end-to-end tests.
It authenticates every request the way a Belgif API does (exactly one ``Authorization: Bearer``
header, the token active per RFC 7662 introspection, the required scope granted) and answers
with RFC 9457 problems when it refuses. Before answering it records what it received in
``seen`` -- method, raw target, raw header list, body size and SHA-256, and which client the
bearer token belongs to -- so tests can assert exactly what the proxy sent. Bodies are hashed
while streaming, never kept.

The last path segment picks the behaviour, whatever API prefix the caller uses (one trailing
slash is ignored)::

    .../health              GET: 200 {"status": "UP"}
    .../stream?bytes=N      N deterministic bytes (see ``stream_chunks``); chunked=1 drops
                            Content-Length
    .../stall?seconds=S     waits S seconds (default 30), then echoes
    .../stall-body?...      sends headers and the first part of an N-byte body, then waits S
    .../redirect?to=URL     302 to URL (default /elsewhere)
    .../reset               drops the connection (TCP RST) without a byte of answer
    .../status/NNN          answers NNN with a small problem body (429 and 503: Retry-After: 7)
    .../gzip                a gzip-compressed JSON body with Content-Encoding: gzip
    .../headers-out         an answer carrying hop-by-hop headers and two Set-Cookie headers
    anything else           200 JSON echo of the request (credentials shown as ***)

Malicious modes, for the hostile tests (a KSZ endpoint would never do this)::

    .../switch              answers ``101 Switching Protocols`` that nobody asked for, then, on
                            the same connection, a second answer ``200`` with ``X-Desync: 1``
                            that a proxy reusing the connection would hand to its next caller
    .../reflect-token       200 whose headers echo the Authorization header it received
                            (``X-Debug-Authorization``, ``X-Debug-Note``: ``token=<token>``)
    .../early?status=N      answers N (default 413) before reading the request body, then
                            closes the connection (as a server refusing an upload does);
                            keep=1 keeps it open instead and stops reading from it

``SeenRequest.connection`` numbers the TCP connection a request came on (1, 2, ...), so tests
can tell a reused connection from a new one.

Only the last segment counts so that generated paths (property tests) almost never hit a
special behaviour by accident.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import socket
import struct
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web
from multidict import CIMultiDict

STREAM_PATTERN: Final = b"0123456789abcdef"
CHUNK_BYTES: Final = 64 * 1024
MAX_STREAM_BYTES: Final = 1 << 40
MAX_STALL_S: Final = 3600.0
RETRY_AFTER_S: Final = 7

# A 64 KiB chunk is a whole number of patterns, so every full chunk is this same block.
_BLOCK: Final = STREAM_PATTERN * (CHUNK_BYTES // len(STREAM_PATTERN))
_BELGIF: Final = "urn:problem-type:belgif:"
_TRACE: Final = "BelGov-Trace-Id"
_RELATED_TRACE: Final = "BelGov-Related-Trace-Id"
# RFC 6750 section 2.1: the scheme is case-insensitive, the token is a b64token.
_BEARER: Final = re.compile(r"[Bb][Ee][Aa][Rr][Ee][Rr] +([A-Za-z0-9\-._~+/]+=*)")
_PROBLEM_TYPES: Final = {
    400: "badRequest",
    401: "invalidAccessToken",
    403: "missingScope",
    404: "resourceNotFound",
    413: "payloadTooLarge",
    429: "tooManyRequests",
    500: "internalServerError",
    502: "badGateway",
    503: "serviceUnavailable",
}

Introspect = Callable[[str], Mapping[str, Any]]
ClientOf = Callable[[str], str | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class SeenRequest:
    """One request as the fake upstream received it."""

    method: str
    target: str  # the raw request target (path and query), never decoded
    # Raw header list in received order, duplicates kept. Kept out of repr: it holds the token.
    headers: tuple[tuple[str, str], ...] = field(repr=False)
    body_bytes: int
    body_sha256: str
    trace_id: str | None
    # False when the caller went away (or broke the framing) before the body ended.
    body_complete: bool = True
    # The client the (single) bearer token was issued to; None without one or when unknown.
    client_id: str | None = None
    # Which TCP connection of this fake it came on, numbered from 1 in order of first use.
    connection: int = 0

    def header_values(self, name: str) -> list[str]:
        """Return every value of header ``name`` (case-insensitive), in received order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]


def stream_chunks(size: int) -> Iterator[bytes]:
    """Yield the ``size`` bytes the ``/stream`` endpoint sends, in 64 KiB chunks."""
    full, rest = divmod(size, CHUNK_BYTES)
    for _ in range(full):
        yield _BLOCK
    if rest:
        yield _BLOCK[:rest]


def stream_sha256(size: int) -> str:
    """Return the hex SHA-256 of the ``size`` bytes the ``/stream`` endpoint sends."""
    digest = hashlib.sha256()
    for chunk in stream_chunks(size):
        digest.update(chunk)
    return digest.hexdigest()


def _problem(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    title: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """Return an RFC 9457 problem answer; ``kind`` names the Belgif type (default by status)."""
    kind = kind or _PROBLEM_TYPES.get(status)
    body = {
        "type": _BELGIF + kind if kind else "about:blank",
        "title": title or _phrase(status),
        "status": status,
        "detail": detail,
    }
    return web.Response(
        status=status,
        body=json.dumps(body).encode(),
        headers={**(headers or {}), "Content-Type": "application/problem+json"},
    )


class FakeUpstream:
    """A fake KSZ REST API that authenticates, answers by path and records every request."""

    def __init__(
        self,
        *,
        introspect: Introspect | None = None,
        required_scope: str | None = None,
        client_of: ClientOf | None = None,
    ) -> None:
        """``client_of`` names a token's client for ``seen`` (default: the introspection's)."""
        # Without introspection nothing says which scopes a token has, so a scope rule
        # could only ever refuse or only ever accept: both would hide a mistake.
        if required_scope is not None and introspect is None:
            raise ValueError("required_scope needs an introspect function")
        self.seen: list[SeenRequest] = []
        self._introspect = introspect
        self._client_of = client_of
        self._required_scope = required_scope
        self._rejections: dict[str, int] = {}
        # Connections numbered in order of first use (the transport object identifies one).
        self._connections: dict[int, int] = {}

    @property
    def count(self) -> int:
        """Return how many requests reached the fake upstream."""
        return len(self.seen)

    def reject_token(self, token: str, times: int = 1) -> None:
        """Answer 401 invalid_token to the next ``times`` requests carrying ``token``."""
        if times < 1:
            raise ValueError("times must be at least 1")
        self._rejections[token] = self._rejections.get(token, 0) + times

    def reset(self) -> None:
        """Forget the recorded requests and the pending rejections."""
        self.seen.clear()
        self._rejections.clear()

    def make_app(self) -> web.Application:
        """Return the aiohttp application serving this fake upstream."""
        app = web.Application(
            handler_args={
                # Bodies must be hashed as sent: the proxy passes compressed bodies through.
                "auto_decompress": False,
                # A caller that goes away (a proxy timeout) must end /stall at once, not
                # hold the server's shutdown for the whole stall.
                "handler_cancellation": True,
            }
        )
        app.router.add_route("*", "/{tail:.*}", self._handle)
        app.on_response_prepare.append(_add_trace_ids)
        return app

    def clients_seen(self) -> list[tuple[str, str | None]]:
        """Return (path, client id) for every request seen, in order (the query left out)."""
        return [(seen.target.partition("?")[0], seen.client_id) for seen in self.seen]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if _last_segment(request) == "early":
            # Before the body: the point is that it is never read.
            self.seen.append(
                _describe(request, 0, "", complete=False, connection=self._number(request))
            )
            return _early(request)
        seen = await _receive(
            request, self.seen, self._token_client(request), self._number(request)
        )
        if not seen.body_complete:
            # Nobody may be left to read this; if the connection is gone aiohttp drops it.
            return _problem(400, "The request body did not arrive complete.")
        refusal = self._authenticate(request)
        if refusal is not None:
            return refusal
        return await _answer(request, seen)

    def _token_client(self, request: web.Request) -> str | None:
        """Return the client the request's only bearer token belongs to, if that is known."""
        values = request.headers.getall("Authorization", [])
        match = _BEARER.fullmatch(values[0]) if len(values) == 1 else None
        if match is None:
            return None
        token = match.group(1)
        if self._client_of is not None:
            return self._client_of(token)
        if self._introspect is None:
            return None
        client_id = self._introspect(token).get("client_id")
        return client_id if isinstance(client_id, str) else None

    def _number(self, request: web.Request) -> int:
        key = id(request.transport)
        return self._connections.setdefault(key, len(self._connections) + 1)

    def _authenticate(self, request: web.Request) -> web.Response | None:
        values = request.headers.getall("Authorization", [])
        if not values:
            return _problem(
                401,
                "No access token was sent.",
                title="No Access Token",
                headers={"WWW-Authenticate": 'Bearer realm="ksz"'},
                kind="noAccessToken",
            )
        if len(values) > 1:
            return _problem(400, "More than one Authorization header was sent.")
        match = _BEARER.fullmatch(values[0])
        if match is None:
            return _problem(400, "The Authorization header is not a Bearer token.")
        token = match.group(1)
        invalid = _problem(
            401,
            "The access token is not active.",
            title="Invalid Access Token",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )
        pending = self._rejections.get(token, 0)
        if pending:
            if pending == 1:
                del self._rejections[token]
            else:
                self._rejections[token] = pending - 1
            return invalid
        if self._introspect is None:
            return None
        info = self._introspect(token)
        if info.get("active") is not True:
            return invalid
        if self._required_scope is not None:
            granted = str(info.get("scope", "")).split()
            if self._required_scope not in granted:
                return _problem(
                    403,
                    "The access token lacks the scope this API requires.",
                    title="Missing Scope",
                    headers={
                        "WWW-Authenticate": (
                            f'Bearer error="insufficient_scope", scope="{self._required_scope}"'
                        )
                    },
                )
        return None


async def _receive(
    request: web.Request, record: list[SeenRequest], client_id: str | None, connection: int = 0
) -> SeenRequest:
    """Read the body as it streams in, then describe the request in ``record``."""
    digest = hashlib.sha256()
    size = 0
    complete = True
    try:
        async for chunk in request.content.iter_chunked(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    except (ConnectionError, web.RequestPayloadError):
        complete = False
    except asyncio.CancelledError:
        # The caller hung up and aiohttp cancelled us: what did arrive still counts.
        record.append(
            _describe(
                request,
                size,
                digest.hexdigest(),
                complete=False,
                client_id=client_id,
                connection=connection,
            )
        )
        raise
    seen = _describe(
        request,
        size,
        digest.hexdigest(),
        complete=complete,
        client_id=client_id,
        connection=connection,
    )
    record.append(seen)
    return seen


def _describe(
    request: web.Request,
    size: int,
    sha256: str,
    *,
    complete: bool,
    client_id: str | None = None,
    connection: int = 0,
) -> SeenRequest:
    return SeenRequest(
        method=request.method,
        target=request.raw_path,
        headers=tuple(
            (name.decode("latin-1"), value.decode("latin-1")) for name, value in request.raw_headers
        ),
        body_bytes=size,
        body_sha256=sha256,
        trace_id=request.headers.get(_TRACE),
        body_complete=complete,
        client_id=client_id,
        connection=connection,
    )


def _last_segment(request: web.Request) -> str:
    return request.raw_path.partition("?")[0].removesuffix("/").rsplit("/", 1)[-1]


async def _answer(request: web.Request, seen: SeenRequest) -> web.StreamResponse:
    """Answer an authenticated request by its last path segment."""
    path = request.raw_path.partition("?")[0]
    segments = path.removesuffix("/").split("/")
    last = segments[-1]
    parent = segments[-2] if len(segments) > 1 else ""
    if last == "health":
        return _health(request)
    if last == "stream":
        return await _stream(request)
    if last == "stall":
        return await _stall(request, seen)
    if last == "stall-body":
        return await _stall_body(request)
    if last == "redirect":
        return _redirect(request)
    if last == "reset":
        return _reset(request)
    if parent == "status" and len(last) == 3 and last.isdigit():
        return _status(int(last))
    if last == "gzip":
        return _gzip()
    if last == "headers-out":
        return _headers_out()
    if last == "switch":
        return await _switch(request)
    if last == "reflect-token":
        return _reflect_token(request)
    return _echo(seen)


def _echo(seen: SeenRequest) -> web.Response:
    body = {
        "method": seen.method,
        "target": seen.target,
        "headers": [[name, _redact(name, value)] for name, value in seen.headers],
        "body_bytes": seen.body_bytes,
        "body_sha256": seen.body_sha256,
    }
    return web.Response(
        body=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def _redact(name: str, value: str) -> str:
    # The echo travels back through the proxy to the caller, who must never see the token
    # (tests look for it in every answer); ``seen`` keeps the real value.
    if name.lower() not in ("authorization", "proxy-authorization"):
        return value
    scheme, _, credentials = value.partition(" ")
    return f"{scheme} ***" if credentials else "***"


def _health(request: web.Request) -> web.Response:
    if request.method not in ("GET", "HEAD"):
        return _problem(405, "Only GET is allowed on /health.", headers={"Allow": "GET, HEAD"})
    return web.Response(body=b'{"status": "UP"}', headers={"Content-Type": "application/json"})


async def _stream(request: web.Request) -> web.StreamResponse:
    size = _query_int(request, "bytes", 1024, high=MAX_STREAM_BYTES)
    if size is None:
        return _problem(400, f"bytes must be an integer from 0 to {MAX_STREAM_BYTES}.")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    if request.query.get("chunked") == "1":
        response.enable_chunked_encoding()
    else:
        response.content_length = size
    await response.prepare(request)
    # aiohttp would send whatever is written, even on HEAD: the answer must stay bodiless.
    if request.method != "HEAD":
        for chunk in stream_chunks(size):
            await response.write(chunk)
    await response.write_eof()
    return response


async def _stall(request: web.Request, seen: SeenRequest) -> web.Response:
    seconds = _query_seconds(request)
    if seconds is None:
        return _problem(400, f"seconds must be a number from 0 to {MAX_STALL_S:g}.")
    await asyncio.sleep(seconds)
    return _echo(seen)


async def _stall_body(request: web.Request) -> web.StreamResponse:
    size = _query_int(request, "bytes", 2 * CHUNK_BYTES, high=MAX_STREAM_BYTES)
    seconds = _query_seconds(request)
    if size is None or seconds is None:
        return _problem(400, "bytes must be an integer and seconds a number in range.")
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    # Half the body (at most a chunk) before the stall, so the stall is always mid-body. The
    # cut falls on a pattern boundary, so the rest is /stream's pattern from its start again.
    first = min(CHUNK_BYTES, size // 2 // len(STREAM_PATTERN) * len(STREAM_PATTERN))
    await response.write(_BLOCK[:first])
    await asyncio.sleep(seconds)
    for chunk in stream_chunks(size - first):
        await response.write(chunk)
    await response.write_eof()
    return response


def _redirect(request: web.Request) -> web.Response:
    location = request.query.get("to", "/elsewhere")
    if not location or any(ord(c) < 0x21 or ord(c) == 0x7F for c in location):
        return _problem(400, "to must be a URL without spaces or control characters.")
    return web.Response(status=302, headers={"Location": location})


def _reset(request: web.Request) -> web.Response:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0: closing sends a TCP RST instead of an orderly FIN.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
    # aiohttp finds the transport closing, writes nothing and drops this answer quietly.
    return web.Response(status=204)


def _status(status: int) -> web.Response:
    if not 200 <= status <= 599:
        return _problem(400, "The status must be from 200 to 599.")
    headers: dict[str, str] = {}
    if status in (429, 503):
        headers["Retry-After"] = str(RETRY_AFTER_S)
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
    if status in (204, 304):
        return web.Response(status=status, headers=headers)
    return _problem(status, f"The fake upstream answered {status} as asked.", headers=headers)


def _gzip() -> web.Response:
    # mtime=0 keeps the bytes the same on every call, so tests can compare them.
    body = gzip.compress(json.dumps({"compressed": True, "status": "UP"}).encode(), mtime=0)
    return web.Response(
        body=body, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
    )


def _headers_out() -> web.Response:
    headers: CIMultiDict[str] = CIMultiDict()
    headers.add("Content-Type", "application/json")
    # A proxy must drop these: the fixed hop-by-hop set and every name listed in Connection.
    headers.add("Connection", "X-Secret-Hop")
    headers.add("X-Secret-Hop", "1")
    headers.add("Keep-Alive", "timeout=5")
    headers.add("Proxy-Authenticate", 'Basic realm="fake"')
    # ... and keep these.
    headers.add("Set-Cookie", "a=1; Path=/; Secure; HttpOnly")
    headers.add("Set-Cookie", "b=2; Path=/; Secure; HttpOnly")
    headers.add("X-End-To-End", "kept")
    return web.Response(body=b'{"headers": "out"}', headers=headers)


# A 101 nobody asked for, and right behind it an answer only a reused connection would read.
_SWITCH: Final = (
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Desync: 1\r\n\r\nsmuggled"
)


async def _switch(request: web.Request) -> web.StreamResponse:
    transport = request.transport
    if transport is None:
        return _problem(400, "The connection is gone.")
    transport.write(_SWITCH)
    # Hold the connection: a proxy that reuses it reads the second answer as its next one.
    # The proxy closing it cancels this handler (handler_cancellation), so nothing else is sent.
    await asyncio.sleep(MAX_STALL_S)
    return _problem(500, "unreachable")


def _reflect_token(request: web.Request) -> web.Response:
    authorization = request.headers.get("Authorization", "")
    token = authorization.partition(" ")[2]
    headers = {
        "Content-Type": "application/json",
        "X-Debug-Authorization": authorization,
        "X-Debug-Note": f"request carried token={token}; ok",
        "X-Kept": "kept",
    }
    return web.Response(body=b'{"reflected": true}', headers=headers)


def _early(request: web.Request) -> web.Response:
    status = _query_int(request, "status", 413, high=599)
    if status is None or status < 200:
        return _problem(400, "status must be from 200 to 599.")
    response = _problem(status, "Answered before the body was read.")
    if request.query.get("keep") == "1":
        # Keep the connection and stop reading: the unread body fills the socket buffers.
        if request.transport is not None:
            request.transport.pause_reading()
        return response
    # No lingering read of the body: the connection closes right after the answer.
    response.force_close()
    return response


async def _add_trace_ids(request: web.Request, response: web.StreamResponse) -> None:
    """Give every answer its own trace id and echo the caller's, as KSZ does."""
    response.headers[_TRACE] = str(uuid.uuid4())
    related = request.headers.get(_TRACE)
    if related is not None:
        response.headers[_RELATED_TRACE] = related


def _query_int(request: web.Request, name: str, default: int, *, high: int) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isascii() or not raw.isdigit() or int(raw) > high:
        return None
    return int(raw)


def _query_seconds(request: web.Request) -> float | None:
    raw = request.query.get("seconds")
    if raw is None:
        return 30.0
    try:
        seconds = float(raw)
    except ValueError:
        return None
    return seconds if 0 <= seconds <= MAX_STALL_S else None


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown Status"
