"""Proxy-made answers an operator can act on (issue 16 item 6): the access line, 421, non-ASCII.

Real requests over a raw socket to the proxy in front of the fakes (``chain``); the access line is
taken from the ``ksz_proxy.access`` logger as the handler writes it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from tests.support.chain import Chain
from tests.support.config import DEMO
from tests.support.rawhttp import assert_problem, build, exchange


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def access_lines() -> Iterator[list[logging.LogRecord]]:
    # A second handler on the logger itself: write_request then takes the ordinary logging path.
    logger = logging.getLogger("ksz_proxy.access")
    handler, level = _Lines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_a_proxy_made_answer_logs_its_reason_and_the_bytes_sent(
    chain: Chain, access_lines: list[logging.LogRecord]
) -> None:
    result = await exchange(chain.port, build("GET", "/REST/nowhere/x", chain.port))
    assert_problem(result.only, 404, "no_route")
    (line,) = [r for r in access_lines if getattr(r, "path", None) == "/REST/nowhere/x"]
    assert line.status == 404  # type: ignore[attr-defined]
    assert line.reason == "no_route"  # type: ignore[attr-defined]
    assert line.bytes_out == len(result.only.body) > 0  # type: ignore[attr-defined]
    forwarded = await exchange(chain.port, build("GET", DEMO + "/fine", chain.port))
    assert forwarded.only.status == 200
    (line,) = [r for r in access_lines if getattr(r, "path", None) == DEMO + "/fine"]
    assert line.reason is None  # type: ignore[attr-defined]


async def test_a_refused_host_is_named_sanitised_and_bounded(chain: Chain) -> None:
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, host="evil.example"))
    assert_problem(result.only, 421, "host_not_allowed")
    detail = result.only.problem()["detail"]
    assert detail.startswith('Host "evil.example" is not served here')
    assert "listen.allowed_hosts" in detail
    hostile = "a<script>" + "b" * 200
    result = await exchange(chain.port, build("GET", DEMO + "/x", chain.port, host=hostile))
    detail = result.only.problem()["detail"]
    assert '"a?script?' in detail and "<" not in detail
    assert "b" * 65 not in detail and '..." is not served' in detail
    assert chain.upstream.count == 0


async def test_raw_non_ascii_in_the_target_says_to_percent_encode(chain: Chain) -> None:
    data = (
        b"GET " + DEMO.encode() + b"/caf\xc3\xa9 HTTP/1.1\r\nHost: 127.0.0.1:"
        + str(chain.port).encode() + b"\r\n\r\n"
    )  # fmt: skip
    result = await exchange(chain.port, data)
    assert_problem(result.only, 400, "bad_target")
    problem = json.loads(result.only.body)
    assert "percent-encoded" in problem["detail"] and "%C3%A9" in problem["detail"]
    assert result.only.headers["BelGov-Trace-Id"]
    assert chain.upstream.count == 0
