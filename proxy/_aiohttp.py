"""Own every use of aiohttp internals, each with why it is needed.

aiohttp is pinned to the minor series these were checked against (pyproject.toml); each use is
pinned by a test in ``tests/test_aiohttp_internals.py`` that fails loudly when aiohttp changes it.
Nothing else in ksz-proxy may reach into aiohttp's private attributes.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from typing import Any

from aiohttp import http_parser, web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.errors import ParserError

# The module aiohttp's compiled (C) HTTP request parser lives in.
C_PARSER_MODULE = "aiohttp._http_parser"


def check_c_parser() -> None:
    """Refuse to run on aiohttp's pure-Python HTTP parser (AIOHTTP_NO_EXTENSIONS or no wheel)."""
    # Why: the Python fallback is slower and parses differently (the hostile-input tests are
    # written against the C parser); aiohttp says which one it uses only by the class's module.
    if http_parser.HttpRequestParser.__module__ != C_PARSER_MODULE:
        raise ParserError(
            "aiohttp's C HTTP parser is not in use (AIOHTTP_NO_EXTENSIONS set, or aiohttp was "
            "installed without its compiled extension); ksz-proxy refuses the Python fallback"
        )


def forget_interim_output(writer: Any) -> None:
    """Reset the count of bytes written so that an interim answer does not count as started."""
    # Why: after ``100 Continue`` is written straight to the StreamWriter, aiohttp's error path
    # (RequestHandler.handle_error / the answer-has-started check) reads writer.output_size to
    # decide whether the final answer has begun; the interim line must not count.
    writer.output_size = 0


def answer_started(request: web.BaseRequest) -> bool:
    """Return True once bytes of the final answer have been written to the caller."""
    # Why: StreamWriter.output_size is the only record of bytes already sent on the connection.
    return bool(request.writer.output_size > 0)


def server_of(handler: RequestHandler) -> web.Server:
    """Return the ``web.Server`` that made a connection's request handler."""
    # Why: RequestHandler keeps its server as the private ``_manager``; handle_error needs it
    # to reach the listener's metrics.
    manager = handler._manager
    if manager is None:  # pragma: no cover - set for the handler's whole life
        raise RuntimeError("aiohttp's RequestHandler has no server")
    return manager


class CustomHandlerServer(web.Server):
    """A low-level server whose connections use ``connection_class`` instead of aiohttp's own."""

    # Why: web.Server builds its RequestHandler in __call__ from the private _loop and _kwargs;
    # there is no public hook for a RequestHandler subclass.
    connection_class: type[RequestHandler] = RequestHandler

    def __call__(self) -> RequestHandler:
        return self.connection_class(self, loop=self._loop, **self._kwargs)


def requests_queued_since(
    handler: RequestHandler, count: int
) -> Iterator[tuple[RawRequestMessage, StreamReader]]:
    """Yield the requests (head, body stream) a connection queued after its first ``count``."""
    # Why: the chunk framing guard (framing.py) needs the requests one read from the socket
    # completed, with their body streams, to tell head, body data and framing bytes apart;
    # RequestHandler.data_received appends them to the private ``_messages`` deque, and
    # only the handler's own task removes them, never during data_received.
    for message, payload in islice(handler._messages, count, None):
        if isinstance(message, RawRequestMessage) and isinstance(payload, StreamReader):
            yield message, payload


def chunked_request_since(handler: RequestHandler, count: int) -> bool:
    """Return True when a request a connection queued after its first ``count`` is chunked."""
    # Why: see requests_queued_since; this is its cheap question for every read.
    messages = handler._messages
    if len(messages) <= count:
        return False
    return any(
        isinstance(message, RawRequestMessage) and message.chunked
        for message, _ in islice(messages, count, None)
    )


def requests_queued(handler: RequestHandler) -> int:
    """Return how many parsed requests a connection holds that its handler has not taken yet."""
    # Why: see requests_queued_since.
    return len(handler._messages)


class Http11Response(web.Response):
    """A response whose status line says ``HTTP/1.1`` whatever version the request named."""

    # Why: aiohttp copies the request's version into the status line, so a refused HTTP/1.0
    # request got "HTTP/1.0 400" and a version-less one "HTTP/0.9 400" with headers; RFC 9110
    # section 6.2 wants the server's own version. StreamResponse._write_headers is the private
    # status-line step; _payload_writer and _send_headers_immediately are what it reads.

    async def _write_headers(self) -> None:
        writer = self._payload_writer
        if writer is None:
            raise RuntimeError("the response is not prepared")
        await writer.write_headers(f"HTTP/1.1 {self.status} {self.reason}", self.headers)
        if self._send_headers_immediately:
            writer.send_headers()
