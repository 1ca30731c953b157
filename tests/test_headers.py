"""Header rules: hop-by-hop removal, the injected Authorization, response headers, trace ids."""

from __future__ import annotations

import os
import re
import uuid

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy, istr

from proxy.headers import (
    downstream_response_headers,
    new_trace_id,
    strip_hop_by_hop,
    trace_id_for,
    upstream_request_headers,
)

TOKEN = "Bearer injected.token-value"
TRACE = "11111111-2222-4333-8444-555555555555"

# Written out here rather than imported, so the test states the rule on its own.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authenticate",
    "proxy-authorization",
}
PROXY_SETS = {"authorization", "belgov-trace-id", "content-length"}
NEVER_FORWARDED = {
    "host",
    "expect",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-real-ip",
    "x-ksz-proxy-key",
}


def listed_in_connection(headers: list[tuple[str, str]]) -> set[str]:
    return {
        name.lower()
        for key, value in headers
        if key.lower() == "connection"
        for name in re.split(r"[\s,]+", value)
        if name
    }


# -- strip_hop_by_hop ----------------------------------------------------------------------------


def test_fixed_hop_by_hop_set_is_removed_in_any_case() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "close"),
            ("keep-alive", "timeout=5"),
            ("PROXY-CONNECTION", "keep-alive"),
            ("te", "trailers"),
            ("Trailer", "X-Sum"),
            ("transfer-encoding", "chunked"),
            ("UPGRADE", "websocket"),
            ("proxy-authenticate", "Basic"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Accept", "application/json"),
        ]
    )
    assert list(strip_hop_by_hop(headers).items()) == [("Accept", "application/json")]


def test_names_listed_in_connection_are_removed() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "X-Foo,x-bar"),
            ("connection", "  X-BAZ ,, keep-alive\tX-Qux "),
            ("x-foo", "1"),
            ("X-BAR", "2"),
            ("X-Baz", "3"),
            ("x-qux", "4"),
            ("X-Kept", "5"),
            ("X-Foo", "6"),
        ]
    )
    assert list(strip_hop_by_hop(headers).items()) == [("X-Kept", "5")]


@pytest.mark.parametrize(
    ("value", "kept"),
    [
        ("keep-alive", ["Close", "X-Foo", "X-Kept"]),
        (" Keep-Alive ", ["Close", "X-Foo", "X-Kept"]),
        ("te", ["Close", "X-Foo", "X-Kept"]),
        ("close", ["X-Foo", "X-Kept"]),
        ("Close, X-Foo", ["X-Kept"]),
        ("keep-alive x-foo", ["Close", "X-Kept"]),
    ],
)
def test_a_connection_value_naming_one_header_is_handled_like_a_list(
    value: str, kept: list[str]
) -> None:
    headers = CIMultiDict(
        [
            ("Connection", value),
            ("Keep-Alive", "timeout=5"),
            ("Close", "1"),
            ("X-Foo", "2"),
            ("TE", "trailers"),
            ("X-Kept", "3"),
        ]
    )
    assert list(strip_hop_by_hop(headers)) == kept
    assert list(downstream_response_headers(CIMultiDictProxy(headers))) == kept


def test_extra_names_are_removed_and_the_input_is_left_alone() -> None:
    headers = CIMultiDict([("X-A", "1"), ("x-b", "2"), ("Connection", "close")])
    proxy = CIMultiDictProxy(headers)
    assert list(strip_hop_by_hop(proxy, [istr("X-B")]).items()) == [("X-A", "1")]
    assert len(headers) == 3


# -- upstream_request_headers (SECURITY 10, 11, 12) -------------------------------------------

