"""The token provider against the fake authorization server over real TLS."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.credentials import Credentials, load_credentials
from proxy.errors import TokenUnavailable
from proxy.oauth import make_session, parse_retry_after, parse_token_response
from proxy.sandbox.authserver import FakeAuthServer, Fault
from proxy.sandbox.serve import serve
from proxy.tokens import (
    Token,
    TokenProvider,
    backoff_delay,
)
from tests.support.clock import FakeClock
from tests.support.config import make_config
from tests.support.fakes import AuthServerHandle
from tests.support.partner import CLIENT_ID, PartnerFiles

SCOPES = frozenset({"scope:demo:consult"})


ProviderFactory = Callable[..., Awaitable[TokenProvider]]


@pytest.fixture
async def make_provider(
    authserver: AuthServerHandle, partner_files: PartnerFiles, ca_file: Path
) -> AsyncIterator[ProviderFactory]:
    made: list[tuple[TokenProvider, aiohttp.ClientSession]] = []

    async def factory(
        *,
        token_url: str | None = None,
        trust: bool = True,
        clock: FakeClock | None = None,
        wall: Callable[[], float] | None = None,
        **oauth: Any,
    ) -> TokenProvider:
        config = make_config(
            token_url
            if token_url is not None or "discovery_url" in oauth
            else authserver.token_url,
            partner_files,
            ca_file if trust else None,
            **{"retry_initial_s": 0.05, "retry_max_s": 0.2, **oauth},
        )
        session = make_session(config)
        kwargs: dict[str, Any] = {"rng": lambda: 1.0}
        if clock is not None:
            kwargs["clock"] = clock
        if wall is not None:
            kwargs["wall_clock"] = wall
        provider = TokenProvider(config, load_credentials(config.client), session, **kwargs)
        made.append((provider, session))
        return provider

    yield factory
    for provider, session in made:
        await provider.close()
        await session.close()


# -- pure helpers ------------------------------------------------------------------------------


def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    assert backoff_delay(1, initial_s=1, max_s=60, rng=lambda: 1.0) == 1
    assert backoff_delay(4, initial_s=1, max_s=60, rng=lambda: 1.0) == 8
    assert backoff_delay(30, initial_s=1, max_s=60, rng=lambda: 1.0) == 60
    assert backoff_delay(3, initial_s=1, max_s=60, rng=lambda: 0.5) == 2
    assert backoff_delay(3, initial_s=1, max_s=60, rng=lambda: 0.0) == 0


def test_retry_after_parsing() -> None:
    assert parse_retry_after("120", now_wall=0) == 120
    assert parse_retry_after(None, now_wall=0) is None
    assert parse_retry_after("soon", now_wall=0) is None
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now_wall=40.0) == 60
    assert parse_retry_after("999999", now_wall=0) == 3600


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b"<html>oops</html>", "not JSON"),
        (b"[1]", "not a JSON object"),
        (b'{"token_type": "Bearer", "expires_in": 60}', "no access_token"),
        (b'{"access_token": "a b", "token_type": "Bearer"}', "RFC 6750"),
        (b'{"access_token": "ab\\r\\nX-Evil: 1", "token_type": "Bearer"}', "RFC 6750"),
        (b'{"access_token": "abc", "token_type": "mac"}', "not a Bearer"),
        (b'{"access_token": "abc"}', "not a Bearer"),
        (b'{"access_token": "abc", "token_type": "Bearer", "expires_in": "x"}', "expires_in"),
        (b'{"access_token": "abc", "token_type": "Bearer", "expires_in": -5}', "expires_in"),
        (b'{"access_token": "abc", "token_type": "Bearer", "expires_in": 0}', "expires_in"),
        (b'{"access_token": "abc", "token_type": "Bearer", "expires_in": 1.5}', "expires_in"),
        (b'{"access_token": "abc", "token_type": "Bearer", "expires_in": true}', "expires_in"),
    ],
)
def test_invalid_token_answers_are_refused(body: bytes, detail: str) -> None:
    with pytest.raises(TokenUnavailable) as info:
        parse_token_response(body, default_expires_in_s=300)
    assert info.value.reason == "invalid_response"
    assert detail in info.value.detail


def test_valid_token_answers() -> None:
    assert parse_token_response(
        b'{"access_token": "a.b-c_d~e+f/g==", "token_type": "bearer", "expires_in": "60"}',
        default_expires_in_s=300,
    ) == ("a.b-c_d~e+f/g==", 60, None, False)
    assert parse_token_response(
        b'{"access_token": "abc", "token_type": "Bearer", "scope": "s"}', default_expires_in_s=300
    ) == ("abc", 300, "s", True)


# -- against the fake authorization server ------------------------------------------------------


async def test_five_hundred_cold_callers_make_one_token_request(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider()
    authserver.server.inject(Fault(kind="delay", delay_s=0.2))
    tokens = await asyncio.gather(*(provider.get(SCOPES) for _ in range(500)))
    assert authserver.server.token_requests == 1
    assert len({t.value for t in tokens}) == 1
    assert tokens[0].value in authserver.server.issued
    seen = authserver.server.requests[0]
    assert seen.outcome == "issued"
    assert seen.form["scope"] == "scope:demo:consult"
    assert "client_secret" not in seen.form and "client_id" not in seen.form


async def test_token_is_reused_and_scope_sets_are_separate(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider()
    first = await provider.get(SCOPES)
    assert await provider.get(SCOPES) is first
    default = await provider.get(frozenset())
    assert default.value != first.value
    assert authserver.server.token_requests == 2
    assert "scope" not in authserver.server.requests[1].form


async def test_refresh_ahead_does_not_block_callers(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    clock = FakeClock()
    provider = await make_provider(clock=clock)
    authserver.server.expires_in = 100
    first = await provider.get(SCOPES)
    assert first.refresh_at == pytest.approx(first.obtained_at + 80)
    clock.advance(81)
    authserver.server.inject(Fault(kind="delay", delay_s=0.3))
    # The refresh starts in the background; the caller gets the still valid token at once.
    assert await asyncio.wait_for(provider.get(SCOPES), 0.1) is first
    for _ in range(100):
        if provider.peek(SCOPES) is not first:
            break
        await asyncio.sleep(0.02)
    second = provider.peek(SCOPES)
    assert second is not None and second is not first
    assert authserver.server.token_requests == 2


async def test_background_refresh_runs_without_callers(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    clock = FakeClock()
    provider = await make_provider(clock=clock)
    provider.start([SCOPES])
    for _ in range(100):
        if provider.peek(SCOPES) is not None:
            break
        await asyncio.sleep(0.02)
    first = provider.peek(SCOPES)
    assert first is not None
    clock.advance(first.refresh_at - clock.now + 1)
    for _ in range(150):
        if provider.peek(SCOPES) is not first:
            break
        await asyncio.sleep(0.02)
    assert provider.peek(SCOPES) is not first
    assert authserver.server.token_requests == 2
    status = provider.status()[0]
    assert status.usable and status.last_outcome == "success"


@pytest.mark.timeout(30)  # a regression spins the event loop: only the timeout ends it
async def test_failing_refreshes_raced_by_callers_never_block_the_loop(
    authserver: AuthServerHandle, partner_files: PartnerFiles, ca_file: Path
) -> None:
    # Callers past refresh_at start refreshes of their own; each fails at once (503). When the
    # background refresher woke between a fetch finishing and its done callback, it awaited the
    # finished task -- which does not yield -- and looped on it for ever (found by the soak).
    config = make_config(
        authserver.token_url,
        partner_files,
        ca_file,
        retry_initial_s=0.01,
        retry_max_s=0.02,
        refresh_ratio=0.1,
    )
    authserver.server.expires_in = 10  # refreshed from 1 s on, usable for about 9 s
    loop = asyncio.get_running_loop()
    longest_stall = 0.0

    async def watch() -> None:
        nonlocal longest_stall
        while True:
            before = loop.time()
            await asyncio.sleep(0.01)
            longest_stall = max(longest_stall, loop.time() - before)

    async with make_session(config) as session:
        provider = TokenProvider(config, load_credentials(config.client), session, tick_s=0.01)
        provider.start([SCOPES])
        watcher = asyncio.create_task(watch())
        try:
            first = await provider.get(SCOPES)
            authserver.server.inject(Fault(kind="status", status=503), times=10**6)

            async def caller() -> None:
                while True:
                    assert await provider.get(SCOPES) is first  # the cached token serves
                    await asyncio.sleep(0.001)

            callers = [asyncio.create_task(caller()) for _ in range(8)]
            await asyncio.sleep(3)
            for task in callers:
                assert not task.done()  # no caller failed
                task.cancel()
            await asyncio.gather(*callers, return_exceptions=True)
        finally:
            watcher.cancel()
            await provider.close()
    refused = [r for r in authserver.server.requests if r.outcome == "fault:status"]
    assert len(refused) > 20  # the refreshes really raced and failed
    assert longest_stall < 2.0


async def test_a_wall_clock_jump_changes_nothing(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    wall = [time.time()]
    provider = await make_provider(clock=FakeClock(), wall=lambda: wall[0])
    first = await provider.get(SCOPES)
    wall[0] += 86400 * 3  # three days forward on the wall clock only
    assert await provider.get(SCOPES) is first
    assert authserver.server.token_requests == 1


async def test_outage_while_valid_keeps_serving(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    clock = FakeClock()
    provider = await make_provider(clock=clock)
    authserver.server.expires_in = 100
    first = await provider.get(SCOPES)
    clock.advance(85)
    authserver.server.inject(Fault(kind="status", status=503), times=50)
    for _ in range(5):
        assert await provider.get(SCOPES) is first
        await asyncio.sleep(0.05)
    assert authserver.server.token_requests >= 2
    assert provider.status()[0].last_outcome == "error"
    assert provider.peek(SCOPES) is first


async def test_outage_after_expiry_is_token_unavailable(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    clock = FakeClock()
    provider = await make_provider(clock=clock)
    authserver.server.expires_in = 100
    await provider.get(SCOPES)
    clock.advance(101)
    authserver.server.inject(Fault(kind="drop"), times=50)
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "unreachable"
    assert info.value.status == 503
    assert info.value.retry_after_s >= 1
    assert provider.peek(SCOPES) is None


async def test_unreachable_endpoint(make_provider: ProviderFactory) -> None:
    provider = await make_provider(token_url="https://127.0.0.1:9/REST/oauth/v5/token")
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "unreachable"


@pytest.mark.parametrize(
    "fault",
    [
        Fault(kind="html"),
        Fault(kind="garbage"),
        Fault(kind="response", status=200, body={"token_type": "Bearer", "expires_in": 60}),
        Fault(kind="response", status=200, body={"access_token": "x", "token_type": "mac"}),
        Fault(
            kind="response",
            status=200,
            body={"access_token": "x", "token_type": "Bearer", "expires_in": "abc"},
        ),
        Fault(
            kind="response",
            status=200,
            body={"access_token": "x", "token_type": "Bearer", "expires_in": -5},
        ),
        Fault(
            kind="response",
            status=200,
            body={"access_token": "x\r\nX-Evil: 1", "token_type": "Bearer", "expires_in": 60},
        ),
        Fault(kind="response", status=404, body={"detail": "not here"}),
    ],
    ids=["html", "garbage", "no-token", "mac", "expires-abc", "expires-neg", "crlf", "404"],
)
async def test_invalid_answers_cache_nothing(
    authserver: AuthServerHandle, make_provider: ProviderFactory, fault: Fault
) -> None:
    provider = await make_provider()
    authserver.server.inject(fault)
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "invalid_response"
    assert provider.peek(SCOPES) is None


async def test_unknown_client_is_rejected_with_its_oauth_error(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    authserver.server.clients.clear()
    provider = await make_provider()
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "rejected"
    assert info.value.oauth_error == "invalid_client"
    assert info.value.code == "token_rejected"
    assert provider.status()[0].last_outcome == "rejected"


async def test_scope_not_granted_is_invalid_scope(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider()
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(frozenset({"scope:not:granted"}))
    assert info.value.oauth_error == "invalid_scope"


async def test_retry_after_is_honoured(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider()
    authserver.server.inject(Fault(kind="status", status=503, retry_after=120))
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "unavailable"
    assert info.value.retry_after_s >= 120
    # Within the backoff window callers fail fast, without another token request.
    with pytest.raises(TokenUnavailable) as again:
        await provider.get(SCOPES)
    assert 100 < again.value.retry_after_s <= 120
    assert authserver.server.token_requests == 1


async def test_invalidate_once_under_concurrent_401s(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider()
    first = await provider.get(SCOPES)
    results = [provider.invalidate(first) for _ in range(20)]
    assert results.count(True) == 1
    tokens = await asyncio.gather(*(provider.get(SCOPES) for _ in range(50)))
    assert {t.value for t in tokens} != {first.value}
    assert len({t.value for t in tokens}) == 1
    assert authserver.server.token_requests == 2
    assert provider.invalidate(first) is False  # a stale token never drops the new one
    assert provider.peek(SCOPES) is tokens[0]


async def test_redirect_is_not_followed(
    authserver: AuthServerHandle,
    make_provider: ProviderFactory,
    server_ssl: Any,
) -> None:
    target = FakeAuthServer()
    served = await serve(target.make_app(), ssl_context=server_ssl)
    try:
        provider = await make_provider()
        authserver.server.inject(
            Fault(kind="redirect", location=served.url + FakeAuthServer.TOKEN_PATH)
        )
        with pytest.raises(TokenUnavailable) as info:
            await provider.get(SCOPES)
        assert info.value.reason == "invalid_response"
        assert "redirect" in info.value.detail
        assert target.token_requests == 0
    finally:
        await served.close()


async def test_untrusted_certificate_is_tls_failure(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider(trust=False)
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "tls"
    assert authserver.server.token_requests == 0


async def test_slow_endpoint_is_a_timeout(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider(timeout_s=0.2)
    authserver.server.inject(Fault(kind="delay", delay_s=1.0))
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "timeout"


async def test_discovery_reads_the_token_endpoint(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider(discovery_url=authserver.metadata_url)
    token = await provider.get(SCOPES)
    assert provider.token_url == authserver.token_url
    assert token.value in authserver.server.issued


async def test_discovery_failure_is_clear(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider(discovery_url=authserver.url + "/nothing-here")
    with pytest.raises(TokenUnavailable) as info:
        await provider.get(SCOPES)
    assert info.value.reason == "invalid_response"
    assert "discovery" in info.value.detail


async def test_client_id_is_sent_only_when_configured(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    provider = await make_provider(send_client_id=True)
    await provider.get(SCOPES)
    assert authserver.server.requests[0].form["client_id"] == CLIENT_ID


async def test_clock_skew_is_measured(
    authserver: AuthServerHandle, make_provider: ProviderFactory
) -> None:
    # Our clock 20 s behind the server's: still within the fake's leeway, and measured.
    provider = await make_provider(wall=lambda: time.time() - 20)
    await provider.get(SCOPES)
    assert provider.clock_skew_s is not None
    assert 18 < provider.clock_skew_s < 22


async def test_canary_secrets_never_reach_the_logs(
    authserver: AuthServerHandle,
    make_provider: ProviderFactory,
    partner_files: PartnerFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    clock = FakeClock()
    provider = await make_provider(clock=clock)
    authserver.server.expires_in = 100
    token: Token = await provider.get(SCOPES)
    for fault in (
        Fault(kind="status", status=503, retry_after=1),
        Fault(kind="html"),
        Fault(kind="garbage"),
        Fault(kind="drop"),
        Fault(
            kind="response",
            status=400,
            body={"error": "invalid_client", "error_description": token.value},
        ),
        Fault(kind="response", status=200, body={"access_token": token.value + " x"}),
    ):
        clock.advance(200)
        authserver.server.inject(fault)
        with pytest.raises(TokenUnavailable) as info:
            await provider.get(SCOPES)
        assert token.value not in repr(info.value) and token.value not in str(info.value)
        for attempt in range(50):
            if provider.status()[0].consecutive_failures >= 1 and attempt:
                break
            await asyncio.sleep(0.01)
    assertions = [r.form["client_assertion"] for r in authserver.server.requests]
    text = caplog.text + " ".join(repr(r.__dict__) for r in caplog.records)
    for secret in (token.value, partner_files.password, *assertions):
        assert secret not in text
    assert token.value not in repr(token)
    credentials: Credentials = load_credentials(
        make_config("https://as.invalid/t", partner_files, None).client
    )
    assert partner_files.password not in repr(credentials)
