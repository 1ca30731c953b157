"""End to end: client -> ksz-proxy -> fake KSZ API, tokens from the fake authorization server.

Every assertion is about what the fakes saw or what the caller got back.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.sandbox.authserver import Fault
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO, OTHER
from tests.support.fakes import UpstreamHandle
from tests.support.metrics import samples


def problem_of(body: bytes) -> dict[str, Any]:
    return dict(json.loads(body))


async def issued_tokens(chain: Chain, scope: str = "scope:demo:consult") -> list[str]:
    """Return the tokens issued for one scope, oldest first."""
    return [t.value for t in chain.auth.server.issued.values() if t.scopes == {scope}]


async def test_get_is_forwarded_with_exactly_one_bearer(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/persons/123?x=1") as response:
        body = await response.json()
        assert response.status == 200
    seen = chain.upstream.seen[-1]
    assert seen.method == "GET"
    assert seen.target == DEMO + "/persons/123?x=1"
    tokens = await issued_tokens(chain)
    assert seen.header_values("Authorization") == [f"Bearer {tokens[0]}"]
    assert body["target"] == DEMO + "/persons/123?x=1"
    host = chain.config.upstream.url.removeprefix("https://")
    assert seen.header_values("Host") == [host]
    assert seen.trace_id and len(seen.trace_id) == 36


async def test_caller_credentials_and_forwarding_claims_are_replaced(chain: Chain) -> None:
    headers = [
        ("Authorization", "Bearer caller-token"),
        ("authorization", "Basic Zm9vOmJhcg=="),
        ("Proxy-Authorization", "Basic eDp5"),
        ("Connection", "Authorization, X-Drop-Me"),
        ("X-Drop-Me", "1"),
        ("X-Forwarded-For", "10.9.9.9"),
        ("X-Forwarded-Host", "evil.example"),
        ("Forwarded", "for=10.9.9.9"),
        ("X-Real-IP", "10.9.9.9"),
        ("X-Keep-Me", "a"),
        ("X-Keep-Me", "b"),
    ]
    async with chain.request("GET", DEMO + "/x", headers=headers) as response:
        assert response.status == 200
    seen = chain.upstream.seen[-1]
    tokens = await issued_tokens(chain)
    assert seen.header_values("Authorization") == [f"Bearer {tokens[0]}"]
    for name in (
        "Proxy-Authorization",
        "X-Drop-Me",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "Forwarded",
        "X-Real-IP",
        "Connection",
    ):
        assert seen.header_values(name) == [], name
    assert seen.header_values("X-Keep-Me") == ["a", "b"]


async def test_caller_trace_id_is_passed_on_and_answered(chain: Chain) -> None:
    async with chain.request(
        "GET", DEMO + "/x", headers={"BelGov-Trace-Id": "caller-trace-1"}
    ) as response:
        assert response.status == 200
    assert chain.upstream.seen[-1].trace_id == "caller-trace-1"
    async with chain.request("GET", "/nowhere", headers={"BelGov-Trace-Id": "t-2"}) as response:
        assert response.status == 404
        assert response.headers["BelGov-Trace-Id"] == "t-2"


async def test_unrouted_path_is_404_problem_and_never_forwarded(chain: Chain) -> None:
    for path in ("/nowhere", "/REST/demo/v10/x", "/REST/demo", "/"):
        async with chain.request("GET", path) as response:
            assert response.status == 404, path
            assert response.content_type == "application/problem+json"
            problem = problem_of(await response.read())
            assert problem["type"] == "urn:problem-type:belgif:resourceNotFound"
            assert problem["reason"] == "no_route"
            assert problem["status"] == 404
    assert chain.upstream.count == 0


@pytest.mark.parametrize(
    "path",
    [
        DEMO + "/../admin",
        DEMO + "/%2e%2e/admin",
        DEMO + "/.%2E/admin",
        DEMO + "/a%2fb",
        DEMO + "/a%5cb",
        DEMO + "/a%00",
        DEMO + "//x",
        DEMO + "/..;/admin",
        DEMO + "/./x",
    ],
)
async def test_traversal_never_reaches_the_upstream(chain: Chain, path: str) -> None:
    async with chain.request("GET", path) as response:
        assert response.status == 400
        assert problem_of(await response.read())["reason"] == "bad_path"
    assert chain.upstream.count == 0


async def test_query_string_arrives_byte_identical(chain: Chain) -> None:
    query = "?a=%2F&b=%zz&c=a+b&d&e=%E2%82%AC&f=x=y&&g=%20"
    async with chain.request("GET", DEMO + "/q" + query) as response:
        assert response.status == 200
    assert chain.upstream.seen[-1].target == DEMO + "/q" + query


async def test_small_post_keeps_length_framing_and_bytes(chain: Chain) -> None:
    body = b"x" * 5000
    async with chain.request(
        "POST", DEMO + "/p", data=body, headers={"Content-Type": "application/json"}
    ) as response:
        assert response.status == 200
    seen = chain.upstream.seen[-1]
    assert seen.body_sha256 == hashlib.sha256(body).hexdigest()
    assert seen.header_values("Content-Length") == ["5000"]
    assert seen.header_values("Transfer-Encoding") == []
    assert seen.header_values("Content-Type") == ["application/json"]


async def test_chunked_upload_is_streamed_chunked(make_chain: ChainFactory) -> None:
    chain = await make_chain(upstream={"replay_max_bytes": 1024})
    parts = [bytes([i]) * 10_000 for i in range(20)]

    async def body() -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with chain.request("PUT", DEMO + "/c", data=body()) as response:
        assert response.status == 200
    seen = chain.upstream.seen[-1]
    assert seen.body_sha256 == hashlib.sha256(b"".join(parts)).hexdigest()
    assert seen.header_values("Transfer-Encoding") == ["chunked"]
    assert seen.header_values("Content-Length") == []


async def test_upstream_401_refetches_and_resends_a_small_body_once(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/warm") as response:
        assert response.status == 200
    first = (await issued_tokens(chain))[0]
    chain.upstream.reject_token(first)
    before = chain.upstream.count
    async with chain.request("POST", DEMO + "/p", data=b"payload") as response:
        assert response.status == 200
    assert chain.upstream.count == before + 2
    retried = chain.upstream.seen[-1]
    second = (await issued_tokens(chain))[-1]
    assert second != first
    assert retried.header_values("Authorization") == [f"Bearer {second}"]
    assert retried.body_sha256 == hashlib.sha256(b"payload").hexdigest()
    assert chain.auth.server.token_requests == 3


async def test_upstream_401_is_never_a_loop(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/warm") as response:
        assert response.status == 200
    chain.auth.server.expires_in = 3600
    first = (await issued_tokens(chain))[0]
    chain.upstream.reject_token(first)
    # Every token the server issues from now on is refused once, too.
    original = chain.auth.server.issued.copy()
    before = chain.upstream.count
    task = asyncio.create_task(_reject_new_tokens(chain, set(original)))
    try:
        async with chain.request("GET", DEMO + "/again") as response:
            assert response.status == 401
    finally:
        task.cancel()
    assert chain.upstream.count == before + 2


async def _reject_new_tokens(chain: Chain, known: set[str]) -> None:
    while True:
        for token in list(chain.auth.server.issued):
            if token not in known:
                chain.upstream.reject_token(token, times=10)
                known.add(token)
        await asyncio.sleep(0)


async def test_upstream_401_on_a_streamed_body_goes_back(make_chain: ChainFactory) -> None:
    chain = await make_chain(upstream={"replay_max_bytes": 1024})
    async with chain.request("GET", DEMO + "/warm") as response:
        assert response.status == 200
    first = (await issued_tokens(chain))[0]
    chain.upstream.reject_token(first)
    before = chain.upstream.count
    async with chain.request("POST", DEMO + "/big", data=b"y" * 10_000) as response:
        assert response.status == 401
    assert chain.upstream.count == before + 1
    # The refused token is gone: the next request uses a fresh one.
    async with chain.request("GET", DEMO + "/after") as response:
        assert response.status == 200
    assert chain.upstream.seen[-1].header_values("Authorization") != [f"Bearer {first}"]


async def test_redirects_are_returned_not_followed(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/redirect?to=https://elsewhere.example/x") as response:
        assert response.status == 302
        assert response.headers["Location"] == "https://elsewhere.example/x"
    assert chain.upstream.count == 1


async def test_upstream_errors_pass_through_untouched(chain: Chain) -> None:
    for status in (500, 404, 429, 503):
        async with chain.request("GET", f"{DEMO}/status/{status}") as response:
            assert response.status == status
            body = await response.read()
            assert response.content_type != "application/problem+json" or (
                "ksz-proxy" not in body.decode()
            )
            if status == 429:
                assert response.headers["Retry-After"] == "7"


async def test_bodies_pass_through_compressed(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/gzip", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"
        raw = await r.read()
    assert json.loads(gzip.decompress(raw))
    compressed = gzip.compress(b'{"a": 1}')
    async with chain.request(
        "POST", DEMO + "/up", data=compressed, headers={"Content-Encoding": "gzip"}
    ) as r:
        assert r.status == 200
    seen = chain.upstream.seen[-1]
    assert seen.body_sha256 == hashlib.sha256(compressed).hexdigest()
    assert seen.header_values("Content-Encoding") == ["gzip"]


async def test_response_hop_by_hop_headers_are_removed(chain: Chain) -> None:
    async with chain.request("GET", DEMO + "/headers-out") as response:
        assert response.status == 200
        assert "X-Secret-Hop" not in response.headers
        assert "Keep-Alive" not in response.headers
        assert "Proxy-Authenticate" not in response.headers
        assert len(response.headers.getall("Set-Cookie")) == 2


async def test_download_stream_is_complete(chain: Chain) -> None:
    for query in ("bytes=300000", "bytes=300000&chunked=1"):
        async with chain.request("GET", DEMO + "/stream/?" + query) as response:
            assert response.status == 200
            data = await response.read()
        assert len(data) == 300000


async def test_head_and_no_body_answers(chain: Chain) -> None:
    async with chain.request("HEAD", DEMO + "/stream/?bytes=1000") as response:
        assert response.status == 200
        assert await response.read() == b""


async def test_token_endpoint_down_at_start_gives_503_then_recovers(
    make_chain: ChainFactory, authserver: Any
) -> None:
    authserver.server.inject(Fault(kind="status", status=503), times=3)
    chain = await make_chain(ready=False)
    statuses = []
    for _ in range(200):
        async with chain.request("GET", DEMO + "/x") as response:
            statuses.append(response.status)
            if response.status == 503:
                problem = problem_of(await response.read())
                assert problem["type"] == "urn:problem-type:belgif:serviceUnavailable"
                assert problem["reason"].startswith("token_")
                assert int(response.headers["Retry-After"]) >= 1
            else:
                break
        await asyncio.sleep(0.05)
    assert statuses[-1] == 200


async def test_rejected_client_is_503_token_rejected(
    make_chain: ChainFactory, authserver: Any
) -> None:
    authserver.server.clients.clear()
    chain = await make_chain(ready=False)
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 503
        problem = problem_of(await response.read())
    assert problem["reason"] == "token_rejected"
    assert problem["oauthError"] == "invalid_client"
    assert chain.upstream.count == 0


async def test_upstream_read_timeout_is_504(make_chain: ChainFactory) -> None:
    chain = await make_chain(upstream={"read_timeout_s": 0.3})
    async with chain.request("GET", DEMO + "/stall?seconds=5") as response:
        assert response.status == 504
        problem = problem_of(await response.read())
    assert problem["reason"] == "upstream_timeout"
    assert problem["type"] == "urn:problem-type:ksz-proxy:gatewayTimeout"


async def test_refused_upstream_is_502_connect(make_chain: ChainFactory) -> None:
    chain = await make_chain(routes=[{"prefix": DEMO, "upstream": "https://127.0.0.1:9"}])
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 502
        assert problem_of(await response.read())["reason"] == "upstream_connect"


async def test_untrusted_upstream_is_502_tls(
    make_chain: ChainFactory, fake_upstream: UpstreamHandle
) -> None:
    chain = await make_chain(upstream={"ca_file": None})
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 502
        assert problem_of(await response.read())["reason"] == "upstream_tls"
    assert fake_upstream.upstream.count == 0


async def test_reset_is_502_reset_and_never_resent(chain: Chain) -> None:
    for method in ("GET", "PUT", "POST"):
        before = chain.upstream.count
        async with chain.request(method, DEMO + "/reset", data=b"x") as response:
            assert response.status == 502
            assert problem_of(await response.read())["reason"] == "upstream_reset"
        assert chain.upstream.count == before + 1, method


async def test_each_route_uses_its_own_scope_set(chain: Chain) -> None:
    async with chain.request("GET", OTHER + "/x") as response:
        assert response.status == 200
    other = await issued_tokens(chain, "scope:cbss:api:demo:consult")
    assert chain.upstream.seen[-1].header_values("Authorization") == [f"Bearer {other[0]}"]
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 200
    demo = await issued_tokens(chain)
    assert chain.upstream.seen[-1].header_values("Authorization") == [f"Bearer {demo[0]}"]
    assert sorted(r.form["scope"] for r in chain.auth.server.requests) == [
        "scope:cbss:api:demo:consult",
        "scope:demo:consult",
    ]


async def test_canary_token_never_in_logs_or_answers(
    chain: Chain, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies: list[bytes] = []
    for method, path in (
        ("GET", DEMO + "/x"),
        ("GET", "/nowhere"),
        ("GET", DEMO + "/../x"),
        ("GET", DEMO + "/status/500"),
        ("GET", DEMO + "/reset"),
        ("TRACE", DEMO + "/x"),
    ):
        async with chain.request(method, path) as response:
            bodies.append(await response.read())
            bodies.append(repr(dict(response.headers)).encode())
    tokens = await issued_tokens(chain)
    assertions = [r.form["client_assertion"] for r in chain.auth.server.requests]
    text = caplog.text + " ".join(repr(r.__dict__) for r in caplog.records)
    for secret in (*tokens, *assertions):
        assert secret not in text
        assert all(secret.encode() not in body for body in bodies)


async def test_fault_mid_answer_cuts_the_caller_connection(make_chain: ChainFactory) -> None:
    import aiohttp

    chain = await make_chain(upstream={"read_timeout_s": 0.3})
    with pytest.raises(aiohttp.ClientPayloadError):
        async with chain.request("GET", DEMO + "/stall-body?seconds=5") as response:
            assert response.status == 200
            await response.read()
    # The proxy keeps serving.
    async with chain.request("GET", DEMO + "/x") as response:
        assert response.status == 200
    assert chain.proxy.drain.in_flight == 0


async def test_caller_leaving_mid_answer_is_not_an_upstream_error(chain: Chain) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    head = f"GET {DEMO}/stream/?bytes=200000000 HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    await reader.readexactly(200_000)
    writer.transport.abort()
    async with asyncio.timeout(5):
        await chain.proxy.drain.idle.wait()
    async with chain.session.get(chain.proxy.admin_url + "/metrics") as response:
        metrics = await response.text()
    # Every (route, reason) series exists at 0 (Metrics._zero_series); none has counted.
    errors = [v for (n, _), v in samples(metrics).items() if n == "kszproxy_upstream_errors_total"]
    assert errors and not any(errors)
    assert f'kszproxy_requests_total{{method="GET",route="{DEMO}",status="499"}} 1.0' in metrics
