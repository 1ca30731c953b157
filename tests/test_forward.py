"""The answer path of forward.py, end to end: small answers in one write, large ones streamed.

An answer of known length up to ``forward.CHUNK`` is read whole and sent with its headers in one
write; the bytes the caller sees, the access log's ``bytes_out``, HEAD and bodiless statuses, a
caller leaving (499) and an upstream failing inside such a body (502, nothing half-sent) are
checked here through a real chain over TLS.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import pytest

from proxy.forward import CHUNK
from proxy.sandbox.upstream import stream_chunks
from tests.support.chain import Chain, ChainFactory
from tests.support.config import DEMO
from tests.support.fakes import UpstreamHandle
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.metrics import samples


def access_records(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if r.name == "ksz_proxy.access"]


@pytest.mark.parametrize("size", [0, 1, 1000, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 7])
async def test_answers_of_every_size_arrive_whole_with_their_length(
    chain: Chain, caplog: pytest.LogCaptureFixture, size: int
) -> None:
    caplog.set_level(logging.INFO)
    async with chain.request("GET", f"{DEMO}/stream?bytes={size}") as response:
        body = await response.read()
        assert response.status == 200
        assert response.headers["Content-Length"] == str(size)
        assert "Transfer-Encoding" not in response.headers
        assert response.headers["Content-Type"] == "application/octet-stream"
    assert body == b"".join(stream_chunks(size))
    (record,) = access_records(caplog)
    assert record.bytes_out == size
    assert record.status == 200


async def test_a_chunked_small_answer_still_streams(chain: Chain) -> None:
    async with chain.request("GET", f"{DEMO}/stream?bytes=1000&chunked=1") as response:
        body = await response.read()
        assert response.status == 200
    assert body == b"".join(stream_chunks(1000))


async def test_head_and_bodiless_statuses_carry_no_body_and_keep_the_connection(
    chain: Chain,
) -> None:
    async with chain.request("HEAD", f"{DEMO}/stream?bytes=1000") as response:
        assert response.status == 200
        assert await response.read() == b""
    for status in (204, 304):
        async with chain.request("GET", f"{DEMO}/status/{status}") as response:
            assert response.status == status
            assert await response.read() == b""
    # The connection is still in step: a following answer is read whole.
    async with chain.request("GET", f"{DEMO}/stream?bytes=500") as response:
        assert await response.read() == b"".join(stream_chunks(500))


async def test_small_answers_keep_the_upstream_headers(chain: Chain) -> None:
    async with chain.request("GET", f"{DEMO}/headers-out") as response:
        await response.read()
        assert response.status == 200
        assert response.headers.getall("Set-Cookie") == [
            "a=1; Path=/; Secure; HttpOnly",
            "b=2; Path=/; Secure; HttpOnly",
        ]
        assert response.headers["X-End-To-End"] == "kept"
        assert "X-Secret-Hop" not in response.headers


async def test_a_caller_gone_before_a_small_answer_is_499_not_an_upstream_error(
    chain: Chain,
) -> None:
    _reader, writer = await asyncio.open_connection("127.0.0.1", chain.port)
    head = f"GET {DEMO}/stall?seconds=0.5 HTTP/1.1\r\nHost: 127.0.0.1:{chain.port}\r\n\r\n"
    writer.write(head.encode())
    await writer.drain()
    await asyncio.sleep(0.1)
    writer.transport.abort()
    await asyncio.sleep(0.1)
    async with asyncio.timeout(5):
        await chain.proxy.drain.idle.wait()
    async with chain.session.get(chain.proxy.admin_url + "/metrics") as response:
        metrics = await response.text()
    # Every (route, reason) series exists at 0 (Metrics._zero_series); none has counted.
    errors = [v for (n, _), v in samples(metrics).items() if n == "kszproxy_upstream_errors_total"]
    assert errors and not any(errors)
    assert f'kszproxy_requests_total{{method="GET",route="{DEMO}",status="499"}} 1.0' in metrics


async def test_a_fault_inside_a_small_body_is_502_and_nothing_half_sent(
    make_chain: ChainFactory, fake_upstream: UpstreamHandle, server_ssl: ssl.SSLContext
) -> None:
    async with FaultProxy(fake_upstream.served.port, tls=server_ssl) as fault:
        chain = await make_chain(upstream={"url": fault.url, "read_timeout_s": 1.0})
        # TLS passes through the fault proxy: the cut counts handshake and header bytes too,
        # and falls well inside the 60,000-byte body.
        fault.fault = Fault(cut="reset", cut_after=24 * 1024)
        async with chain.request("GET", f"{DEMO}/stream?bytes=60000") as response:
            problem = await response.json(content_type=None)
            assert response.status == 502
            assert response.content_type == "application/problem+json"
        assert problem["status"] == 502
        assert fault.connections == 1  # never resent
        fault.fault = Fault()
        async with chain.request("GET", f"{DEMO}/stream?bytes=500") as response:
            assert await response.read() == b"".join(stream_chunks(500))
