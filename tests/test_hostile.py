"""Hostile callers on a raw socket: smuggling, Host, browsers, odd targets, upgrades, headers.

aiohttp's client normalises what it sends (it merges case-variant duplicates, frames bodies its
own way, refuses control characters), so these tests write exact bytes to the proxy listener and
parse what comes back by hand. Each one asserts the answer and what the fake upstream saw.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

from proxy._aiohttp import check_c_parser
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO
from tests.support.rawhttp import assert_no_cors, assert_problem, build, exchange
from tests.support.smuggling import CORPUS

REPO: Final = Path(__file__).resolve().parents[1]


def demo_token(chain: Chain) -> str:
    """Return the one token issued for the demo route's scope set."""
    (token,) = [
        t.value for t in chain.auth.server.issued.values() if t.scopes == {"scope:demo:consult"}
    ]
    return token


# -- A1: only the C parser ------------------------------------------------------------------------


def test_c_parser_is_in_use_here() -> None:
    check_c_parser()


def test_python_parser_is_refused() -> None:
    environ = {**os.environ, "AIOHTTP_NO_EXTENSIONS": "1"}
    result = subprocess.run(  # our own interpreter, fixed arguments
        [sys.executable, "-c", "from proxy._aiohttp import check_c_parser; check_c_parser()"],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0
    assert "ParserError" in result.stderr
    assert "C HTTP parser" in result.stderr


# -- A2/A4: framing -------------------------------------------------------------------------------

# One write each (the long chunk extension streams in test_hardening.py, read as it goes).
SMUGGLING: Final = {name: case.tail for name, case in CORPUS.items() if len(case.tail) < 65536}


@pytest.mark.parametrize("framing", sorted(SMUGGLING))
async def test_ambiguous_framing_is_400_and_never_forwarded(chain: Chain, framing: str) -> None:
    head = f"POST {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n".encode()
    result = await exchange(chain.port, head + SMUGGLING[framing])
    assert result.closed
    assert [s for s in result.statuses if s < 300] == []
    assert result.statuses == [400]
    await asyncio.sleep(0.05)
    assert chain.upstream.count == 0


async def test_te_tab_before_value_is_one_clean_chunked_body(chain: Chain) -> None:
    # RFC 9110 allows a tab as whitespace around a field value, so this is plain chunked: the
    # property is that it is never forwarded ambiguously -- the same bytes, framed afresh.
    body = b"5\r\nhello\r\n0\r\n\r\n"
    head = f"POST {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\nConnection: close\r\n"
    result = await exchange(
        chain.port, head.encode() + b"Transfer-Encoding:\tchunked\r\n\r\n" + body
    )
    assert result.statuses == [200]
    seen = chain.upstream.seen[-1]
    assert seen.body_bytes == 5
    assert seen.body_complete
    assert (
        len(seen.header_values("Transfer-Encoding")) + len(seen.header_values("Content-Length"))
        == 1
    )


async def test_bad_request_then_pipelined_good_one_gets_one_400(chain: Chain) -> None:
    bad = (
        f"POST {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n"
        "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ).encode()
    good = build("GET", DEMO + "/smuggled", chain.port, close=False)
    result = await exchange(chain.port, bad + good)
    assert result.statuses == [400]
    assert result.closed
    await asyncio.sleep(0.05)
    assert chain.upstream.count == 0


async def test_good_requests_pipelined_are_answered_in_order(chain: Chain) -> None:
    first = build("GET", DEMO + "/one", chain.port, close=False)
    second = build("GET", DEMO + "/two", chain.port)
    result = await exchange(chain.port, first + second)
    assert result.statuses == [200, 200]
    assert [seen.target for seen in chain.upstream.seen] == [DEMO + "/one", DEMO + "/two"]


async def test_parser_rejection_is_a_fixed_problem_answer(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    head = f"GET {DEMO}/x HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n".encode()
    result = await exchange(chain.port, head + b"Authorization: Bearer canary\x00x\r\n\r\n")
    assert result.only.status == 400
    assert "canary" not in caplog.text
    assert b"canary" not in result.only.body
    assert_problem(result.only, 400)


# -- B6: Host -------------------------------------------------------------------------------------


async def test_foreign_host_is_421(chain: Chain) -> None:
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, host="evil.example"))
    assert_problem(result.only, 421, "host_not_allowed")
    assert chain.upstream.count == 0


async def test_our_name_on_another_port_is_421(chain: Chain) -> None:
    other = chain.port + 1 if chain.port < 65535 else chain.port - 1
    data = build("GET", DEMO + "/x", chain.port, host=f"127.0.0.1:{other}")
    assert_problem((await exchange(chain.port, data)).only, 421, "host_not_allowed")
    assert chain.upstream.count == 0


async def test_http10_without_host_is_400(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, version="HTTP/1.0", host=None)
    assert_problem((await exchange(chain.port, data)).only, 400, "missing_host")
    assert chain.upstream.count == 0


async def test_two_host_headers_are_400(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, [("Host", f"localhost:{chain.port}")])
    result = await exchange(chain.port, data)
    # aiohttp's parser refuses the second Host itself; its answer is our fixed problem too.
    assert_problem(result.only, 400)
    assert result.only.problem()["reason"] in ("bad_host", "bad_request")
    assert chain.upstream.count == 0


async def test_localhost_with_our_port_is_served(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, host=f"localhost:{chain.port}")
    result = await exchange(chain.port, data)
    assert result.only.status == 200
    assert chain.upstream.count == 1


# -- B7: browsers, CORS ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header", [("Origin", "http://evil.example"), ("Sec-Fetch-Site", "cross-site")]
)
async def test_browser_requests_are_403(chain: Chain, header: tuple[str, str]) -> None:
    data = build("GET", DEMO + "/x", chain.port, [header])
    assert_problem((await exchange(chain.port, data)).only, 403, "browser_request")
    assert chain.upstream.count == 0


