"""Run a real HTTP forward proxy for the egress tests: Debian's ``tinyproxy``.

``start_tinyproxy`` writes a configuration into a temporary folder (loopback only, Basic
authentication optional, CONNECT allowed to the given ports only), starts ``tinyproxy -d`` on a
free port and waits until it accepts connections. ``TinyProxy.connects()`` returns the
``host:port`` of every CONNECT it received, read from its log (``LogLevel Connect`` logs each
request line). The Makefile installs tinyproxy when it is missing (``make test-tools``); without
it the tests that need it are skipped, visibly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

TINYPROXY: Final = shutil.which("tinyproxy") or (
    "/usr/bin/tinyproxy" if Path("/usr/bin/tinyproxy").exists() else None
)
_CONNECT_LINE: Final = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/")


@dataclass(slots=True)
class TinyProxy:
    """A running tinyproxy: where it listens and what it logged."""

    host: str
    port: int
    log: Path
    process: asyncio.subprocess.Process

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def connects(self) -> list[str]:
        """Return the ``host:port`` of each CONNECT request received, in order."""
        text = self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""
        return _CONNECT_LINE.findall(text)

    def log_text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace") if self.log.exists() else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(
    folder: Path,
    port: int,
    *,
    connect_ports: Iterable[int],
    user: str | None,
    password: str | None,
) -> tuple[Path, Path]:
    """Write tinyproxy's configuration; return (configuration, log file)."""
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / "tinyproxy.log"
    lines = [
        f"Port {port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        f'LogFile "{log}"',
        "LogLevel Connect",
        "MaxClients 50",
        "Allow 127.0.0.1",
        "DisableViaHeader Yes",
        *(f"ConnectPort {p}" for p in connect_ports),
    ]
    if user is not None and password is not None:
        lines.append(f"BasicAuth {user} {password}")
    if os.geteuid() == 0:
        # As root tinyproxy would switch to nobody, who cannot write into pytest's private
        # temporary folders; the throw-away test proxy keeps running as root instead.
        lines += ["User root", "Group root"]
    conf = folder / "tinyproxy.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return conf, log


@contextlib.asynccontextmanager
async def start_tinyproxy(
    folder: Path,
    *,
    connect_ports: Iterable[int],
    user: str | None = None,
    password: str | None = None,
) -> AsyncIterator[TinyProxy]:
    """Start tinyproxy on 127.0.0.1; stop it (SIGTERM, then SIGKILL) on exit."""
    if TINYPROXY is None:
        raise RuntimeError("tinyproxy is not installed")
    port = free_port()
    conf, log = write_config(
        folder, port, connect_ports=connect_ports, user=user, password=password
    )
    process = await asyncio.create_subprocess_exec(
        TINYPROXY,
        "-d",
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    proxy = TinyProxy(host="127.0.0.1", port=port, log=log, process=process)
    try:
        await _wait_listening(proxy)
        yield proxy
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(5):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


async def _wait_listening(proxy: TinyProxy, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while True:
            if proxy.process.returncode is not None:
                raise RuntimeError(f"tinyproxy exited: {proxy.log_text()[-2000:]}")
            try:
                _reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