NAMES = [
    "Authorization",
    "authorization",
    "AUTHORIZATION",
    "Proxy-Authorization",
    "Connection",
    "Host",
    "Content-Length",
    "Transfer-Encoding",
    "X-Forwarded-For",
    "Forwarded",
    "X-Real-IP",
    "X-KSZ-Proxy-Key",
    "BelGov-Trace-Id",
    "Keep-Alive",
    "TE",
    "Upgrade",
    "Accept",
    "X-Foo",
    "Cookie",
    "Expect",
    "X-Forwarded-Host",
]
CONNECTION_VALUES = [
    "Authorization",
    "authorization, BelGov-Trace-Id",
    "BelGov-Trace-Id X-Foo",
    "x-foo",
    "keep-alive",
    "close",
    "AUTHORIZATION ,  accept",
    "Upgrade, TE",
    "Content-Length",
]


def spellings(name: str) -> st.SearchStrategy[str]:
    return st.sampled_from([name, name.lower(), name.upper(), name.swapcase()])


header = (
    st.sampled_from(NAMES)
    .flatmap(spellings)
    .flatmap(
        lambda name: st.tuples(
            st.just(name),
            st.sampled_from(CONNECTION_VALUES)
            if name.lower() == "connection"
            else st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=12),
        )
    )
)


@settings(max_examples=400, deadline=None)
@given(
    inbound=st.lists(header, max_size=14),
    content_length=st.one_of(st.none(), st.integers(min_value=0, max_value=2**40)),
)
@example(
    inbound=[("Connection", "Authorization"), ("Authorization", "Bearer caller")],
    content_length=None,
)
@example(
    inbound=[("x-ksz-proxy-key", "secret"), ("x-forwarded-for", "1.2.3.4"), ("te", "trailers")],
    content_length=None,
)
@example(inbound=[("connection", "X-Foo"), ("X-FOO", "1"), ("x-foo", "2")], content_length=3)
def test_upstream_gets_exactly_one_authorization_and_the_rest_in_order(
    inbound: list[tuple[str, str]], content_length: int | None
) -> None:
    result = upstream_request_headers(
        CIMultiDictProxy(CIMultiDict(inbound)),
        authorization=TOKEN,
        trace_id=TRACE,
        content_length=content_length,
    )

    assert result.getall("Authorization") == [TOKEN]
    assert result.getall("BelGov-Trace-Id") == [TRACE]
    if content_length is None:
        assert "Content-Length" not in result
    else:
        assert result.getall("Content-Length") == [str(content_length)]
    # the proxy's own headers are set after filtering, even when Connection lists them
    never = HOP_BY_HOP | NEVER_FORWARDED | listed_in_connection(inbound)
    assert not {name.lower() for name in result} & (never - PROXY_SETS)
    dropped = never | PROXY_SETS
    kept = [(k, v) for k, v in result.items() if k.lower() not in PROXY_SETS]
    assert kept == [(k, v) for k, v in inbound if k.lower() not in dropped]


def test_connection_listing_authorization_cannot_drop_the_token() -> None:
    inbound = CIMultiDict(
        [
            ("Connection", "Authorization, BelGov-Trace-Id, Content-Length"),
            ("authorization", "Bearer caller-token"),
            ("AUTHORIZATION", "Basic eDp5"),
            ("Proxy-Authorization", "Basic eDp5"),
        ]
    )
    result = upstream_request_headers(
        inbound, authorization=TOKEN, trace_id=TRACE, content_length=12
    )
    assert sorted(result.items()) == sorted(
        [("Authorization", TOKEN), ("BelGov-Trace-Id", TRACE), ("Content-Length", "12")]
    )


def test_forwarding_claims_and_the_shared_secret_are_not_passed() -> None:
    inbound = CIMultiDict(
        [
            ("Host", "localhost:8080"),
            ("x-forwarded-for", "10.0.0.1"),
            ("X-Forwarded-Proto", "http"),
            ("forwarded", "for=10.0.0.1"),
            ("X-REAL-IP", "10.0.0.1"),
            ("x-ksz-proxy-key", "shared-secret"),
            ("Expect", "100-continue"),
            ("Accept", "application/json"),
            ("Cookie", "a=1"),
            ("Cookie", "b=2"),
        ]
    )
    result = upstream_request_headers(
        inbound, authorization=TOKEN, trace_id=TRACE, content_length=None
    )
    assert [(k, v) for k, v in result.items() if k not in ("Authorization", "BelGov-Trace-Id")] == [
        ("Accept", "application/json"),
        ("Cookie", "a=1"),
        ("Cookie", "b=2"),
    ]


