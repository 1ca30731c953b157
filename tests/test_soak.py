"""A bounded soak (SECURITY 30, 33, 36, 37): a minute of steady mixed load through a real chain.

The proxy and both fakes run in this process, on the test's event loop, so the test can steer them
and look inside (cached tokens, refused tokens, injected faults, the proxy's tasks and descriptors).
The load comes from another process, ``tests/support/soakload.py``, with an event loop of its own:
12 workers send GET and POST, small and large bodies, chunked uploads, on both routes, for
``KSZ_SOAK_S`` seconds (60 by default), after a 5 s warm-up that fills every connection pool.
Sharing one loop with the proxy made the load generator starve it (and be starved) on a busy 2-core
machine: 408 and 504 answers that said nothing about the proxy.

Meanwhile, on a timeline:

- the fake KSZ API refuses the token in use now and then (401): one refetch and one resend;
- the token endpoint is down for 12 s in the middle: tokens live 30 s and are refreshed from
  9 s on, so the refresh fails while the cached token is still valid -- callers must not notice;
- the certificate is renewed as an operator does it: a new key and certificate, registered at
  the fake authorization server, replace the keystore file, then a real SIGHUP reaches the
  handler ``proxy/cli.py`` installs; every token issued after that was asked for with an
  assertion naming the new certificate (``kid`` = its ``x5t#S256``).

Where a step depends on the proxy's state rather than on the clock -- no caller waiting on a
token request before the outage or the renewal, refreshes succeeding again before more 401s --
the test waits for that state (bounded) instead of hoping a fixed delay was enough.

Then: zero failed requests, ``kszproxy_requests_total`` counts exactly the requests sent, and
asyncio tasks, open file descriptors and RSS of this process are back near where the warm-up
left them (measured both times with the load generator idle and its connections still open).
A thread watches this process's event loop throughout: a stall of 10 s fails the soak with the
stack that blocked the loop, rather than as a pile of client timeouts.

Also here, as sustained runs of their own: 1 GiB streamed up and down in bounded memory
(SECURITY 30; bench/ measures the same in a process of its own, with ``VmHWM``), and a thousand
real token fetches, each with a fresh ``jti`` (SECURITY 25).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from proxy.admin import TOKENS
from proxy.config import load_config
from proxy.credentials import load_credentials
from proxy.oauth import make_session
from proxy.sandbox.authserver import Fault, RegisteredClient
from proxy.sandbox.pki import CertificateAuthority, Issued
from proxy.sandbox.upstream import stream_chunks, stream_sha256
from proxy.server import RunningProxy, reload_config, start
from proxy.tokens import TokenProvider
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO, OTHER, chain_data, changed, make_config, write_toml
from tests.support.fakes import AuthServerHandle, UpstreamHandle
from tests.support.metrics import samples, scrape
from tests.support.partner import CLIENT_ID, DEFAULT_SCOPES, PKCS12_PASSWORD, SCOPES, PartnerFiles
from tests.support.rss import rss_bytes

KIB: Final = 1024
MIB: Final = 1024 * KIB
REPO: Final = Path(__file__).resolve().parent.parent
SOAK_S: Final = float(os.environ.get("KSZ_SOAK_S", "60"))
WARM_UP_S: Final = 5.0
WORKERS: Final = 12
TOKEN_LIFETIME_S: Final = 30  # refreshed from 9 s on (refresh_ratio 0.3), usable ~27 s
OUTAGE_S: Final = 12.0
DEMO_SCOPES: Final = frozenset({"scope:demo:consult"})
KINDS: Final = {"get", "download", "post-small", "post-large", "put-chunked"}


def write_config(
    path: Path, auth: AuthServerHandle, upstream: UpstreamHandle, files: PartnerFiles, ca: Path
) -> Path:
    """Write the chain's configuration to a file, so that a reload can read it again."""
    data = changed(
        chain_data(auth, upstream.url, files, ca),
        # Each assertion names its certificate, so the fake's records show which one signed it.
        oauth={"refresh_ratio": 0.3, "key_id": "x5t#S256"},
        # The proxy and both fakes share this process's one event loop, saturated by the load: a
        # TLS handshake with the fake upstream waits on both of its ends. The soak is about tokens,
        # 401s and reloads, not about timeouts (tests/test_faults.py covers those).
        upstream={"replay_max_bytes": 4 * MIB, "connect_timeout_s": 30},
        listen={"max_body_bytes": 16 * MIB},
    )
    return write_toml(path, data)


