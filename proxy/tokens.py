"""Own the access tokens: fetch, validate, cache per scope set, refresh ahead, back off.

One ``TokenProvider`` serves one client (``[client]`` or a ``[[clients]]`` entry) and every
scope set its routes need; each client has its own provider, so every (client, scope set) has
its own cache entry, single flight, refresh, backoff and 401 recovery, and one client's failures
never touch another's tokens. For each scope set:

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
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp
from cachetools import TLRUCache

from proxy.config import ClientConfig, Config
from proxy.credentials import Credentials
from proxy.errors import TokenUnavailable
from proxy.oauth import HINTS, Clock, OAuthClient, Token
from proxy.scopes import DEFAULT_TEXT, scope_label

__all__ = ["Token", "TokenProvider", "TokenStatus", "backoff_delay"]

log = logging.getLogger("ksz_proxy.tokens")


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


def backoff_delay(
    failures: int, *, initial_s: float, max_s: float, rng: Callable[[], float] = random.random
) -> float:
    """Return a full-jitter exponential backoff delay for the n-th consecutive failure."""
    ceiling = min(max_s, initial_s * 2.0 ** max(0, failures - 1))
    return ceiling * rng()


class TokenProvider(OAuthClient):
    """Hand out access tokens per scope set; see the module docstring for the rules.

    The token-endpoint client it builds on (``oauth.OAuthClient``) holds the credentials in use,
    the token URL, the request count and the clock skew.
    """

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
        client: ClientConfig | None = None,
    ) -> None:
        """Serve ``client`` (default: the configuration's default client) with ``credentials``."""
        super().__init__(config, credentials, session, (clock, wall_clock), client=client)
        self._rng = rng
        self._tick_s = tick_s
        # Told the outcome (success, rejected, error) and duration of every token request.
        self._on_fetch = on_fetch or (lambda _outcome, _duration: None)
        self._entries: dict[frozenset[str], _Entry] = {}
        self._tokens: TLRUCache[frozenset[str], Token] = TLRUCache(
            maxsize=1024, ttu=lambda _key, token, _now: token.usable_until, timer=clock
        )
        # One refresh task per scope set kept fresh in the background.
        self._maintainers: dict[frozenset[str], asyncio.Task[None]] = {}

    # -- public API ---------------------------------------------------------------------------

    async def get(self, scopes: frozenset[str]) -> Token:
        """Return a usable token for ``scopes``, fetching one if none is cached."""
        token = self._tokens.get(scopes)
        now = self._clock()
        if token is not None and now < token.refresh_at:
            return token  # the usual case: nothing to start
        entry = self._entry(scopes)
        if token is not None:
            if entry.in_flight is None and now >= entry.retry_at:
                self._start_fetch(entry)
            return token
        fetch = entry.in_flight
        if fetch is None:
            if entry.last_error is not None and now < entry.retry_at:
                raise entry.last_error.retry_in(entry.retry_at - now)
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
                extra={
                    "client": self.client.name,
                    "scopes": scope_label(token.scopes, default=DEFAULT_TEXT),
                },
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

    @property
    def scope_sets(self) -> tuple[frozenset[str], ...]:
        """Return the scope sets this client's routes need, in route order."""
        name = self.client.name
        return tuple(scopes for client, scopes in self._config.token_keys if client == name)

    def use(self, config: Config, client: ClientConfig) -> None:
        """Serve the routes of a reloaded ``config`` as ``client``, signing as before.

        For a reload that changed neither ``client``'s signing settings nor the token endpoint's
        ([oauth], [egress]): the cached tokens stay good. Call ``start`` for new scope sets.
        """
        self._config = config
        self.client = client
        # Scope sets no route asks for any more: stop refreshing them and forget their state.
        needed = set(self.scope_sets)
        for scopes in [s for s in self._maintainers if s not in needed]:
            self._maintainers.pop(scopes).cancel()
            entry = self._entries.pop(scopes, None)
            if entry is not None and entry.fetch is not None:
                entry.fetch.cancel()
            self._tokens.pop(scopes, None)

    def start(self, scope_sets: Iterable[frozenset[str]] | None = None) -> None:
        """Start background refresh for each scope set (default: those its routes use).

        A scope set already refreshed is left as it is, so a reload may pass every set it has.
        """
        for scopes in scope_sets if scope_sets is not None else self.scope_sets:
            if scopes in self._maintainers:
                continue
            entry = self._entry(scopes)
            self._maintainers[scopes] = asyncio.create_task(
                self._maintain(entry),
                name=f"token-refresh {scope_label(scopes, default=DEFAULT_TEXT)}",
            )

    def replace_credentials(self, credentials: Credentials) -> None:
        """Sign with new credentials from now on and fetch fresh tokens for every scope set.

        Cached tokens keep serving until their replacements arrive; if the new credentials are
        refused, the old tokens serve while valid and the failure shows in health and logs.
        """
        self.credentials = credentials
        for entry in self._entries.values():
            entry.retry_at = 0.0
            if entry.in_flight is None:
                self._start_fetch(entry)

    async def close(self) -> None:
        """Stop background refresh and any token request in flight."""
        tasks: list[asyncio.Task[Any]] = list(self._maintainers.values())
        tasks += [e.fetch for e in self._entries.values() if e.fetch is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await super().close()
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
            token = await self.fetch(entry.scopes)
        except TokenUnavailable as exc:
            failure = self._record_failure(entry, exc)
            self._on_fetch(entry.last_outcome or "error", time.perf_counter() - started)
            raise failure from None
        self._on_fetch("success", time.perf_counter() - started)
        entry.failures = 0
        entry.retry_at = 0.0
        entry.last_error = None
        entry.last_outcome = "success"
        self._tokens[entry.scopes] = token
        return token

    def _record_failure(self, entry: _Entry, exc: TokenUnavailable) -> TokenUnavailable:
        """Record a failed request; return the failure callers see, with the backoff as hint."""
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
        entry.last_error = exc.retry_in(delay)
        entry.last_outcome = "rejected" if exc.reason == "rejected" else "error"
        log.warning(
            "token request failed",
            extra={
                "client": self.client.name,
                "scopes": scope_label(entry.scopes, default=DEFAULT_TEXT),
                "reason": exc.reason,
                "oauth_error": exc.oauth_error,
                "hint": HINTS.get(exc.oauth_error or exc.reason),
                "detail": exc.detail,
                "retry_in_s": round(delay, 3),
                "consecutive_failures": entry.failures,
            },
        )
        return entry.last_error
