"""The fake KSZ REST API the end-to-end tests forward to: its auth rules, answers and records.

It is served over real TLS and driven with a real aiohttp client, like the proxy will drive it.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import logging
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
import pytest
from yarl import URL

from proxy.sandbox.pki import Issued
from proxy.sandbox.serve import Served, serve
from proxy.sandbox.upstream import FakeUpstream, SeenRequest, stream_chunks, stream_sha256
from tests.support.fakes import AuthServerHandle
from tests.support.partner import CLIENT_ID

API = "/REST/demo/v1"
SCOPE = "scope:demo:consult"
GOOD = "good-token"
# Introspection answers for the tokens these tests use; unknown tokens are inactive.
TOKENS: dict[str, dict[str, Any]] = {
    GOOD: {"active": True, "client_id": "c", "scope": f"other {SCOPE}", "token_type": "Bearer"},
    "narrow-token": {"active": True, "client_id": "c", "scope": "other", "token_type": "Bearer"},
}
BEARER = {"Authorization": f"Bearer {GOOD}"}


def introspect(token: str) -> Mapping[str, Any]:
    return TOKENS.get(token, {"active": False})


@dataclass(slots=True)
class Upstream:
    fake: FakeUpstream
    served: Served
    session: aiohttp.ClientSession

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send ``path`` byte-exact, with the good token unless headers say otherwise."""
        kwargs.setdefault("headers", BEARER)
        kwargs.setdefault("allow_redirects", False)
        return self.session.request(method, URL(self.served.url + path, encoded=True), **kwargs)


Factory = Callable[..., Awaitable[Upstream]]


@pytest.fixture
async def make_upstream(
    server_ssl: ssl.SSLContext, client_ssl: ssl.SSLContext
) -> AsyncIterator[Factory]:
    started: list[Upstream] = []

    async def factory(**kwargs: Any) -> Upstream:
        kwargs.setdefault("introspect", introspect)
        fake = FakeUpstream(**kwargs)
        served = await serve(fake.make_app(), ssl_context=server_ssl)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=client_ssl), auto_decompress=False
        )
        started.append(Upstream(fake=fake, served=served, session=session))
        return started[-1]

    yield factory
    for upstream in started:
        await upstream.session.close()
        await upstream.served.close()


@pytest.fixture
async def upstream(make_upstream: Factory) -> Upstream:
    return await make_upstream()


def server_complaints(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Return aiohttp's warnings and errors: the fake must never trip its own server."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("aiohttp") and r.levelno >= logging.WARNING
    ]


async def problem_of(response: aiohttp.ClientResponse) -> dict[str, Any]:
    assert response.headers["Content-Type"] == "application/problem+json"
    body = json.loads(await response.read())
    assert set(body) == {"type", "title", "status", "detail"}
    assert body["status"] == response.status
    return dict(body)


