"""Own the access tokens: fetch, validate, cache per scope set, refresh ahead, back off.

One ``TokenProvider`` serves every scope set the routes need. For each scope set:

- the token is cached (``cachetools.TLRUCache``, each entry living until its own expiry) and
  handed out while it is usable; callers never wait while a valid token is cached;
- single flight: any number of callers on a cold or expired entry share one token request and
  its result or its error (the request runs in its own task, awaited through ``asyncio.shield``,
  so a caller that goes away does not cancel it for the others);
- a background task refreshes ahead, at ``oauth.refresh_ratio`` (80 %) of the lifetime, measured
  on the monotonic clock from when the request was sent, so a wall-clock jump changes nothing;
- failures are never cached: the old token keeps serving while valid, retries back off
  exponentially with full jitter (capped) and honour ``Retry-After``; once no valid token is left,
  callers get ``TokenUnavailable`` with a stable reason and a retry-after hint.

Time comes from an injected monotonic ``clock`` so tests travel in time without patching.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import random
import re
import ssl
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from cachetools import TLRUCache

from proxy.assertion import AssertionSettings, sign_assertion, token_request_form
from proxy.config import Config
from proxy.credentials import Credentials
from proxy.errors import TokenUnavailable
from proxy.scopes import DEFAULT_TEXT, scope_label
from proxy.tls import client_context

log = logging.getLogger("ksz_proxy.tokens")

# RFC 6750 section 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
B64TOKEN: Final = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# RFC 6749 error codes are NQSCHAR; keep only short, plain codes before logging or reporting one.
_OAUTH_ERROR: Final = re.compile(r"[a-z_]{1,64}")
MAX_TOKEN_LENGTH: Final = 16 * 1024
MAX_RESPONSE_BYTES: Final = 64 * 1024
MAX_RETRY_AFTER_S: Final = 3600.0

Clock = Callable[[], float]

# What an operator should look at first, per OAuth error code or failure reason.
HINTS: Final[Mapping[str, str]] = {
    "invalid_client": "certificate or client id not registered for this environment "
    "(or the local clock is off: see kszproxy_clock_skew_seconds)",
    "invalid_scope": "scope not granted to this client id",
    "unauthorized_client": "client id not allowed the client_credentials grant",
    "unreachable": "check DNS, the firewall flow to the token endpoint and upstream proxies",
    "timeout": "the token endpoint is slow or a firewall drops packets",
    "tls": "the token endpoint's certificate is not trusted (oauth.ca_file?)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """An access token for one scope set, with its timing on the monotonic clock."""

    value: str = field(repr=False)
    scopes: frozenset[str]
    granted_scope: str | None
    expires_in_s: int
    obtained_at: float
    refresh_at: float
    usable_until: float
    expires_at_wall: float

    @property
    def authorization(self) -> str:
        """Return the ``Authorization`` header value."""
        return "Bearer " + self.value


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenStatus:
    """What health and metrics may know about one scope set (never the token)."""

    scopes: frozenset[str]
    usable: bool
    expires_at_wall: float | None
    last_outcome: str | None
    last_reason: str | None
    last_attempt_wall: float | None
    consecutive_failures: int


@dataclass(slots=True)
class _Entry:
    scopes: frozenset[str]
    fetch: asyncio.Task[Token] | None = None
    failures: int = 0
    retry_at: float = 0.0
    last_error: TokenUnavailable | None = None
    last_outcome: str | None = None
    last_attempt_wall: float | None = None

    @property
    def in_flight(self) -> asyncio.Task[Token] | None:
        """Return the token request under way; a finished one is none, callback run or not.

        Awaiting a finished task does not yield to the event loop: a loop that took a finished
        fetch (its done callback, which clears ``fetch``, still pending) for one under way would
        await it again and again and never let the callback run, every request stuck.
        """
        fetch = self.fetch
        return fetch if fetch is not None and not fetch.done() else None


def parse_retry_after(value: str | None, *, now_wall: float) -> float | None:
    """Return the seconds a ``Retry-After`` value asks to wait (delta-seconds or HTTP-date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now_wall), MAX_RETRY_AFTER_S)


