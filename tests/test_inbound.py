"""The inbound policy as pure functions: method, target, path, route, Host, browser, key."""

from __future__ import annotations

import re
from collections.abc import Callable
from urllib.parse import unquote

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.config import ListenConfig, Route
from proxy.errors import RequestRejected
from proxy.inbound import (
    ALLOWED_METHODS,
    PROXY_KEY_HEADER,
    check_browser,
    check_host,
    check_method,
    check_path,
    check_proxy_key,
    check_upgrade,
    find_route,
    parse_host,
    split_target,
)
from tests.support.paths import interpretations, remove_dot_segments

DEMO = Route(prefix="/REST/demo/v1", scopes=frozenset(), upstream="https://u")
OTHER = Route(prefix="/REST/other", scopes=frozenset(), upstream="https://u")
ROUTES = (DEMO, OTHER)


def assert_rejected(call: Callable[[], object], status: int, reason: str) -> None:
    with pytest.raises(RequestRejected) as info:
        call()
    assert (info.value.status, info.value.reason) == (status, reason)


# -- method --------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(ALLOWED_METHODS))
def test_allowed_methods_pass(method: str) -> None:
    check_method(method)


def test_allowed_methods_are_the_rest_ones() -> None:
    assert {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"} == ALLOWED_METHODS


@pytest.mark.parametrize("method", ["CONNECT", "TRACE", "FOO", "get", "Post", "", "PROPFIND"])
def test_other_methods_are_refused(method: str) -> None:
    assert_rejected(lambda: check_method(method), 405, "method_not_allowed")


# -- request target ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        ("/REST/demo/v1/persons", "/REST/demo/v1/persons", ""),
        ("/", "/", ""),
        ("/a?", "/a", "?"),
        ("/a?x=1", "/a", "?x=1"),
        ("/a?a=%2F&b=%zz&c=a+b&d", "/a", "?a=%2F&b=%zz&c=a+b&d"),
        ("/a?b=?c&d=/../e#f", "/a", "?b=?c&d=/../e#f"),
        ("/a?%00%ff=%E9", "/a", "?%00%ff=%E9"),
    ],
)
def test_origin_form_is_split_and_the_query_kept_byte_exact(
    target: str, path: str, query: str
) -> None:
    assert split_target(target) == (path, query)
    assert path + query == target


@pytest.mark.parametrize(
    "target",
    [
        "http://evil/x",
        "https://evil.example/REST/demo/v1/x",
        "HTTP://evil/x",
        "*",
        "evil.example:443",
        "",
        "REST/demo/v1",
        "?a=1",
    ],
)
def test_other_target_forms_are_refused(target: str) -> None:
    assert_rejected(lambda: split_target(target), 400, "bad_target")


# -- path ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "/REST/demo/v1/persons/85.01.01-123.45",
        "/REST/demo/v1/",
        "/a/b;c=d",
        "/a/%41%20b",
        "/a/..x",
        "/a/x..",
        "/a/.hidden",
        "/a/...",
        "/a/b.c/d",
        "/a/;x",
        "/a/50%25",
        "/a/%3bx",
        "/a/%7E~",
    ],
)
def test_normal_paths_are_accepted(path: str) -> None:
    check_path(path)


@pytest.mark.parametrize(
    "path",
    [
        # dot segments, plain or encoded, with or without path parameters
        "/a/../b",
        "/a/./b",
        "/a/..",
        "/a/.",
        "/..",
        "/a/%2e%2e/b",
        "/a/%2E%2e/b",
        "/a/.%2e/b",
        "/a/%2e/b",
        "/a/..;/b",
        "/a/.;x/b",
        "/a/..;jsessionid=1",
        # encoded slash or backslash, backslash, NUL, empty segment
        "/a/%2fb",
        "/a/%2F",
        "/a/%5cb",
        "/a/%5C",
        "/a\\b",
        "/a/%00",
        "/a//b",
        "//a",
        # control characters, space, DEL, fragment
        "/a/\x01",
        "/a/\x00",
        "/a/b c",
        "/a/\t",
        "/a/\r\n",
        "/a/\x7f",
        "/a#b",
        # malformed percent-encoding
        "/a%",
        "/a%zz",
        "/a%4",
        "/a%%41",
        # double encoding, decoded by lenient servers into the forms above
        "/a/%252e%252e/b",
        "/a/%252E%252e",
        "/a/%25%32%65%25%32%65/b",
        "/a/%252f",
        "/a/%255c",
        "/a/%2500",
        "/a/%25252e%25252e/b",
        # an encoded ';' that a server decoding first turns into '..;'
        "/a/..%3b/b",
        "/a/..%3Bx/b",
        "/a/.%3b/b",
    ],
)
def test_ambiguous_paths_are_refused(path: str) -> None:
    assert_rejected(lambda: check_path(path), 400, "bad_path")