async def test_preflight_without_origin_gets_no_cors_headers(chain: Chain) -> None:
    headers = [
        ("Access-Control-Request-Method", "DELETE"),
        ("Access-Control-Request-Headers", "authorization"),
    ]
    result = await exchange(chain.port, build("OPTIONS", DEMO + "/x", chain.port, headers))
    assert result.only.status == 200
    assert_no_cors(result.only)
    assert chain.upstream.seen[-1].method == "OPTIONS"
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, headers))
    assert result.only.status == 200
    assert_no_cors(result.only)


# -- B8/B9: targets, methods, upgrades ------------------------------------------------------------


async def test_absolute_form_is_400_and_never_forwarded(chain: Chain) -> None:
    data = build("GET", f"http://evil.example{DEMO}/x", chain.port)
    assert_problem((await exchange(chain.port, data)).only, 400, "bad_target")
    data = build("GET", f"http://127.0.0.1:{chain.port}{DEMO}/x", chain.port)
    assert_problem((await exchange(chain.port, data)).only, 400, "bad_target")
    assert chain.upstream.count == 0


@pytest.mark.parametrize(
    ("method", "target"),
    [
        ("CONNECT", "evil.example:443"),
        ("TRACE", DEMO + "/x"),
        ("OPTIONS", "*"),
        ("PROPFIND", DEMO + "/x"),
    ],
)
async def test_refused_methods_are_405_with_allow(chain: Chain, method: str, target: str) -> None:
    result = await exchange(chain.port, build(method, target, chain.port))
    assert_problem(result.only, 405, "method_not_allowed")
    assert "GET" in result.only.headers["Allow"]
    assert "TRACE" not in result.only.headers["Allow"]
    assert chain.upstream.count == 0


@pytest.mark.parametrize("target", [DEMO, "evil.example:443"])
@pytest.mark.parametrize("framing", ["content-length", "none"])
async def test_connect_carrying_a_request_is_refused_and_closes(
    chain: Chain, target: str, framing: str
) -> None:
    # Found by the fuzz: llhttp treats what follows CONNECT's head as tunnel bytes, whatever its
    # Content-Length says. Kept open after the 405, the connection parsed that "body" as a
    # request of its own and forwarded it. Every refused CONNECT now closes its connection.
    inner = build("GET", DEMO + "/smuggled", chain.port, close=False)
    headers = [("Content-Length", str(len(inner)))] if framing == "content-length" else []
    head = build("CONNECT", target, chain.port, headers, close=False)
    result = await exchange(chain.port, head + inner)
    assert [r.status for r in result.responses][:1] in ([405], [400])
    assert len(result.responses) == 1, result.statuses
    assert result.closed
    await asyncio.sleep(0.05)
    assert chain.upstream.count == 0


async def test_unknown_method_is_refused(chain: Chain) -> None:
    # llhttp knows only registered methods; FOO never reaches the handler and gets its 400.
    result = await exchange(chain.port, build("FOO", DEMO + "/x", chain.port))
    assert result.only.status in (400, 405)
    if result.only.status == 405:
        assert_problem(result.only, 405, "method_not_allowed")
    assert chain.upstream.count == 0


