"""A fault-injecting TCP proxy for the tests, placed between ksz-proxy and a fake server.

TLS passes through byte for byte, so ksz-proxy still verifies the fake's certificate for
``127.0.0.1`` and the faults act on the TCP stream underneath: added latency, a bandwidth cap, a
reset (RST) or a half-close (FIN) once N bytes went one way, a black hole, and garbage instead of
the fake's answer -- raw (it breaks the TLS handshake) or, given a server TLS context, inside TLS
(it breaks HTTP). ``fault`` may be swapped at any time, also for connections already open; the
byte count a cut waits for starts again with each new ``Fault``. ``connections`` counts accepted
connections, that is how many attempts a request took; ``max_active`` the most open at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from dataclasses import dataclass
from typing import Literal

CHUNK = 64 * 1024
Direction = Literal["request", "answer"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Fault:
    """What the fault proxy does to the bytes; the default forwards them untouched.

    ``latency_s`` delays every chunk, both ways; ``bytes_per_s`` caps each direction;
    ``cut`` ("reset": RST both ways, "half_close": FIN to ksz-proxy and the fake's side closed)
    strikes once ``cut_after`` bytes went the ``cut_direction`` way; ``black_hole`` forwards
    nothing; ``garbage`` is answered instead of connecting to the fake (new connections only).
    """

    latency_s: float = 0.0
    bytes_per_s: float | None = None
    cut: Literal["reset", "half_close"] | None = None
    cut_after: int = 0
    cut_direction: Direction = "answer"
    black_hole: bool = False
    garbage: bytes | None = None


class FaultProxy:
    """Forward ``127.0.0.1:<port>`` to ``target_port`` on 127.0.0.1, applying ``fault``."""

    def __init__(self, target_port: int, *, tls: ssl.SSLContext | None = None) -> None:
        self.fault = Fault()
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.forwarded: dict[Direction, int] = {"request": 0, "answer": 0}
        self._target_port = target_port
        self._tls = tls  # only to speak garbage inside TLS
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        """Return the origin to give ksz-proxy (the fakes' certificate covers 127.0.0.1)."""
        return f"https://127.0.0.1:{self.port}"

    async def __aenter__(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            fault = self.fault
            if fault.garbage is not None:
                await self._garbage(reader, writer, fault.garbage)
            else:
                await self._pipe(reader, writer)
        except (ConnectionError, OSError, ssl.SSLError, asyncio.IncompleteReadError):
            pass  # either side went away: that is what the tests provoke
        except asyncio.CancelledError:
            pass  # closing; asyncio would log a cancelled connection handler as an error
        finally:
            self.active -= 1
            writer.transport.abort()
            self._handlers.discard(task)

    async def _garbage(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, garbage: bytes
    ) -> None:
        if self._tls is not None:
            await writer.start_tls(self._tls)
            async with asyncio.timeout(5):
                await reader.readuntil(b"\r\n\r\n")  # the request head, then nonsense back
        writer.write(garbage)
        await writer.drain()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await reader.read()

    async def _pipe(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection("127.0.0.1", self._target_port)
        try:
            cut = await self._both_ways(client_r, client_w, upstream_r, upstream_w)
            if cut == "half_close":
                client_w.write_eof()  # FIN to ksz-proxy, without a TLS close_notify
                upstream_w.transport.abort()
                await client_r.read()  # until ksz-proxy closes its side
            elif cut == "reset":
                _reset(client_w)
                _reset(upstream_w)
        finally:
            upstream_w.transport.abort()

    async def _both_ways(
        self,
        client_r: asyncio.StreamReader,
        client_w: asyncio.StreamWriter,
        upstream_r: asyncio.StreamReader,
        upstream_w: asyncio.StreamWriter,
    ) -> str | None:
        """Pump both directions until both end, or until one cuts; return the cut."""
        pending = {
            asyncio.create_task(self._pump(client_r, upstream_w, "request")),
            asyncio.create_task(self._pump(upstream_r, client_w, "answer")),
        }
        cut: str | None = None
        try:
            while pending and cut is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    # A broken side (RST, ...) is passed on as a reset of the other one.
                    cut = "reset" if task.exception() is not None else task.result() or cut
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return cut

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, direction: Direction
    ) -> str | None:
        """Copy one direction; return the cut ("reset", "half_close") when one strikes."""
        current, counted = self.fault, 0
        while True:
            data = await source.read(CHUNK)
            fault = self.fault
            if fault is not current:
                current, counted = fault, 0
            if not data:
                with contextlib.suppress(OSError):
                    sink.write_eof()  # an orderly half-close passes through
                return None
            if fault.black_hole:
                continue
            cutting = fault.cut is not None and fault.cut_direction == direction
            if cutting and counted + len(data) >= fault.cut_after:
                await self._send(sink, data[: fault.cut_after - counted], fault, direction)
                return fault.cut
            counted += len(data)
            await self._send(sink, data, fault, direction)

    async def _send(
        self, sink: asyncio.StreamWriter, data: bytes, fault: Fault, direction: Direction
    ) -> None:
        step = max(1, len(data))
        if fault.bytes_per_s is not None:
            step = max(1, int(fault.bytes_per_s / 20))  # 50 ms slices
        for start in range(0, len(data), step):
            if fault.latency_s:
                await asyncio.sleep(fault.latency_s)
            piece = data[start : start + step]
            sink.write(piece)
            await sink.drain()
            self.forwarded[direction] += len(piece)
            if fault.bytes_per_s is not None:
                await asyncio.sleep(len(piece) / fault.bytes_per_s)


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST (linger 0) instead of an orderly FIN."""
    sock = writer.transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