async def eventually(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail after ``timeout_s``."""
    for _ in range(int(timeout_s / 0.01)):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not met in time")


async def raw_exchange(upstream: Upstream, client_ssl: ssl.SSLContext, head: str) -> bytes:
    """Send one request exactly as written (aiohttp's client merges mixed-case duplicates)."""
    url = URL(upstream.served.url)
    reader, writer = await asyncio.open_connection(
        url.host, url.port, ssl=client_ssl, server_hostname=url.host
    )
    try:
        writer.write(head.replace("\n", "\r\n").encode("latin-1"))
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()
        await writer.wait_closed()


# --------------------------------------------------------------------------------------------
# Authentication


async def test_missing_token_is_401_no_access_token(upstream: Upstream) -> None:
    async with upstream.request("GET", API + "/x", headers={}) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer realm="ksz"'
        problem = await problem_of(response)
    assert problem["type"] == "urn:problem-type:belgif:noAccessToken"
    # Refused requests are recorded too: tests assert what reached the upstream.
    assert upstream.fake.count == 1


@pytest.mark.parametrize(
    "headers",
    [
        [("Authorization", f"Bearer {GOOD}"), ("Authorization", f"Bearer {GOOD}")],
        [("Authorization", f"Bearer {GOOD}"), ("Authorization", "Basic Zm9vOmJhcg==")],
        [("Authorization", "Basic Zm9vOmJhcg==")],
        [("Authorization", f"Bearer  {GOOD} x")],
        [("Authorization", "Bearer")],
    ],
    ids=["two-bearers", "bearer-and-basic", "basic", "not-a-b64token", "no-token"],
)
async def test_malformed_authorization_is_400(
    upstream: Upstream, headers: list[tuple[str, str]]
) -> None:
    async with upstream.request("GET", API + "/x", headers=headers) as response:
        assert response.status == 400
        problem = await problem_of(response)
    assert problem["type"] == "urn:problem-type:belgif:badRequest"
    assert upstream.fake.seen[-1].header_values("authorization") == [v for _, v in headers]


async def test_authorization_in_two_spellings_is_400(
    upstream: Upstream, client_ssl: ssl.SSLContext
) -> None:
    head = (
        f"GET {API}/x HTTP/1.1\nHost: localhost\nAuthorization: Bearer {GOOD}\n"
        f"authorization: Bearer {GOOD}\nConnection: close\n\n"
    )
    answer = await raw_exchange(upstream, client_ssl, head)
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert upstream.fake.seen[-1].header_values("AUTHORIZATION") == [f"Bearer {GOOD}"] * 2


async def test_bearer_scheme_is_case_insensitive(upstream: Upstream) -> None:
    async with upstream.request(
        "GET", API + "/x", headers={"Authorization": f"bearer {GOOD}"}
    ) as r:
        assert r.status == 200


async def test_inactive_token_is_401_invalid_token(upstream: Upstream) -> None:
    headers = {"Authorization": "Bearer unknown-token"}
    async with upstream.request("GET", API + "/x", headers=headers) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
        problem = await problem_of(response)
    assert problem["type"] == "urn:problem-type:belgif:invalidAccessToken"


async def test_rejected_token_is_refused_the_given_number_of_times(upstream: Upstream) -> None:
    upstream.fake.reject_token(GOOD)
    statuses = []
    for _ in range(2):
        async with upstream.request("GET", API + "/x") as response:
            statuses.append(response.status)
    assert statuses == [401, 200]

    upstream.fake.reject_token(GOOD, times=2)
    upstream.fake.reject_token("another-token")
    statuses = []
    for _ in range(3):
        async with upstream.request("GET", API + "/x") as response:
            statuses.append(response.status)
    assert statuses == [401, 401, 200]


async def test_reset_forgets_requests_and_rejections(upstream: Upstream) -> None:
    upstream.fake.reject_token(GOOD)
    async with upstream.request("GET", API + "/x"):
        pass
    upstream.fake.reject_token(GOOD)
    upstream.fake.reset()
    assert upstream.fake.count == 0
    async with upstream.request("GET", API + "/x") as response:
        assert response.status == 200
    assert upstream.fake.count == 1


async def test_required_scope_is_enforced(make_upstream: Factory) -> None:
    upstream = await make_upstream(required_scope=SCOPE)
    async with upstream.request("GET", API + "/x") as response:
        assert response.status == 200
    narrow = {"Authorization": "Bearer narrow-token"}
    async with upstream.request("GET", API + "/x", headers=narrow) as response:
        assert response.status == 403
        assert "insufficient_scope" in response.headers["WWW-Authenticate"]
        problem = await problem_of(response)
    assert problem["type"] == "urn:problem-type:belgif:missingScope"


async def test_without_introspection_any_well_formed_token_passes(make_upstream: Factory) -> None:
    upstream = await make_upstream(introspect=None)
    headers = {"Authorization": "Bearer anything-at-all"}
    async with upstream.request("GET", API + "/x", headers=headers) as response:
        assert response.status == 200


async def fetch_token(
    auth: AuthServerHandle, partner: Issued, client_ssl: ssl.SSLContext, scope: str
) -> str:
    now = int(time.time())
    claims = {
        "iss": CLIENT_ID,
        "sub": CLIENT_ID,
        "aud": auth.token_url,
        "jti": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 300,
    }
    form = {
        "grant_type": "client_credentials",
        "client_assertion_type": "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
        "client_assertion": jwt.encode(claims, partner.private_key, algorithm="RS256"),
        "scope": scope,
    }
    connector = aiohttp.TCPConnector(ssl=client_ssl)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(auth.token_url, data=form) as response,
    ):
        assert response.status == 200
        return str((await response.json())["access_token"])


async def test_tokens_of_the_fake_authorization_server(
    make_upstream: Factory,
    authserver: AuthServerHandle,
    partner: Issued,
    client_ssl: ssl.SSLContext,
) -> None:
    upstream = await make_upstream(introspect=authserver.server.introspect, required_scope=SCOPE)
    token = await fetch_token(authserver, partner, client_ssl, SCOPE)
    other = await fetch_token(authserver, partner, client_ssl, "scope:cbss:api:demo:consult")
    statuses = []
    for bearer in (token, other):
        headers = {"Authorization": f"Bearer {bearer}"}
        async with upstream.request("GET", API + "/health", headers=headers) as response:
            statuses.append(response.status)
    authserver.server.revoke(token)
    async with upstream.request(
        "GET", API + "/health", headers={"Authorization": f"Bearer {token}"}
    ) as response:
        statuses.append(response.status)
    assert statuses == [200, 403, 401]


def test_required_scope_needs_introspection() -> None:
    with pytest.raises(ValueError, match="introspect"):
        FakeUpstream(required_scope=SCOPE)


def test_seen_request_repr_hides_the_token() -> None:
    seen = SeenRequest(
        method="GET",
        target="/x",
        headers=(("Authorization", "Bearer secret-canary"),),
        body_bytes=0,
        body_sha256=hashlib.sha256(b"").hexdigest(),
        trace_id=None,
    )
    assert "secret-canary" not in repr(seen)
    assert seen.header_values("AUTHORIZATION") == ["Bearer secret-canary"]


# --------------------------------------------------------------------------------------------
# What it records and echoes


async def test_echo_shows_the_raw_target_and_headers(upstream: Upstream) -> None:
    target = API + "/a%2Fb/%7Euser;p=1/caf%C3%A9?q=a%20b&q=%2F&plus=1+2&empty=&flag"
    headers = [
        ("Authorization", f"Bearer {GOOD}"),
        ("X-Dup", "1"),
        ("X-Other", "o"),
        ("X-Dup", "2"),
        ("X-Latin", "caf\xe9"),
    ]
    async with upstream.request("GET", target, headers=headers) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        echo = await response.json()
    seen = upstream.fake.seen[-1]
    assert seen.target == echo["target"] == target
    assert seen.method == echo["method"] == "GET"
    assert seen.header_values("x-dup") == ["1", "2"]
    # aiohttp's client sends UTF-8; the record keeps those bytes, one latin-1 char each.
    assert seen.header_values("X-LATIN") == ["caf\xe9".encode().decode("latin-1")]
    sent = [(name, value) for name, value in seen.headers if name.startswith("X-Dup")]
    assert sent == [("X-Dup", "1"), ("X-Dup", "2")]
    # The echo goes back to the caller, through the proxy: it must not carry the token.
    redacted = [(n, "Bearer ***" if n == "Authorization" else v) for n, v in seen.headers]
    assert [tuple(pair) for pair in echo["headers"]] == redacted
    assert GOOD not in json.dumps(echo)
    assert echo["body_bytes"] == seen.body_bytes == 0


async def test_header_names_keep_their_case_and_order(
    upstream: Upstream, client_ssl: ssl.SSLContext
) -> None:
    head = (
        f"GET {API}/x HTTP/1.1\nHost: localhost\nAuthorization: Bearer {GOOD}\n"
        "X-Dup: 1\nx-dup: 2\nX-Other: o\nX-DUP: 3\nConnection: close\n\n"
    )
    answer = await raw_exchange(upstream, client_ssl, head)
    assert answer.startswith(b"HTTP/1.1 200 ")
    seen = upstream.fake.seen[-1]
    assert seen.headers[1:] == (
        ("Authorization", f"Bearer {GOOD}"),
        ("X-Dup", "1"),
        ("x-dup", "2"),
        ("X-Other", "o"),
        ("X-DUP", "3"),
        ("Connection", "close"),
    )
    assert seen.header_values("X-dup") == ["1", "2", "3"]


async def test_upload_is_hashed_while_streaming(upstream: Upstream) -> None:
    chunk = bytes(range(256)) * 4096  # 1 MiB
    digest = hashlib.sha256()
    for _ in range(10):
        digest.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield chunk

    async with upstream.request("PUT", API + "/upload", data=body()) as response:
        echo = await response.json()
    seen = upstream.fake.seen[-1]
    assert seen.body_bytes == echo["body_bytes"] == 10 * len(chunk)
    assert seen.body_sha256 == echo["body_sha256"] == digest.hexdigest()
    assert seen.header_values("Transfer-Encoding") == ["chunked"]
    assert seen.body_complete


async def test_compressed_upload_is_not_inflated(upstream: Upstream) -> None:
    compressed = gzip.compress(b'{"a": 1}' * 100)
    headers = {**BEARER, "Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with upstream.request("POST", API + "/up", data=compressed, headers=headers) as r:
        assert r.status == 200
    seen = upstream.fake.seen[-1]
    assert seen.body_bytes == len(compressed)
    assert seen.body_sha256 == hashlib.sha256(compressed).hexdigest()


async def test_a_body_cut_short_is_recorded_incomplete(
    upstream: Upstream, client_ssl: ssl.SSLContext, caplog: pytest.LogCaptureFixture
) -> None:
    url = URL(upstream.served.url)
    _, writer = await asyncio.open_connection(
        url.host, url.port, ssl=client_ssl, server_hostname=url.host
    )
    head = (
        f"POST {API}/up HTTP/1.1\r\nHost: {url.host}\r\nAuthorization: Bearer {GOOD}\r\n"
        "Content-Length: 1000\r\n\r\n"
    )
    writer.write(head.encode() + b"x" * 10)
    await writer.drain()
    # The request is recorded once its body ends or breaks off: here, when we hang up.
    writer.close()
    await writer.wait_closed()
    await eventually(lambda: upstream.fake.count > 0)
    assert not upstream.fake.seen[-1].body_complete
    seen = upstream.fake.seen[-1]
    assert seen.body_bytes == 10
    assert server_complaints(caplog) == []


async def test_trace_ids(upstream: Upstream) -> None:
    headers = {**BEARER, "BelGov-Trace-Id": "caller-trace-1"}
    ids = []
    for path in ("/x", "/status/500", "/health"):
        async with upstream.request("GET", API + path, headers=headers) as response:
            assert response.headers["BelGov-Related-Trace-Id"] == "caller-trace-1"
            ids.append(response.headers["BelGov-Trace-Id"])
    assert upstream.fake.seen[-1].trace_id == "caller-trace-1"
    async with upstream.request("GET", API + "/x", headers={}) as response:
        assert response.status == 401
        assert "BelGov-Related-Trace-Id" not in response.headers
        ids.append(response.headers["BelGov-Trace-Id"])
    assert upstream.fake.seen[-1].trace_id is None
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(value).version == 4 for value in ids)


# --------------------------------------------------------------------------------------------
# Special paths


async def test_health(upstream: Upstream) -> None:
    async with upstream.request("GET", API + "/health") as response:
        assert response.status == 200
        assert await response.json() == {"status": "UP"}
    async with upstream.request("POST", API + "/health") as response:
        assert response.status == 405


@pytest.mark.parametrize("size", [0, 1, 65536, 65537, 300000])
@pytest.mark.parametrize("chunked", [False, True])
async def test_stream_sends_deterministic_bytes(
    upstream: Upstream, size: int, chunked: bool
) -> None:
    query = f"bytes={size}" + ("&chunked=1" if chunked else "")
    async with upstream.request("GET", API + "/stream/?" + query) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/octet-stream"
        if chunked:
            assert response.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in response.headers
        else:
            assert response.headers["Content-Length"] == str(size)
        data = await response.read()
    assert len(data) == size
    assert hashlib.sha256(data).hexdigest() == stream_sha256(size)
    assert data == b"".join(stream_chunks(size))
    assert data[:20] == b"0123456789abcdef0123"[:size]


async def test_stream_default_head_and_bad_size(upstream: Upstream) -> None:
    async with upstream.request("GET", API + "/stream") as response:
        assert len(await response.read()) == 1024
    async with upstream.request("HEAD", API + "/stream?bytes=1000") as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == "1000"
        assert await response.read() == b""
    async with upstream.request("GET", API + "/stream?bytes=-1") as response:
        assert response.status == 400


async def test_stall_answers_late_and_times_out_a_client(upstream: Upstream) -> None:
    async with upstream.request("GET", API + "/stall?seconds=0.05") as response:
        assert response.status == 200
        assert (await response.json())["target"] == API + "/stall?seconds=0.05"
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    with pytest.raises(asyncio.TimeoutError):
        async with upstream.request("GET", API + "/stall?seconds=30", timeout=timeout):
            pass


async def test_stall_body_times_out_mid_body(upstream: Upstream) -> None:
    timeout = aiohttp.ClientTimeout(sock_read=0.2)
    async with upstream.request("GET", API + "/stall-body?seconds=30", timeout=timeout) as response:
        assert response.status == 200
        assert response.headers["Content-Length"] == str(2 * 65536)
        with pytest.raises(asyncio.TimeoutError):
            await response.read()
    async with upstream.request("GET", API + "/stall-body?seconds=0.05&bytes=100") as response:
        assert await response.read() == b"".join(stream_chunks(100))


async def test_redirect_is_answered_not_followed(upstream: Upstream) -> None:
    to = "https://elsewhere.example/x?y=1"
    async with upstream.request("GET", API + "/redirect?to=" + to.replace("?", "%3F")) as r:
        assert r.status == 302
        assert r.headers["Location"] == to
    async with upstream.request("GET", API + "/redirect") as response:
        assert response.status == 302
        assert response.headers["Location"] == "/elsewhere"
    assert upstream.fake.count == 2


async def test_reset_drops_the_connection_without_an_answer(
    upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    # POST: aiohttp's client retries an idempotent request once after a reset.
    with pytest.raises(aiohttp.ClientConnectionError):
        async with upstream.request("POST", API + "/reset", data=b"abc"):
            pass
    assert upstream.fake.count == 1
    assert upstream.fake.seen[-1].body_bytes == 3
    async with upstream.request("GET", API + "/x") as response:
        assert response.status == 200
    assert server_complaints(caplog) == []


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (500, "internalServerError"),
        (404, "resourceNotFound"),
        (429, "tooManyRequests"),
        (503, "serviceUnavailable"),
        (418, None),
    ],
)
async def test_status_answers_with_a_problem(
    upstream: Upstream, status: int, kind: str | None
) -> None:
    async with upstream.request("GET", f"{API}/status/{status}") as response:
        assert response.status == status
        problem = await problem_of(response)
        retry_after = response.headers.get("Retry-After")
    assert problem["type"] == (f"urn:problem-type:belgif:{kind}" if kind else "about:blank")
    assert retry_after == ("7" if status in (429, 503) else None)


