"""Every aiohttp internal that ``proxy/_aiohttp.py`` leans on, checked on the installed aiohttp.

A failure here means aiohttp changed something ksz-proxy relies on: re-check the named use in
``proxy/_aiohttp.py`` before raising the version cap in ``pyproject.toml``.
"""

from __future__ import annotations

import asyncio
import inspect
import tomllib
from pathlib import Path

import aiohttp
from aiohttp import http_parser, web
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_writer import StreamWriter
from aiohttp.web_protocol import RequestHandler
from packaging.requirements import Requirement
from packaging.version import Version

from proxy import _aiohttp
from proxy.handler import ProxyServer

ROOT = Path(__file__).resolve().parent.parent


def test_installed_aiohttp_is_the_checked_series() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [Requirement(d) for d in project["dependencies"] if d.startswith("aiohttp")]
    assert len(pins) == 1
    assert pins[0].specifier.contains(Version(aiohttp.__version__)), (
        f"aiohttp {aiohttp.__version__} is outside {pins[0].specifier}: re-check _aiohttp.py"
    )
    assert any(spec.operator == "<" for spec in pins[0].specifier), "aiohttp must be capped"


def test_c_parser_is_recognised_by_its_module() -> None:
    # check_c_parser tells the parsers apart by the class's module name.
    assert http_parser.HttpRequestParser.__module__ == _aiohttp.C_PARSER_MODULE
    _aiohttp.check_c_parser()


async def test_stream_writer_counts_its_output_in_output_size() -> None:
    # answer_started and forget_interim_output read and reset StreamWriter.output_size.
    loop = asyncio.get_running_loop()
    writer = StreamWriter(BaseProtocol(loop), loop)
    assert writer.output_size == 0
    assert "self.output_size +=" in inspect.getsource(StreamWriter)
    writer.output_size = 42
    _aiohttp.forget_interim_output(writer)
    assert writer.output_size == 0


async def test_server_builds_its_connection_handler_from_loop_and_kwargs() -> None:
    # CustomHandlerServer.__call__ mirrors web.Server.__call__ with another RequestHandler class.
    assert "RequestHandler(self, loop=self._loop, **self._kwargs)" in inspect.getsource(
        web.Server.__call__
    )

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        del request
        return web.Response()

    server = _aiohttp.CustomHandlerServer(handler, lingering_time=0)
    assert server._loop is asyncio.get_running_loop()
    assert server._kwargs == {"lingering_time": 0}
    assert type(server()) is RequestHandler
    # The connection handler keeps its server as _manager (server_of reads it).
    connection = ProxyServer.connection_class(server, loop=server._loop)
    assert _aiohttp.server_of(connection) is server


def test_handle_error_keeps_its_signature() -> None:
    # handler._ProxyRequestHandler overrides handle_error; aiohttp calls it with these names.
    names = list(inspect.signature(RequestHandler.handle_error).parameters)
    assert names == ["self", "request", "status", "exc", "message"]


def test_request_handler_queues_parsed_requests_in_messages() -> None:
    # requests_queued(_since) and chunked_request_since read RequestHandler._messages, filled by
    # data_received.
    assert "_messages" in RequestHandler.__slots__
    assert "self._messages.append((msg, payload))" in inspect.getsource(
        RequestHandler.data_received
    )


async def test_http11_response_writes_its_status_line_in_write_headers() -> None:
    # Http11Response overrides StreamResponse._write_headers, the status-line step, and reads
    # _payload_writer and _send_headers_immediately as aiohttp's own version does.
    source = inspect.getsource(web.StreamResponse._write_headers)
    assert "status_line" in source
    assert "self._payload_writer" in source
    assert "self._send_headers_immediately" in source
    assert "await self._write_headers()" in inspect.getsource(web.StreamResponse._start)
