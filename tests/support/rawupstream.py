"""A scripted HTTPS upstream on raw sockets: it records each request byte-exact and answers with
whatever bytes a test gives it -- also the malformed answers no real server library would send.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

# An answer: bytes to send (then keep the connection), or what to do instead.
Answer = bytes | Literal["close", "hang"]


@dataclass(slots=True)
class Seen:
    head: bytes
    body: bytes
    connection: int


@dataclass(slots=True)
class RawUpstream:
    """Answer every request with ``script(head)``: bytes to send, or close, or hang."""

    server_ssl: ssl.SSLContext | None
    script: Callable[[bytes], Answer] = lambda head: (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    resumed: list[bool] = field(default_factory=list)  # per TLS connection: was it resumed?
    read_body: bool = True
    close_after_answer: bool = False  # close once the answer is out (close-delimited bodies)
    port: int = 0
    tail: bytes = b""  # sent right after every answer (an appended answer, a body on 204)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def origin(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def __aenter__(self) -> RawUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.server_ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
        await asyncio.sleep(0.01)  # let the aborted transports close before the loop ends

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        number = self.connections
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            self.resumed.append(bool(ssl_object.session_reused))
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return
                body = await self._body(reader, head) if self.read_body else b""
                self.seen.append(Seen(head, body, number))
                answer = self.script(head)
                if answer == "close":
                    return
                if answer == "hang":
                    await asyncio.sleep(3600)
                    return
                if isinstance(answer, bytes):
                    writer.write(answer + self.tail)
                    await writer.drain()
                    if self.close_after_answer:
                        writer.close()
                        with contextlib.suppress(Exception):
                            await asyncio.wait_for(writer.wait_closed(), 1)
                        return
                    continue
        except (ConnectionError, ssl.SSLError):
            return
        finally:
            self._tasks.discard(task)
            writer.transport.abort()

    @staticmethod
    async def _body(reader: asyncio.StreamReader, head: bytes) -> bytes:
        lower = head.lower()
        if b"\r\ntransfer-encoding: chunked\r\n" in lower:
            parts: list[bytes] = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).strip(), 16)
                data = await reader.readexactly(size + 2)
                if size == 0:
                    return b"".join(parts)
                parts.append(data[:-2])
        for line in lower.split(b"\r\n"):
            if line.startswith(b"content-length:"):
                return await reader.readexactly(int(line.split(b":", 1)[1]))
        return b""


def answer(status: int = 200, body: bytes = b"ok", *headers: str, reason: str = "OK") -> bytes:
    """A well-formed answer with a Content-Length."""
    lines = [f"HTTP/1.1 {status} {reason}", *headers, f"Content-Length: {len(body)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
