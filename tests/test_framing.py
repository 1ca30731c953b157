"""The issue-13 rules as plain functions: framing, header bytes, token reflection, the two caps."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.admission import Admission
from proxy.errors import NotReady, RequestRejected
from proxy.framing import (
    MAX_CHUNK_FRAMING_BYTES,
    ChunkFramingGuard,
    check_transfer_encoding,
    closes_connection,
    head_bytes,
)
from proxy.headers import remove_token, upstream_request_headers
from proxy.inbound import check_header_bytes


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


# -- Transfer-Encoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["chunked", "Chunked", "CHUNKED", " chunked\t"])
def test_exactly_chunked_is_accepted_on_http11(value: str) -> None:
    check_transfer_encoding(headers(("Transfer-Encoding", value)), (1, 1))
    assert closes_connection(headers(("Transfer-Encoding", value)))


@pytest.mark.parametrize(
    ("values", "version"),
    [
        (["identity, chunked"], (1, 1)),
        (["gzip, chunked"], (1, 1)),
        (["chunked, chunked"], (1, 1)),
        (["chunked", "chunked"], (1, 1)),
        (["identity"], (1, 1)),
        (["chunked"], (1, 0)),
    ],
)
def test_other_transfer_codings_are_refused(values: list[str], version: tuple[int, int]) -> None:
    with pytest.raises(RequestRejected) as caught:
        check_transfer_encoding(headers(*(("Transfer-Encoding", v) for v in values)), version)
    assert (caught.value.status, caught.value.reason) == (400, "bad_framing")


def test_no_transfer_encoding_keeps_the_connection() -> None:
    check_transfer_encoding(headers(("Content-Length", "5")), (1, 0))
    assert not closes_connection(headers(("Content-Length", "5")))


# -- header bytes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        [(b"X_Forwarded_For", b"1")],
        [(b"proxy_authorization", b"x")],
        [(b"X-A", b"caf\xe9")],
        [(b"X-A", b"\xff")],
        [(b"X-A", b"ok"), (b"_", b"ok")],
    ],
)
def test_underscores_and_undecodable_values_are_refused(raw: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(RequestRejected) as caught:
        check_header_bytes(raw)
    assert (caught.value.status, caught.value.reason) == (400, "bad_header")


def test_ascii_and_utf8_values_pass() -> None:
    check_header_bytes([(b"X-Name", b"caf\xc3\xa9"), (b"X-A", b"plain"), (b"X-B", b"")])


# -- upstream request headers ---------------------------------------------------------------------


def test_every_x_forwarded_and_the_rewrite_headers_are_dropped() -> None:
    inbound = CIMultiDict(
        [
            ("X-Forwarded-Anything", "1"),
            ("x-forwarded-client-cert", "1"),
            ("X-Original-URL", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("True-Client-IP", "1"),
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Forwardedness", "kept: not the prefix"),
            ("Accept", "application/json"),
        ]
    )
    out = upstream_request_headers(
        inbound, authorization="Bearer t", trace_id="trace", content_length=None
    )
    assert sorted(out) == ["Accept", "Authorization", "BelGov-Trace-Id", "X-Forwardedness"]


# -- token reflection -----------------------------------------------------------------------------


def test_headers_carrying_the_token_are_removed_and_counted() -> None:
    answer = CIMultiDict(
        [
            ("X-Debug", "Bearer tok123"),
            ("Set-Cookie", "a=1"),
            ("X-Note", "saw tok123 here"),
            ("Set-Cookie", "b=2"),
        ]
    )
    assert remove_token(answer, "tok123") == 2
    assert list(answer.items()) == [("Set-Cookie", "a=1"), ("Set-Cookie", "b=2")]
    assert remove_token(answer, "") == 0


# -- the chunk framing guard ----------------------------------------------------------------------


@dataclass
class FakePayload:
    total_bytes: int = 0
    eof: bool = False
    error: BaseException | None = field(default=None)

    def is_eof(self) -> bool:
        return self.eof

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc


@dataclass(frozen=True)
class FakeHead:
    method: str = "POST"
    path: str = "/x"
    raw_headers: tuple[tuple[bytes, bytes], ...] = ((b"Host", b"h"),)
    chunked: bool = True


def test_head_bytes_is_the_usual_wire_size() -> None:
    wire = b"POST /x HTTP/1.1\r\nHost: h\r\n\r\n"
    assert head_bytes(FakeHead()) == len(wire)


def test_framing_runs_over_the_limit_fail_the_body() -> None:
    guard = ChunkFramingGuard()
    head = FakeHead()
    body = FakePayload()
    assert guard.received(head_bytes(head) + 10, [(head, body)])
    # Reads of extension bytes only, no data: the run grows until it is over the limit.
    assert guard.received(MAX_CHUNK_FRAMING_BYTES // 2, [])
    assert not guard.received(MAX_CHUNK_FRAMING_BYTES, [])
    assert isinstance(body.error, RequestRejected)
    assert body.error.reason == "bad_chunk"


def test_data_between_short_framing_keeps_a_body_going() -> None:
    guard = ChunkFramingGuard()
    body = FakePayload()
    assert guard.received(head_bytes(FakeHead()), [(FakeHead(), body)])
    for _ in range(1000):
        body.total_bytes += 1  # one-byte chunks: "1\r\nx\r\n" is 6 bytes for 1 of data
        assert guard.received(6, [])
    assert body.error is None


def test_a_whole_request_in_one_read_is_counted() -> None:
    guard = ChunkFramingGuard()
    head = FakeHead()
    body = FakePayload(total_bytes=5, eof=True)
    assert not guard.received(head_bytes(head) + 5 + 70_000, [(head, body)])
    assert body.error is not None


def test_requests_without_chunked_bodies_are_not_counted() -> None:
    guard = ChunkFramingGuard()
    head = FakeHead(chunked=False)
    assert guard.received(1 << 20, [(head, FakePayload(total_bytes=10))])
    assert guard.received(1 << 20, [])


# -- admission ------------------------------------------------------------------------------------


def test_receiving_and_in_flight_have_their_own_caps() -> None:
    admission = Admission(max_receiving=1, max_in_flight=1)
    with admission.receiving_body():
        with admission.forwarding():
            assert (admission.receiving, admission.in_flight) == (1, 1)
            for phase in (admission.receiving_body, admission.forwarding):
                with pytest.raises(NotReady) as caught, phase():
                    pass
                assert (caught.value.status, caught.value.code) == (503, "overloaded")
    assert (admission.receiving, admission.in_flight) == (0, 0)