@pytest.fixture
async def soak_chain(
    tmp_path: Path,
    authserver: AuthServerHandle,
    fake_upstream: UpstreamHandle,
    partner_files: PartnerFiles,
    ca_file: Path,
) -> AsyncIterator[Chain]:
    path = write_config(
        tmp_path / "ksz-proxy.toml", authserver, fake_upstream, partner_files, ca_file
    )
    config = load_config(path, {})
    authserver.server.expires_in = TOKEN_LIFETIME_S
    running = await start(config, load_credentials(config.client), drain_s=2.0)
    # Only for readiness and /metrics: the load comes from tests/support/soakload.py.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        chain = Chain(
            proxy=running,
            config=config,
            auth=authserver,
            upstream=fake_upstream.upstream,
            session=session,
        )
        try:
            await chain.wait_ready()
            yield chain
        finally:
            await running.close()


# -- the load generator and the signal -------------------------------------------------------


@dataclass(slots=True)
class LoadGenerator:
    """A running ``python -m tests.support.soakload``, steered line by line (see its docstring)."""

    process: asyncio.subprocess.Process
    errors: Path

    async def send(self, command: str) -> None:
        """Send one command line."""
        assert self.process.stdin is not None
        self.process.stdin.write(command.encode("ascii") + b"\n")
        await self.process.stdin.drain()

    async def receive(self, timeout_s: float) -> dict[str, Any]:
        """Return the next JSON line the load generator prints."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout_s)
        assert line, f"the load generator exited; its stderr ends:\n{self.stderr_tail()}"
        report: dict[str, Any] = json.loads(line)
        return report

    async def stop(self) -> dict[str, Any]:
        """End the current run; return its tally."""
        await self.send("stop")
        # Each worker finishes its request first, within the load generator's 90 s timeout.
        tally = await self.receive(120)
        assert tally["event"] == "tally", tally
        return tally

    def stderr_tail(self) -> str:
        return self.errors.read_text(encoding="utf-8", errors="replace")[-4000:]


@asynccontextmanager
async def load_generator(url: str, errors: Path) -> AsyncIterator[LoadGenerator]:
    """Start the load generator against ``url``; end it (killing it if need be) on the way out."""
    with errors.open("wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "tests.support.soakload", "--url", url),
            *("--route", DEMO, "--route", OTHER, "--workers", str(WORKERS), "--seed", "1"),
            # Its own bounds, should this test be gone before it says stop.
            *("--max-run-s", str(SOAK_S + 60), "--max-life-s", str(SOAK_S + 300)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            cwd=REPO,
        )
    load = LoadGenerator(process=process, errors=errors)
    try:
        assert (await load.receive(60)) == {"event": "ready"}
        yield load
    finally:
        if process.stdin is not None:
            process.stdin.close()  # end of input: it closes its connections and exits
        try:
            await asyncio.wait_for(process.communicate(), 15)
        except TimeoutError:
            process.kill()
            await process.communicate()
    assert process.returncode == 0, (
        f"load generator exit {process.returncode}:\n{load.stderr_tail()}"
    )


@contextmanager
def sighup_reloads(running: RunningProxy) -> Iterator[None]:
    """Reload credentials on SIGHUP, with the very handler proxy/cli.py installs, for a while."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGHUP)
    loop.add_signal_handler(signal.SIGHUP, reload_config, running)
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if previous is not None:
            signal.signal(signal.SIGHUP, previous)


class LoopWatch:
    """Measure how long this thread's event loop goes without running a callback.

    A thread pings the loop; after a stall of ``report_after_s`` it keeps the loop thread's stack,
    so that a loop blocked by a busy loop in the proxy is named, not just seen as timeouts.
    """

    def __init__(self, report_after_s: float = 5.0) -> None:
        self.longest_s = 0.0
        self.stack = ""
        self._report_after_s = report_after_s
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="loop-watch", daemon=True)

    def __enter__(self) -> LoopWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _pong(self) -> None:
        self._last = time.monotonic()

    def _watch(self) -> None:
        while not self._stop.wait(0.25):
            self._loop.call_soon_threadsafe(self._pong)
            stalled = time.monotonic() - self._last
            self.longest_s = max(self.longest_s, stalled)
            if stalled > self._report_after_s and not self.stack:
                frame = sys._current_frames().get(self._loop_thread)
                # The innermost frames name the culprit; the outer ones are pytest's.
                self.stack = "".join(traceback.format_stack(frame)[-8:]) if frame else "?"