def backoff_delay(
    failures: int, *, initial_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Return a full-jitter exponential backoff delay for the n-th consecutive failure."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    return ceiling * rng()


def parse_token_response(
    body: bytes, *, default_expires_in_s: int
) -> tuple[str, int, str | None, bool]:
    """Validate a 200 token answer; return (token, expires_in, scope, expires_in_defaulted).

    Raises ``TokenUnavailable("invalid_response")`` for anything but a proper Bearer token answer.
    """
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the token endpoint answer is not JSON") from None
    if not isinstance(data, dict):
        raise _invalid("the token endpoint answer is not a JSON object")
    token = data.get("access_token")
    if not isinstance(token, str) or not token:
        raise _invalid("the token endpoint answer has no access_token")
    if len(token) > MAX_TOKEN_LENGTH or not B64TOKEN.fullmatch(token):
        raise _invalid("the access_token is not a valid RFC 6750 bearer token")
    token_type = data.get("token_type")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        raise _invalid("the token endpoint answer is not a Bearer token")
    raw_expires = data.get("expires_in")
    defaulted = raw_expires is None
    if defaulted:
        expires_in = default_expires_in_s
    elif isinstance(raw_expires, int) and not isinstance(raw_expires, bool):
        expires_in = raw_expires
    elif isinstance(raw_expires, str) and raw_expires.isascii() and raw_expires.isdigit():
        expires_in = int(raw_expires)
    else:
        raise _invalid("expires_in is not a positive integer")
    if expires_in <= 0:
        raise _invalid("expires_in is not a positive integer")
    scope = data.get("scope")
    return token, expires_in, scope if isinstance(scope, str) else None, defaulted


def _invalid(detail: str) -> TokenUnavailable:
    return TokenUnavailable("invalid_response", detail)


def make_session(config: Config, *, limit: int = 4) -> aiohttp.ClientSession:
    """Return the token endpoint's own session: verified TLS, no proxy variables, no cookies."""
    connector = aiohttp.TCPConnector(
        ssl=client_context(config.oauth.ca_file), limit=limit, enable_cleanup_closed=True
    )
    return aiohttp.ClientSession(
        connector=connector,
        trust_env=False,
        auto_decompress=True,
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
        headers={"User-Agent": "ksz-proxy"},
    )


class TokenProvider:
    """Hand out access tokens per scope set; see the module docstring for the rules."""

    def __init__(
        self,
        config: Config,
        credentials: Credentials,
        session: aiohttp.ClientSession,
        *,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        rng: Callable[[], float] = random.random,
        tick_s: float = 1.0,
        on_fetch: Callable[[str, float], None] | None = None,
    ) -> None:
        self._config = config
        self._oauth = config.oauth
        self._credentials = credentials
        self._session = session
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng
        self._tick_s = tick_s
        # Told the outcome (success, rejected, error) and duration of every token request.
        self._on_fetch = on_fetch or (lambda _outcome, _duration: None)
        self._token_url: str | None = config.oauth.token_url
        self._discovery: asyncio.Task[str] | None = None
        self._entries: dict[frozenset[str], _Entry] = {}
        self._tokens: TLRUCache[frozenset[str], Token] = TLRUCache(
            maxsize=1024, ttu=lambda _key, token, _now: token.usable_until, timer=clock
        )
        self._maintainers: list[asyncio.Task[None]] = []
        self.requests_sent = 0
        self.clock_skew_s: float | None = None

    # -- public API ---------------------------------------------------------------------------

    @property
    def token_url(self) -> str | None:
        """Return the token endpoint URL (configured, built in, or discovered)."""
        return self._token_url

    async def get(self, scopes: frozenset[str]) -> Token:
        """Return a usable token for ``scopes``, fetching one if none is cached."""
        token = self._tokens.get(scopes)
        now = self._clock()
        entry = self._entry(scopes)
        if token is not None:
            if now >= token.refresh_at and entry.in_flight is None and now >= entry.retry_at:
                self._start_fetch(entry)
            return token
        fetch = entry.in_flight
        if fetch is None:
            if entry.last_error is not None and now < entry.retry_at:
                raise TokenUnavailable(
                    entry.last_error.reason,
                    entry.last_error.detail,
                    oauth_error=entry.last_error.oauth_error,
                    retry_after_s=entry.retry_at - now,
                )
            return await asyncio.shield(self._start_fetch(entry))
        return await asyncio.shield(fetch)

    def invalidate(self, token: Token) -> bool:
        """Drop ``token`` if it is still the cached one (the upstream answered 401).

        Concurrent 401s for the same token drop it once, so they cause one refetch.
        """
        if self._tokens.get(token.scopes) is token:
            del self._tokens[token.scopes]
            log.info(
                "token dropped after an upstream 401",
                extra={"scopes": scope_label(token.scopes, default=DEFAULT_TEXT)},
            )
            return True
        return False

    def peek(self, scopes: frozenset[str]) -> Token | None:
        """Return the cached usable token for ``scopes`` without fetching."""
        return self._tokens.get(scopes)

    def status(self) -> list[TokenStatus]:
        """Return a snapshot per known scope set, for health and metrics."""
        result = []
        for scopes, entry in self._entries.items():
            token = self._tokens.get(scopes)
            result.append(
                TokenStatus(
                    scopes=scopes,
                    usable=token is not None,
                    expires_at_wall=token.expires_at_wall if token else None,
                    last_outcome=entry.last_outcome,
                    last_reason=entry.last_error.reason if entry.last_error else None,
                    last_attempt_wall=entry.last_attempt_wall,
                    consecutive_failures=entry.failures,
                )
            )
        return result

    def start(self, scope_sets: Iterable[frozenset[str]] | None = None) -> None:
        """Start background refresh for each scope set (default: those the routes use)."""
        for scopes in scope_sets if scope_sets is not None else self._config.scope_sets:
            entry = self._entry(scopes)
            self._maintainers.append(
                asyncio.create_task(
                    self._maintain(entry),
                    name=f"token-refresh {scope_label(scopes, default=DEFAULT_TEXT)}",
                )
            )

    def replace_credentials(self, credentials: Credentials) -> None:
        """Sign with new credentials from now on and fetch fresh tokens for every scope set.

        Cached tokens keep serving until their replacements arrive; if the new credentials are
        refused, the old tokens serve while valid and the failure shows in health and logs.
        """
        self._credentials = credentials
        for entry in self._entries.values():
            entry.retry_at = 0.0
            if entry.in_flight is None:
                self._start_fetch(entry)

    async def close(self) -> None:
        """Stop background refresh and any token request in flight."""
        tasks: list[asyncio.Task[Any]] = list(self._maintainers)
        tasks += [e.fetch for e in self._entries.values() if e.fetch is not None]
        if self._discovery is not None:
            tasks.append(self._discovery)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._maintainers.clear()

    # -- internals ----------------------------------------------------------------------------

    def _entry(self, scopes: frozenset[str]) -> _Entry:
        entry = self._entries.get(scopes)
        if entry is None:
            entry = self._entries[scopes] = _Entry(scopes=scopes)
        return entry

    def _start_fetch(self, entry: _Entry) -> asyncio.Task[Token]:
        task = asyncio.create_task(
            self._fetch(entry),
            name=f"token-fetch {scope_label(entry.scopes, default=DEFAULT_TEXT)}",
        )
        entry.fetch = task

        def done(t: asyncio.Task[Token]) -> None:
            if entry.fetch is t:  # a later fetch may already have started: keep it
                entry.fetch = None
            if not t.cancelled():
                t.exception()  # retrieved here so an unawaited failure is not reported as lost

        task.add_done_callback(done)
        return task

    async def _maintain(self, entry: _Entry) -> None:
        """Keep one scope set's token fresh: fetch when due, retry after failures."""
        while True:
            now = self._clock()
            token = self._tokens.get(entry.scopes)
            due = max(token.refresh_at if token else now, entry.retry_at)
            fetch = entry.in_flight
            if fetch is not None or now >= due:
                fetch = fetch or self._start_fetch(entry)
                try:
                    await asyncio.shield(fetch)
                except TokenUnavailable:
                    pass  # recorded and logged by _fetch; retry_at now holds the backoff
                except asyncio.CancelledError:
                    raise
                except Exception:
                    # A bug must not stop refreshing for good; the traceback names no secret.
                    log.exception("token refresh failed unexpectedly")
                    await asyncio.sleep(self._tick_s)
                continue
            # Sleep in short ticks: the injected clock may run faster than real time in tests.
            await asyncio.sleep(min(max(due - now, 0.01), self._tick_s))

    async def _fetch(self, entry: _Entry) -> Token:
        entry.last_attempt_wall = self._wall()
        started = time.perf_counter()
        try:
            token = await self._request(entry.scopes)
        except TokenUnavailable as exc:
            self._record_failure(entry, exc)
            self._on_fetch(entry.last_outcome or "error", time.perf_counter() - started)
            raise
        self._on_fetch("success", time.perf_counter() - started)
        entry.failures = 0
        entry.retry_at = 0.0
        entry.last_error = None
        entry.last_outcome = "success"
        self._tokens[entry.scopes] = token
        return token

    def _record_failure(self, entry: _Entry, exc: TokenUnavailable) -> None:
        entry.failures += 1
        delay = backoff_delay(
            entry.failures,
            initial_s=self._oauth.retry_initial_s,
            max_s=self._oauth.retry_max_s,
            rng=self._rng,
        )
        hinted = exc.hint_s
        if hinted is not None:
            delay = max(delay, hinted)
        entry.retry_at = self._clock() + delay
        exc.set_retry_after(delay)
        entry.last_error = exc
        entry.last_outcome = "rejected" if exc.reason == "rejected" else "error"
        log.warning(
            "token request failed",
            extra={
                "scopes": scope_label(entry.scopes, default=DEFAULT_TEXT),
                "reason": exc.reason,
                "oauth_error": exc.oauth_error,
                "hint": HINTS.get(exc.oauth_error or exc.reason),
                "detail": exc.detail,
                "retry_in_s": round(delay, 3),
                "consecutive_failures": entry.failures,
            },
        )

    async def _resolve_token_url(self) -> str:
        if self._token_url is not None:
            return self._token_url
        if self._discovery is None or self._discovery.done():
            self._discovery = asyncio.create_task(self._discover(), name="oauth-discovery")
        self._token_url = await asyncio.shield(self._discovery)
        return self._token_url

    async def _discover(self) -> str:
        url = self._oauth.discovery_url or ""
        body, status, _headers = await self._call("GET", url, data=None)
        if status != 200:
            raise _invalid(f"the discovery document answered HTTP {status}")
        try:
            meta = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise _invalid("the discovery document is not JSON") from None
        endpoint = meta.get("token_endpoint") if isinstance(meta, dict) else None
        if not isinstance(endpoint, str) or urlsplit(endpoint).scheme != "https":
            raise _invalid("the discovery document has no https token_endpoint")
        log.info("token endpoint discovered", extra={"token_url": endpoint})
        return endpoint

    async def _request(self, scopes: frozenset[str]) -> Token:
        token_url = await self._resolve_token_url()
        settings = AssertionSettings.from_config(self._config, token_url)
        assertion = sign_assertion(settings, self._credentials, now=self._wall())
        form = token_request_form(
            assertion,
            scopes,
            client_id=self._config.client.id if self._oauth.send_client_id else None,
        )
        sent_at = self._clock()
        started = time.perf_counter()
        self.requests_sent += 1
        body, status, headers = await self._call("POST", token_url, data=form)
        self._note_skew(headers.get("Date"))
        if status != 200:
            raise self._http_failure(status, body, headers)
        value, expires_in, scope, defaulted = parse_token_response(
            body, default_expires_in_s=self._oauth.default_expires_in_s
        )
        if defaulted:
            log.warning(
                "token answer without expires_in; assuming the default",
                extra={"expires_in_s": expires_in},
            )
        margin = min(5.0, expires_in * 0.1)
        token = Token(
            value=value,
            scopes=scopes,
            granted_scope=scope,
            expires_in_s=expires_in,
            obtained_at=sent_at,
            refresh_at=sent_at + expires_in * self._oauth.refresh_ratio,
            usable_until=sent_at + expires_in - margin,
            expires_at_wall=self._wall() + expires_in,
        )
        log.info(
            "token obtained",
            extra={
                "scopes": scope_label(scopes, default=DEFAULT_TEXT),
                "expires_in_s": expires_in,
                "duration_s": round(time.perf_counter() - started, 4),
            },
        )
        return token

    async def _call(
        self, method: str, url: str, *, data: Mapping[str, str] | None
    ) -> tuple[bytes, int, Mapping[str, str]]:
        """Make one request to the authorization server; translate transport errors here only."""
        timeout = aiohttp.ClientTimeout(total=self._oauth.timeout_s)
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                headers={"Accept": "application/json"},
            ) as response:
                body = await response.content.read(MAX_RESPONSE_BYTES)
                return body, response.status, response.headers
        except TimeoutError:
            raise TokenUnavailable("timeout", "the token endpoint did not answer in time") from None
        except aiohttp.ClientConnectorCertificateError:
            raise TokenUnavailable(
                "tls", "the token endpoint's TLS certificate is not trusted"
            ) from None
        except (aiohttp.ClientSSLError, ssl.SSLError):
            raise TokenUnavailable("tls", "TLS handshake with the token endpoint failed") from None
        except aiohttp.ClientConnectorDNSError:
            raise TokenUnavailable(
                "unreachable", "the token endpoint's host name does not resolve"
            ) from None
        except (aiohttp.ClientError, OSError):
            # Never log the client error itself: its repr may carry request details.
            raise TokenUnavailable("unreachable", "the token endpoint is unreachable") from None

    def _http_failure(
        self, status: int, body: bytes, headers: Mapping[str, str]
    ) -> TokenUnavailable:
        hint = parse_retry_after(headers.get("Retry-After"), now_wall=self._wall())
        if 300 <= status < 400:
            exc = _invalid(f"the token endpoint answered a redirect (HTTP {status}); not followed")
        elif status in (400, 401, 403):
            code = _oauth_error(body)
            exc = TokenUnavailable(
                "rejected",
                f"the token endpoint refused the request (HTTP {status}, "
                f"{code or 'no error code'})",
                oauth_error=code,
            )
        elif status == 429 or status >= 500:
            exc = TokenUnavailable("unavailable", f"the token endpoint answered HTTP {status}")
        else:
            exc = _invalid(f"the token endpoint answered HTTP {status}")
        exc.hint_s = hint
        return exc

    def _note_skew(self, date: str | None) -> None:
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.clock_skew_s = server - self._wall()


def _oauth_error(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _OAUTH_ERROR.fullmatch(code) else None