# -- downstream_response_headers -----------------------------------------------------------------


def test_response_loses_hop_by_hop_and_framing_but_keeps_duplicates() -> None:
    upstream = CIMultiDict(
        [
            ("Content-Type", "application/json"),
            ("Content-Length", "12"),
            ("transfer-encoding", "chunked"),
            ("Connection", "keep-alive, X-Internal"),
            ("Keep-Alive", "timeout=5"),
            ("x-internal", "node-7"),
            ("Set-Cookie", "a=1; Secure"),
            ("Proxy-Authenticate", "Basic"),
            ("set-cookie", "b=2; HttpOnly"),
            ("BelGov-Trace-Id", TRACE),
        ]
    )
    result = downstream_response_headers(CIMultiDictProxy(upstream))
    assert list(result.items()) == [
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1; Secure"),
        ("set-cookie", "b=2; HttpOnly"),
        ("BelGov-Trace-Id", TRACE),
    ]
    assert result.getall("Set-Cookie") == ["a=1; Secure", "b=2; HttpOnly"]


# -- trace_id_for --------------------------------------------------------------------------------


def is_fresh_uuid4(value: str) -> bool:
    parsed = uuid.UUID(value)
    return parsed.version == 4 and str(parsed) == value


@pytest.mark.parametrize(
    "value", [TRACE, str(uuid.uuid4()), "a", "req-1", "abc.DEF:42_x-y", "A" * 36]
)
def test_a_valid_caller_trace_id_is_kept(value: str) -> None:
    assert trace_id_for(CIMultiDict([("BelGov-Trace-Id", value)])) == value
    assert trace_id_for(CIMultiDict([("belgov-trace-id", value)])) == value


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("BelGov-Trace-Id", "")],
        [("BelGov-Trace-Id", "A" * 37)],
        [("BelGov-Trace-Id", TRACE + "0")],
        [("BelGov-Trace-Id", "two words")],
        [("BelGov-Trace-Id", " x")],
        [("BelGov-Trace-Id", "x\r\nX-Evil: 1")],
        [("BelGov-Trace-Id", "x\n")],
        [("BelGov-Trace-Id", "-x")],
        [("BelGov-Trace-Id", "caf\u00e9")],
        [("BelGov-Trace-Id", "a"), ("belgov-trace-id", "b")],
        [("BelGov-Trace-Id", "a"), ("BelGov-Trace-Id", "a")],
    ],
)
def test_an_invalid_trace_id_is_replaced_by_a_fresh_uuid4(headers: list[tuple[str, str]]) -> None:
    value = trace_id_for(CIMultiDict(headers))
    assert is_fresh_uuid4(value)
    assert all(value != v for _, v in headers)


def test_fresh_trace_ids_differ() -> None:
    first = trace_id_for(CIMultiDict())
    second = trace_id_for(CIMultiDict([("BelGov-Trace-Id", "bad value")]))
    assert is_fresh_uuid4(first)
    assert is_fresh_uuid4(second)
    assert first != second


def test_fresh_trace_ids_are_uuid4_and_unique_across_buffer_refills() -> None:
    # The random digits are read 4 KiB at a time: 256 ids per read; go past several refills.
    ids = [new_trace_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i).variant == uuid.RFC_4122 and is_fresh_uuid4(i) for i in ids)


def test_a_forked_worker_never_repeats_the_parents_trace_ids() -> None:
    # listen.workers forks after start-up, when the parent may hold buffered random digits.
    new_trace_id()  # the parent's buffer is filled
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running pytest's exit handlers
        os.write(write_end, new_trace_id().encode())
        os._exit(0)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_end, "rb") as pipe:
        from_child = pipe.read().decode()
    assert status == 0
    assert is_fresh_uuid4(from_child)
    assert from_child != new_trace_id()
