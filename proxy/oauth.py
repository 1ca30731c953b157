"""Own the token-endpoint client: one token request, its answer, discovery and clock skew.

``OAuthClient.fetch`` signs a client assertion with the current credentials, posts the
client-credentials request (RFC 7523), validates the answer (``parse_token_response``) and
returns a ``Token`` timed on the injected monotonic clock. Transport failures, refusals and bad
answers become ``TokenUnavailable`` with a stable reason, here and nowhere else. The caching,
single flight, refresh and backoff around it are ``tokens.py``'s.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import urlsplit

import aiohttp

from proxy.assertion import AssertionSettings, sign_assertion, token_request_form
from proxy.config import ClientConfig, Config
from proxy.credentials import Credentials
from proxy.egress import PROXY_AUTH_HINT, EgressRoute, decide, proxy_failure
from proxy.errors import TokenUnavailable
from proxy.scopes import DEFAULT_TEXT, scope_label
from proxy.tls import client_context

# The logger name stays that of tokens.py, where these lines were written before
# (docs/operations.md, "Logs").
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
    "unreachable": "check DNS and the firewall flow to the token endpoint",
    "timeout": "the token endpoint is slow or a firewall drops packets",
    "tls": "the token endpoint's certificate is not trusted (oauth.ca_file?)",
    "proxy_auth": PROXY_AUTH_HINT,
    "proxy": "check the forward proxy (egress.proxy_url or oauth.proxy): is it running, and "
    "does it allow CONNECT to the token endpoint's host and port?",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Token:
    """An access token for one client and scope set, with its timing on the monotonic clock."""

    value: str = field(repr=False)
    scopes: frozenset[str]
    client: str = "default"  # the name of the client it was issued to
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


def parse_token_response(
    body: bytes, *, default_expires_in_s: int
) -> tuple[str, int, str | None, bool]:
    """Validate a 200 token answer; return (token, expires_in, scope, expires_in_defaulted).

    Raises ``TokenUnavailable`` (``invalid_response``) for anything but a proper Bearer answer.
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


def _invalid(detail: str, *, hint_s: float | None = None) -> TokenUnavailable:
    return TokenUnavailable(detail, reason="invalid_response", hint_s=hint_s)


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


class OAuthClient:
    """Make token requests to the authorization server; hold the credentials that sign them."""

    def __init__(
        self,
        config: Config,
        credentials: Credentials,
        session: aiohttp.ClientSession,
        clocks: tuple[Clock, Clock],
        *,
        client: ClientConfig | None = None,
    ) -> None:
        """Sign as ``client`` (default: the default client) with ``credentials``.

        ``clocks`` are the monotonic and the wall clock.
        """
        self._config = config
        self.client = client or config.client
        self._oauth = config.oauth
        self.credentials = credentials
        self._session = session
        self._clock, self._wall = clocks
        self._token_url: str | None = config.oauth.token_url
        self._discovery: asyncio.Task[str] | None = None
        self.requests_sent = 0
        self.clock_skew_s: float | None = None

    @property
    def token_url(self) -> str | None:
        """Return the token endpoint URL (configured, built in, or discovered)."""
        return self._token_url

    def egress_route(self, url: str | None = None) -> EgressRoute:
        """Return how the authorization server at ``url`` (default: token endpoint) is reached."""
        url = url or self._token_url or self._oauth.discovery_url or ""
        return decide(self._config.egress, self._oauth.proxy, url, key="oauth.proxy")

    async def fetch(self, scopes: frozenset[str]) -> Token:
        """Request a token for ``scopes``; raise ``TokenUnavailable`` on any failure."""
        return await self._request(scopes)

    async def close(self) -> None:
        """Stop a discovery request in flight."""
        if self._discovery is not None:
            self._discovery.cancel()
            await asyncio.gather(self._discovery, return_exceptions=True)

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
        settings = AssertionSettings.for_client(self.client, token_url)
        assertion = sign_assertion(settings, self.credentials, now=self._wall())
        form = token_request_form(
            assertion,
            scopes,
            client_id=self.client.id if self._oauth.send_client_id else None,
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
            client=self.client.name,
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
                "client": self.client.name,
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
        route = self.egress_route(url)
        try:
            async with self._session.request(
                method,
                url,
                data=data,
                allow_redirects=False,
                timeout=timeout,
                headers={"Accept": "application/json"},
                **route.request_options(),
            ) as response:
                body = await response.content.read(MAX_RESPONSE_BYTES)
                return body, response.status, response.headers
        except (TimeoutError, aiohttp.ClientError, ssl.SSLError, OSError) as exc:
            # Never log the client error itself: its repr may carry request details.
            raise _transport_failure(exc, route) from None

    def _http_failure(
        self, status: int, body: bytes, headers: Mapping[str, str]
    ) -> TokenUnavailable:
        hint = parse_retry_after(headers.get("Retry-After"), now_wall=self._wall())
        if 300 <= status < 400:
            detail = f"the token endpoint answered a redirect (HTTP {status}); not followed"
            return _invalid(detail, hint_s=hint)
        if status in (400, 401, 403):
            code = _oauth_error(body)
            return TokenUnavailable(
                f"the token endpoint refused the request (HTTP {status}, "
                f"{code or 'no error code'})",
                reason="rejected",
                oauth_error=code,
                hint_s=hint,
            )
        if status == 429 or status >= 500:
            return TokenUnavailable(
                f"the token endpoint answered HTTP {status}", reason="unavailable", hint_s=hint
            )
        return _invalid(f"the token endpoint answered HTTP {status}", hint_s=hint)

    def _note_skew(self, date: str | None) -> None:
        if not date:
            return
        try:
            server = email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            return
        self.clock_skew_s = server - self._wall()


def _transport_failure(exc: BaseException, route: EgressRoute) -> TokenUnavailable:
    """Translate a transport error of the token request (the first matching kind wins)."""
    failure = proxy_failure(route, exc)
    if failure is not None:
        return TokenUnavailable(failure.detail, reason=failure.reason)
    if isinstance(exc, TimeoutError):
        detail, reason = "the token endpoint did not answer in time", "timeout"
    elif isinstance(exc, aiohttp.ClientConnectorCertificateError):
        detail, reason = "the token endpoint's TLS certificate is not trusted", "tls"
    elif isinstance(exc, aiohttp.ClientSSLError | ssl.SSLError):
        detail, reason = "TLS handshake with the token endpoint failed", "tls"
    elif isinstance(exc, aiohttp.ClientConnectorDNSError):
        detail, reason = "the token endpoint's host name does not resolve", "unreachable"
    else:
        detail, reason = "the token endpoint is unreachable", "unreachable"
    return TokenUnavailable(detail, reason=reason)


def _oauth_error(body: bytes) -> str | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    code = data.get("error") if isinstance(data, dict) else None
    return code if isinstance(code, str) and _OAUTH_ERROR.fullmatch(code) else None