def x5t_s256(issued: Issued) -> str:
    """Return the certificate's JWT ``x5t#S256`` thumbprint."""
    digest = hashlib.sha256(issued.certificate.public_bytes(Encoding.DER)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def requests_counted(chain: Chain) -> float:
    parsed = samples(await scrape(chain))
    return sum(v for (name, _labels), v in parsed.items() if name == "kszproxy_requests_total")


async def settle(chain: Chain) -> tuple[int, int, int]:
    """Wait for the proxy to be idle; return this process's asyncio tasks, fds and RSS."""
    if chain.proxy.drain.in_flight:
        async with asyncio.timeout(30):
            await chain.proxy.drain.idle.wait()
    await asyncio.sleep(0.5)
    gc.collect()
    return len(asyncio.all_tasks()), open_fds(), rss_bytes()


# -- the soak ----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(SOAK_S + 150)
async def test_soak_mixed_load_with_401s_an_outage_and_a_reload(
    soak_chain: Chain, partner_ca: CertificateAuthority, partner_files: PartnerFiles, tmp_path: Path
) -> None:
    chain = soak_chain
    server = chain.auth.server
    provider = chain.proxy.admin_app[TOKENS]
    scope_sets = chain.config.scope_sets
    loop = asyncio.get_running_loop()
    # The renewed certificate is made now: an RSA key takes a while to generate.
    renewed = partner_ca.issue_client("partner test client, renewed")
    renewed_keystore = tmp_path / "partner-renewed.p12"
    renewed.write_pkcs12(renewed_keystore, PKCS12_PASSWORD.encode())
    renewed_kid = x5t_s256(renewed)

    with LoopWatch() as watch, sighup_reloads(chain.proxy):
        async with load_generator(chain.url, tmp_path / "soakload.stderr") as load:
            # Warm-up with the full concurrency, so that every pool is as full as it will get.
            await load.send("run")
            await asyncio.sleep(WARM_UP_S)
            warm = await load.stop()
            assert warm["failure_count"] == 0, warm["failures"]
            chain.upstream.seen.clear()
            tasks_before, fds_before, rss_before = await settle(chain)
            counted_before = await requests_counted(chain)

            await load.send("run")
            started = loop.time()
            timeline: list[str] = []

            def note(event: str) -> None:
                timeline.append(f"{loop.time() - started:.1f}s {event}")

            async def forget_records() -> None:
                # The fake upstream keeps every request it saw; over a soak that is memory.
                while True:
                    await asyncio.sleep(1)
                    chain.upstream.seen.clear()

            forgetting = asyncio.create_task(forget_records())

            async def at(second: float) -> None:
                await asyncio.sleep(max(0.0, started + second - loop.time()))

            async def until(condition: Callable[[], bool], what: str) -> None:
                deadline = loop.time() + 30
                while not condition():
                    assert loop.time() < deadline, f"not within 30 s: {what}; {timeline}"
                    await asyncio.sleep(0.05)
                note(what)

            def steady() -> bool:
                # Every scope set has a cached token (no caller waits on a token request) and
                # its last refresh worked (no backoff that would fail a 401's refetch at once).
                return all(provider.peek(s) is not None for s in scope_sets) and all(
                    s.consecutive_failures == 0 for s in provider.status()
                )

            rejected = 0

            async def reject_tokens_until(end: float) -> None:
                nonlocal rejected
                while loop.time() < started + end:
                    token = provider.peek(DEMO_SCOPES)
                    if token is not None:
                        chain.upstream.reject_token(token.value)
                        rejected += 1
                    await asyncio.sleep(2.0)

            outage_start = 0.3 * SOAK_S
            reload_at = max(outage_start + OUTAGE_S + 5, 0.75 * SOAK_S)
            try:
                # 401s before the outage (stopping early enough that no refetch meets it) and
                # after it.
                await reject_tokens_until(outage_start - 3)
                await at(outage_start)
                await until(steady, "steady before the outage")
                requests_before_outage = len(server.requests)
                server.inject(Fault(kind="status", status=503), times=100_000)
                await asyncio.sleep(OUTAGE_S)
                server.clear_faults()
                note("outage over")
                outage = server.requests[requests_before_outage:]
                await until(steady, "steady after the outage")
                await reject_tokens_until(reload_at - 3)
                await at(reload_at)

                # The renewal. Until the SIGHUP is handled, a refresh signed with the old key is
                # refused: harmless while no caller waits on one, which steady() makes sure of.
                await until(steady, "steady before the renewal")
                requests_before_reload = len(server.requests)
                issued_before_reload = len(server.issued)
                os.replace(renewed_keystore, partner_files.pkcs12)
                server.register(
                    RegisteredClient(
                        client_id=CLIENT_ID,
                        certificate=renewed.certificate,
                        scopes=SCOPES,
                        default_scopes=DEFAULT_SCOPES,
                        expected_kid=renewed_kid,
                    )
                )
                os.kill(os.getpid(), signal.SIGHUP)

                def reloaded() -> bool:
                    credentials = chain.proxy.tokens.credentials
                    return credentials is not None and credentials.x5t_s256 == renewed_kid

                def renewed_tokens() -> bool:
                    asked = {
                        r.form.get("scope")
                        for r in server.requests[requests_before_reload:]
                        if r.outcome == "issued"
                    }
                    return steady() and {" ".join(sorted(s)) for s in scope_sets} <= asked

                await until(reloaded, "reloaded on SIGHUP")
                await until(renewed_tokens, "a renewed token for every scope set")
                await reject_tokens_until(SOAK_S - 3)
                await at(SOAK_S)
            finally:
                tally = await load.stop()
                forgetting.cancel()
                await asyncio.gather(forgetting, return_exceptions=True)

            summary = (
                f"{tally['sent']} requests {tally['by_kind']}, latency max "
                f"{tally['latency_max_s']} s p99 {tally['latency_p99_s']} s, longest loop stall "
                f"{watch.longest_s:.2f} s; {timeline}; failures {tally['failures'][:10]}"
            )
            print(summary)
            # A stall here is a bug in the proxy (or a fake), whatever else fails because of it.
            assert watch.longest_s < 10, (
                f"the event loop stalled {watch.longest_s:.0f} s, in:\n{watch.stack}"
            )
            assert tally["failure_count"] == 0, (tally["failure_count"], tally["failures"], summary)
            assert set(tally["by_kind"]) == KINDS, summary
            assert await requests_counted(chain) - counted_before == tally["sent"]
            # The outage was real: refreshes failed while callers were served from the cache.
            assert any(r.outcome == "fault:status" for r in outage)
            assert rejected >= 3
            retries = samples(await scrape(chain))
            assert (
                sum(v for (n, _), v in retries.items() if n == "kszproxy_upstream_retries_total")
                >= 3
            )
            # Fresh tokens after the renewal, each asked for with the new certificate.
            assert len(server.issued) > issued_before_reload
            after = server.requests[requests_before_reload:]
            kids = {(r.assertion_header or {}).get("kid") for r in after if r.outcome == "issued"}
            assert kids == {renewed_kid}

            # Nothing grew: tasks, descriptors, memory (the load generator idle, holding no
            # connection: it closes them after each run).
            tasks_after, fds_after, rss_after = await settle(chain)
            growth = (tasks_after - tasks_before, fds_after - fds_before, rss_after - rss_before)
            print(f"growth: tasks {growth[0]}, fds {growth[1]}, RSS {growth[2] / MIB:.1f} MiB")
            assert tasks_after <= tasks_before + 2, growth
            assert fds_after <= fds_before + 8, growth
            assert rss_after - rss_before < 64 * MIB, growth


# -- SECURITY 30 at full size -------------------------------------------------------------------


@pytest.mark.slow
async def test_1_gib_up_and_down_in_bounded_memory(make_chain: ChainFactory) -> None:
    size = 1024 * MIB
    chain = await make_chain(listen={"max_body_bytes": 2 * size})
    expected = stream_sha256(size)
    async with chain.request("GET", DEMO + "/stream/?bytes=1000") as response:
        await response.read()
    gc.collect()
    before = rss_bytes()
    peak = before

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, rss_bytes())
            await asyncio.sleep(0.02)

    async def upload() -> AsyncIterator[bytes]:
        for chunk in stream_chunks(size):
            yield chunk

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    try:
        async with chain.request("PUT", DEMO + "/up", data=upload()) as response:
            assert response.status == 200
            await response.read()
        seen = chain.upstream.seen[-1]
        assert (seen.body_bytes, seen.body_sha256) == (size, expected)
        digest = hashlib.sha256()
        received = 0
        async with chain.request("GET", DEMO + f"/stream/?bytes={size}") as response:
            assert response.status == 200
            async for chunk in response.content.iter_chunked(256 * KIB):
                digest.update(chunk)
                received += len(chunk)
        assert (received, digest.hexdigest()) == (size, expected)
    finally:
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
    # Client, proxy and fake upstream share this process: the bound covers all three.
    assert peak - before < 50 * MIB, f"peak RSS growth {(peak - before) / MIB:.1f} MiB"
    assert time.monotonic() - started < 120  # a hang, not a speed check


# -- SECURITY 25: a thousand real fetches ----------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_token_fetches_never_reuse_a_jti(
    authserver: AuthServerHandle, partner_files: PartnerFiles, ca_file: Path
) -> None:
    # The fake refuses a reused jti (invalid_client), so each fetch succeeding proves it fresh.
    config = make_config(authserver.token_url, partner_files, ca_file)
    async with make_session(config) as session:
        provider = TokenProvider(config, load_credentials(config.client), session)
        try:
            for _ in range(1000):
                provider.invalidate(await provider.get(DEMO_SCOPES))
        finally:
            await provider.close()
    outcomes = {r.outcome for r in authserver.server.requests}
    assert outcomes == {"issued"}
    claims = [r.claims for r in authserver.server.requests if r.claims is not None]
    assert len({c["jti"] for c in claims}) == len(claims) == 1000
    for c in claims:
        assert c["iss"] == c["sub"] == CLIENT_ID
        assert c["aud"] == authserver.token_url
        assert 0 < c["exp"] - c["iat"] <= config.oauth.assertion_lifetime_s