async def test_status_without_body(upstream: Upstream) -> None:
    async with upstream.request("GET", f"{API}/status/204") as response:
        assert response.status == 204
        assert await response.read() == b""


async def test_gzip_answer_stays_compressed(upstream: Upstream) -> None:
    headers = {**BEARER, "Accept-Encoding": "gzip"}
    async with upstream.request("GET", API + "/gzip", headers=headers) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        raw = await response.read()
    assert raw[:2] == b"\x1f\x8b"
    assert json.loads(gzip.decompress(raw)) == {"compressed": True, "status": "UP"}


async def test_headers_out_carries_hop_by_hop_headers(upstream: Upstream) -> None:
    async with upstream.request("GET", API + "/headers-out") as response:
        assert response.status == 200
        headers = response.headers
        assert headers["Connection"] == "X-Secret-Hop"
        assert headers["X-Secret-Hop"] == "1"
        assert headers["Keep-Alive"] == "timeout=5"
        assert headers["Proxy-Authenticate"] == 'Basic realm="fake"'
        assert headers.getall("Set-Cookie") == [
            "a=1; Path=/; Secure; HttpOnly",
            "b=2; Path=/; Secure; HttpOnly",
        ]
        assert headers["X-End-To-End"] == "kept"
    # The connection stays usable: Connection named a header, not "close".
    async with upstream.request("GET", API + "/x") as response:
        assert response.status == 200


async def test_only_the_last_segment_picks_a_behaviour(upstream: Upstream) -> None:
    for path in ("/reset/x", "/stream/more", "/status/abc", "/health/x", "/x/status"):
        async with upstream.request("GET", API + path) as response:
            assert response.status == 200
            assert (await response.json())["target"] == API + path
