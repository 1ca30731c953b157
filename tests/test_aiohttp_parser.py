"""The installed aiohttp, pinned where ksz-proxy's security leans on it (issue 13).

- every case of the smuggling corpus (``tests/support/smuggling.py``) goes through the installed
  aiohttp's C request parser, and its verdict must be the one recorded for ``CHECKED_AIOHTTP``:
  an upgrade that changes how any case parses fails here, by name and version;
- the aiohttp bugs ksz-proxy works around are shown as they are, so that their fix upstream
  fails a test and the workaround can be reconsidered (docs/aiohttp-trailer-leak.md).

The private aiohttp names the workarounds use are pinned in ``test_aiohttp_internals.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import http_parser
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_exceptions import BadHttpMessage
from aiohttp.http_parser import HttpRequestParser, HttpResponseParser, RawRequestMessage
from multidict import CIMultiDict

from proxy.handler import MAX_FIELD_BYTES, MAX_HEADERS, MAX_LINE_BYTES
from tests.support.smuggling import CHECKED_AIOHTTP, CORPUS

INSTALLED = aiohttp.__version__


@pytest.fixture
def parser() -> Iterator[HttpRequestParser]:
    """Return aiohttp's request parser with the proxy listener's limits."""
    loop = asyncio.new_event_loop()
    try:
        yield HttpRequestParser(
            BaseProtocol(loop),
            loop,
            2**16,
            max_line_size=MAX_LINE_BYTES,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADERS,
        )
    finally:
        loop.close()


def test_the_c_parser_is_the_one_tested() -> None:
    assert http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


@pytest.mark.parametrize("name", sorted(CORPUS), ids=lambda name: f"aiohttp-{INSTALLED}-{name}")
def test_smuggling_corpus_against_the_installed_aiohttp(
    parser: HttpRequestParser, name: str
) -> None:
    case = CORPUS[name]
    data = b"POST /REST/demo/v1/x HTTP/1.1\r\nHost: 127.0.0.1\r\n" + case.tail
    try:
        messages, _, _ = parser.feed_data(data)
    except BadHttpMessage:
        verdict = "refused"
    else:
        verdict = "accepted"
        assert len(messages) == 1, f"aiohttp {INSTALLED}: {name} parsed as {len(messages)}"
    assert verdict == case.parser, (
        f"aiohttp {INSTALLED} {verdict} {name!r}; aiohttp {CHECKED_AIOHTTP} {case.parser} it: "
        "re-check framing.py and inbound.py, then record the new verdict in "
        "tests/support/smuggling.py"
    )


def test_trailer_leak_of_the_installed_aiohttp(parser: HttpRequestParser) -> None:
    """Show aiohttp's bug itself: the last trailer field becomes a header of the next request.

    ksz-proxy closes the connection after every chunked request (``proxy/framing.py``,
    ``closes_connection``). When this test fails, aiohttp fixed the bug: the workaround may go.
    """
    messages, _, _ = parser.feed_data(
        b"POST /first HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3\r\nabc\r\n0\r\nX-Trailer-Only: leaked\r\n\r\n"
        b"GET /second HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    first, second = (message for message, _ in messages)
    assert isinstance(first, RawRequestMessage)
    assert isinstance(second, RawRequestMessage)
    assert "X-Trailer-Only" not in first.headers
    assert second.headers.get("X-Trailer-Only") == "leaked", (
        f"aiohttp {INSTALLED} no longer carries a trailer into the next request "
        "(docs/aiohttp-trailer-leak.md)"
    )


def test_response_trailer_leak_of_the_installed_aiohttp() -> None:
    """Show the same bug in aiohttp's response parser, which the upstream client uses.

    A chunked upstream answer's last trailer field becomes a header of the next answer on that
    pooled connection. Not worked around: the next answer comes from the same upstream, which
    could send that header itself, so the upstream gains nothing; closing every connection after
    a chunked answer would cost a TLS handshake per answer (docs/aiohttp-trailer-leak.md).
    """
    loop = asyncio.new_event_loop()
    try:
        parser = HttpResponseParser(BaseProtocol(loop), loop, 2**16, max_line_size=MAX_LINE_BYTES)
        messages, _, _ = parser.feed_data(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n"
            b"X-Trailer-Only: leaked\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
        )
    finally:
        loop.close()
    assert messages[1][0].headers.get("X-Trailer-Only") == "leaked", (
        f"aiohttp {INSTALLED} no longer carries a response trailer into the next answer"
    )


def test_header_writer_of_the_installed_aiohttp_drops_undecodable_bytes() -> None:
    """Show why ``inbound.check_header_bytes`` refuses values that are not UTF-8.

    aiohttp reads header bytes as UTF-8 with surrogateescape and its writer skips surrogates:
    ``caf\\xe9`` would go upstream as ``caf``.
    """
    from aiohttp.http_writer import _serialize_headers

    value = b"caf\xe9".decode("utf-8", "surrogateescape")
    head = _serialize_headers("GET / HTTP/1.1", CIMultiDict({"X-Name": value}))
    assert b"X-Name: caf\r\n" in head, f"aiohttp {INSTALLED} now writes {head!r}"