@pytest.mark.parametrize(
    "headers",
    [
        [
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("Sec-WebSocket-Version", "13"),
        ],
        [("Connection", "Upgrade, HTTP2-Settings"), ("Upgrade", "h2c"), ("HTTP2-Settings", "")],
        [("Upgrade", "h2c")],
    ],
    ids=["websocket", "h2c", "upgrade_without_connection"],
)
async def test_upgrades_are_refused(chain: Chain, headers: list[tuple[str, str]]) -> None:
    data = build("GET", DEMO + "/x", chain.port, headers, close=False)
    # Bytes after an accepted upgrade would belong to the new protocol: none may be forwarded.
    data += build("GET", DEMO + "/after-upgrade", chain.port)
    result = await exchange(chain.port, data)
    assert result.statuses == [400]
    assert_problem(result.responses[0], 400, "upgrade_refused")
    assert result.closed
    assert chain.upstream.count == 0


# -- B5: shared secret ----------------------------------------------------------------------------


async def test_shared_secret_is_required_and_never_forwarded(
    make_chain: ChainFactory, tmp_path: Path
) -> None:
    secret = "s3cret-proxy-key-canary"
    path = tmp_path / "proxy.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(secret + "\n")
    chain = await make_chain(listen={"shared_secret_file": str(path)})
    missing = await exchange(chain.port, build("GET", DEMO + "/x", chain.port))
    assert_problem(missing.only, 403, "proxy_key")
    wrong = build("GET", DEMO + "/x", chain.port, [("X-KSZ-Proxy-Key", secret + "x")])
    assert_problem((await exchange(chain.port, wrong)).only, 403, "proxy_key")
    twice = build(
        "GET",
        DEMO + "/x",
        chain.port,
        [("X-KSZ-Proxy-Key", secret), ("x-ksz-proxy-key", secret)],
    )
    assert_problem((await exchange(chain.port, twice)).only, 403, "proxy_key")
    assert chain.upstream.count == 0
    right = build("GET", DEMO + "/x", chain.port, [("x-ksz-proxy-key", secret)])
    result = await exchange(chain.port, right)
    assert result.only.status == 200
    assert secret.encode() not in result.only.body
    seen = chain.upstream.seen[-1]
    assert seen.header_values("X-KSZ-Proxy-Key") == []
    assert all(secret not in value for _, value in seen.headers)


# -- C10/C11: credentials -------------------------------------------------------------------------


async def test_caller_credentials_in_any_case_are_replaced_by_one_bearer(chain: Chain) -> None:
    headers = [
        ("Authorization", "Bearer caller-token"),
        ("AUTHORIZATION", "Basic Zm9vOmJhcg=="),
        ("authorization", "Bearer another"),
        ("Proxy-Authorization", "Basic eDp5"),
        ("proxy-authorization", "Bearer z"),
        ("Connection", "Authorization, keep-alive"),
    ]
    data = build("GET", DEMO + "/x", chain.port, headers, close=False)
    result = await exchange(chain.port, data, count=1)
    assert result.only.status == 200
    assert b"caller-token" not in result.only.body
    seen = chain.upstream.seen[-1]
    assert seen.header_values("Authorization") == [f"Bearer {demo_token(chain)}"]
    assert seen.header_values("Proxy-Authorization") == []
    assert seen.header_values("Connection") == []


async def test_connection_naming_authorization_cannot_drop_the_token(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, [("Connection", "close, Authorization")])
    result = await exchange(chain.port, data)
    assert result.only.status == 200
    assert chain.upstream.seen[-1].header_values("Authorization") == [f"Bearer {demo_token(chain)}"]


# -- C13: header limits ---------------------------------------------------------------------------


async def test_oversized_header_line_is_4xx(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, [("X-Big", "a" * 9000)])
    result = await exchange(chain.port, data)
    assert result.only.status in (400, 431)
    assert chain.upstream.count == 0


async def test_too_many_headers_is_4xx(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, [(f"X-H{i}", "v") for i in range(150)])
    result = await exchange(chain.port, data)
    assert result.only.status in (400, 431)
    assert chain.upstream.count == 0


async def test_oversized_request_line_is_4xx(chain: Chain) -> None:
    data = build("GET", DEMO + "/x?" + "a" * 9000, chain.port)
    result = await exchange(chain.port, data)
    assert result.only.status in (400, 414)
    assert chain.upstream.count == 0


async def test_many_headers_under_the_limit_are_served(chain: Chain) -> None:
    data = build("GET", DEMO + "/x", chain.port, [(f"X-H{i}", "v" * 100) for i in range(90)])
    result = await exchange(chain.port, data)
    assert result.only.status == 200
    assert len(chain.upstream.seen[-1].header_values("X-H89")) == 1