def _reference_refuses(path: str) -> bool:
    """Return whether check_path refuses ``path``, by its rules spelled out without shortcuts."""
    if (
        "#" in path
        or re.search(r"[\x00-\x20\x7f]", path)
        or re.search(r"%(?![0-9A-Fa-f]{2})", path)
    ):
        return True
    for _ in range(4):
        if (
            "\\" in path
            or "//" in path
            or re.search(r"%(2e|2f|5c|00)", path, re.IGNORECASE)
            or any(s.split(";", 1)[0] in (".", "..") for s in path.split("/"))
        ):
            return True
        decoded = unquote(path, encoding="latin-1")
        if decoded == path:
            return False
        path = decoded
    return True


@given(st.text(alphabet="/.;%25ef0a\\", max_size=14))
@example("..")
@example(".")
@example(".;x/a")
@example("../a")
@example("a/..")
@settings(max_examples=500)
def test_check_path_shortcuts_agree_with_the_rules(path: str) -> None:
    try:
        check_path(path)
        refused = False
    except RequestRejected:
        refused = True
    assert refused == _reference_refuses(path)


def test_a_very_deeply_encoded_path_is_refused_not_decoded_forever() -> None:
    path = "/a/%" + "25" * 3000 + "41"
    assert_rejected(lambda: check_path(path), 400, "bad_path")


# -- routes --------------------------------------------------------------------------------------


def test_route_matches_its_exact_prefix_and_below() -> None:
    assert find_route(ROUTES, "/REST/demo/v1") is DEMO
    assert find_route(ROUTES, "/REST/demo/v1/") is DEMO
    assert find_route(ROUTES, "/REST/demo/v1/persons/1") is DEMO
    assert find_route(ROUTES, "/REST/other/x") is OTHER


@pytest.mark.parametrize(
    "path",
    ["/REST/demo/v10", "/REST/demo/v10/x", "/REST/demo/v1x", "/REST/demo", "/", "/rest/demo/v1"],
)
def test_route_needs_a_segment_boundary(path: str) -> None:
    assert_rejected(lambda: find_route(ROUTES, path), 404, "no_route")


def test_longest_prefix_wins() -> None:
    short = Route(prefix="/REST/demo", scopes=frozenset({"a"}), upstream="https://u")
    long = Route(prefix="/REST/demo/v1", scopes=frozenset({"b"}), upstream="https://u")
    # config sorts routes longest prefix first
    routes = tuple(sorted((short, long), key=lambda r: len(r.prefix), reverse=True))
    assert find_route(routes, "/REST/demo/v1/x") is long
    assert find_route(routes, "/REST/demo/v1") is long
    assert find_route(routes, "/REST/demo/v2/x") is short
    assert find_route(routes, "/REST/demo/v10") is short
    assert find_route(routes, "/REST/demo") is short


# -- the path property (SECURITY 17) ----------------------------------------------------------


def test_remove_dot_segments_follows_rfc_3986() -> None:
    assert remove_dot_segments("/a/b/c/./../../g") == "/a/g"
    assert remove_dot_segments("mid/content=5/../6") == "mid/6"
    assert remove_dot_segments("/a/..") == "/"
    assert remove_dot_segments("/../../x") == "/x"
    assert remove_dot_segments("/a/b/.") == "/a/b/"


SEGMENTS = [
    *("..", ".", "%2e", "%2E%2e", "%2f", "%5c", "\\", "%00", "REST", "demo", "v1", "v10", "x"),
    *(";", "..;", "", "%41", "a%20b"),
    # double encoding and an encoded ';'
    *("%252e%252e", "%25%32%65", "..%3b", "%3b", "%25"),
]
segment = st.one_of(st.sampled_from(SEGMENTS), st.text(max_size=6))
joined = st.builds(
    lambda prefix, parts, query: "/".join([prefix, *parts]) + query,
    st.sampled_from(["", "/REST/demo/v1", "/REST/other"]),
    st.lists(segment, max_size=8),
    st.sampled_from(["", "?a=1", "?x=/../y"]),
)


@settings(max_examples=500, deadline=None)
@given(target=st.one_of(joined, st.text(), st.text().map(lambda t: "/REST/demo/v1/" + t)))
@example(target="/REST/demo/v1/%252e%252e/x")
@example(target="/REST/demo/v1/..%3b/x")
@example(target="/REST/demo/v1/%25%32%65%25%32%65/x")
@example(target="/REST/demo/v1/x/..;/..;/y")
def test_accepted_paths_stay_under_their_route(target: str) -> None:
    try:
        raw_path, _query = split_target(target)
        check_path(raw_path)
        route = find_route(ROUTES, raw_path)
    except RequestRejected as exc:
        assert 400 <= exc.status < 500
        return
    for normal in interpretations(raw_path):
        assert normal == route.prefix or normal.startswith(route.prefix + "/"), normal


# -- Host ----------------------------------------------------------------------------------------

LISTEN = ListenConfig()


@pytest.mark.parametrize(
    "host",
    ["localhost:8080", "127.0.0.1:8080", "[::1]:8080", "localhost", "LOCALHOST:8080", "[::1]"],
)
def test_own_host_is_accepted(host: str) -> None:
    check_host(host, LISTEN, 8080)


