"""``python -m proxy run`` in a subprocess, as operators run it; its stderr kept for assertions."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

ROOT: Final = Path(__file__).resolve().parent.parent.parent


START_TIMEOUT_S: Final = 20.0


@dataclass(slots=True)
class ProxyProcess:
    """A running ``ksz-proxy run`` and everything it wrote on stderr so far."""

    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    proxy_url: str = ""
    admin_url: str = ""

    @property
    def entries(self) -> list[dict[str, Any]]:
        """Return the stderr lines parsed as JSON (JSON log format only)."""
        return [json.loads(line) for line in self.lines]

    async def wait_line(self, predicate: Callable[[str], bool], timeout_s: float = 10.0) -> str:
        """Return the first stderr line matching ``predicate``, waiting for it if need be."""
        async with asyncio.timeout(timeout_s):
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                if self.process.returncode is not None and not self.lines:
                    raise AssertionError("the proxy exited without a line")
                await asyncio.sleep(0.02)

    async def wait_entry(self, message: str, timeout_s: float = 10.0) -> dict[str, Any]:
        """Return the first JSON log entry whose message starts with ``message``."""

        def match(line: str) -> bool:
            return bool(json.loads(line)["message"].startswith(message))

        return dict(json.loads(await self.wait_line(match, timeout_s)))

    def send(self, signum: int) -> None:
        """Send ``signum`` to the proxy process."""
        self.process.send_signal(signum)

    async def exit_code(self, timeout_s: float = 15.0) -> int:
        """Wait for the process to end and return its exit code."""
        async with asyncio.timeout(timeout_s):
            return await self.process.wait()


async def _spawn(*args: str | Path) -> asyncio.subprocess.Process:
    """Start ``python -m proxy ARGS`` from the repository root, stderr piped, stdout dropped."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        *map(str, args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )


async def _drain(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode("utf-8", "replace").rstrip("\n"))


@asynccontextmanager
async def run_proxy(
    config: Path, *, log_format: str = "json", log_level: str = "info"
) -> AsyncIterator[ProxyProcess]:
    """Start ``python -m proxy run -c config``; yield once it logged its URLs; always kill it."""
    process = await _spawn(
        "--log-format", log_format, "--log-level", log_level, "run", "-c", config
    )
    assert process.stderr is not None
    running = ProxyProcess(process=process)
    reader = asyncio.create_task(_drain(process.stderr, running.lines))
    try:
        started = await running.wait_line(lambda line: "ksz-proxy started" in line, START_TIMEOUT_S)
        if log_format == "json":
            entry = json.loads(started)
            running.proxy_url, running.admin_url = entry["proxy"], entry["admin"]
        else:
            running.proxy_url = _text_field(started, "proxy")
            running.admin_url = _text_field(started, "admin")
        yield running
    finally:
        if process.returncode is None:
            process.kill()
        with suppress(TimeoutError):
            async with asyncio.timeout(10):
                await process.wait()
        with suppress(TimeoutError):
            async with asyncio.timeout(5):
                await reader


def _text_field(line: str, name: str) -> str:
    match = re.search(rf"\b{name}=(\S+)", line)
    assert match is not None, line
    return match.group(1)


async def run_to_exit(config: Path) -> tuple[int, list[str]]:
    """Run ``python -m proxy run -c config`` that is expected to exit; return code and stderr."""
    process = await _spawn("run", "-c", config)
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            _out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode is not None
    return process.returncode, err.decode().splitlines()


async def wait_ready(session: aiohttp.ClientSession, proxy: ProxyProcess) -> None:
    async with asyncio.timeout(10):
        while True:
            async with session.get(proxy.admin_url + "/readyz") as response:
                if response.status == 200:
                    return
            await asyncio.sleep(0.02)


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as response:
        return response.status, await response.read()


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