@pytest.mark.parametrize(
    "host",
    [
        "evil.example",
        "evil.example:8080",
        "localhost:9999",
        "127.0.0.1.nip.io:8080",
        "[::1",
        "localhost:abc",
        "localhost:99999",
        "localhost:",
        "localhost:-1",
        "localhost:+8080",
        "[::1]x",
        "[::1]8080",
        "::1",
        ":8080",
        "localhost.:8080",
        "localhost:8080:8080",
        "127.0.0.2:8080",
        # non-ASCII digits are digits to str.isdigit, not to a port
        "localhost:\u00b2",
        "localhost:\uff18\uff10\uff18\uff10",
    ],
)
def test_other_hosts_are_misdirected(host: str) -> None:
    assert_rejected(lambda: check_host(host, LISTEN, 8080), 421, "host_not_allowed")


@pytest.mark.parametrize("host", [None, ""])
def test_missing_host_is_refused(host: str | None) -> None:
    assert_rejected(lambda: check_host(host, LISTEN, 8080), 400, "missing_host")


CUSTOM = ListenConfig(allowed_hosts=("proxy.internal", "10.0.0.5"))


@pytest.mark.parametrize("host", ["proxy.internal:8443", "Proxy.Internal", "10.0.0.5:8443"])
def test_custom_allowed_hosts_are_accepted(host: str) -> None:
    check_host(host, CUSTOM, 8443)


@pytest.mark.parametrize(
    "host", ["localhost:8443", "127.0.0.1:8443", "proxy.internal:8080", "evil.proxy.internal"]
)
def test_hosts_outside_a_custom_list_are_misdirected(host: str) -> None:
    assert_rejected(lambda: check_host(host, CUSTOM, 8443), 421, "host_not_allowed")


@pytest.mark.parametrize(
    ("host", "parsed"),
    [
        ("localhost:8080", ("localhost", 8080)),
        ("LocalHost", ("localhost", None)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]", ("::1", None)),
        (" 127.0.0.1:1 ", ("127.0.0.1", 1)),
        ("[::1", (None, None)),
        ("[::1]x", (None, None)),
        ("localhost:abc", (None, None)),
        ("localhost:123456", (None, None)),
    ],
)
def test_parse_host(host: str, parsed: tuple[str | None, int | None]) -> None:
    assert parse_host(host) == parsed


# -- browsers, upgrades, shared secret -----------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        [("Origin", "https://evil.example")],
        [("Origin", "null")],
        [("origin", "")],
        [("Sec-Fetch-Site", "cross-site")],
        [("Sec-Fetch-Site", "same-site")],
        [("sec-fetch-site", "same-origin")],
        [("Sec-Fetch-Site", "none"), ("Origin", "http://localhost:8080")],
    ],
)
def test_browser_requests_are_refused(headers: list[tuple[str, str]]) -> None:
    assert_rejected(lambda: check_browser(CIMultiDict(headers)), 403, "browser_request")


@pytest.mark.parametrize(
    "headers",
    [[], [("Sec-Fetch-Site", "none")], [("Sec-Fetch-Site", " None ")], [("User-Agent", "x")]],
)
def test_non_browser_requests_pass(headers: list[tuple[str, str]]) -> None:
    check_browser(CIMultiDict(headers))


@pytest.mark.parametrize(
    "headers",
    [
        [("Upgrade", "websocket"), ("Connection", "Upgrade")],
        [("upgrade", "h2c")],
        [("HTTP2-Settings", "AAMAAABkAAQAAP__")],
        [("http2-settings", "")],
    ],
)
def test_upgrades_are_refused(headers: list[tuple[str, str]]) -> None:
    assert_rejected(lambda: check_upgrade(CIMultiDict(headers)), 400, "upgrade_refused")


def test_plain_requests_are_not_upgrades() -> None:
    check_upgrade(CIMultiDict([("Connection", "keep-alive"), ("Accept", "*/*")]))


KEY = b"s3cret-shared-key"


def test_no_configured_key_lets_everyone_in() -> None:
    check_proxy_key(CIMultiDict(), None)
    check_proxy_key(CIMultiDict([(PROXY_KEY_HEADER, "anything")]), None)


def test_correct_key_passes_in_any_header_case() -> None:
    check_proxy_key(CIMultiDict([(PROXY_KEY_HEADER, KEY.decode())]), KEY)
    check_proxy_key(CIMultiDict([("x-ksz-proxy-key", KEY.decode())]), KEY)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(PROXY_KEY_HEADER, "")],
        [(PROXY_KEY_HEADER, "wrong")],
        [(PROXY_KEY_HEADER, KEY.decode()[:-1])],
        [(PROXY_KEY_HEADER, KEY.decode() + "x")],
        [(PROXY_KEY_HEADER, KEY.decode().upper())],
        [("X-KSZ-Proxy-Keys", KEY.decode())],
        [(PROXY_KEY_HEADER, "s3cret-shared-k\udceby")],
    ],
)
def test_wrong_or_missing_key_is_refused(headers: list[tuple[str, str]]) -> None:
    with pytest.raises(RequestRejected) as info:
        check_proxy_key(CIMultiDict(headers), KEY)
    assert (info.value.status, info.value.reason) == (403, "proxy_key")
    assert KEY.decode() not in str(info.value)
    assert KEY.decode() not in repr(info.value)
