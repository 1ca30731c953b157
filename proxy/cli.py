"""Own the command line: ``ksz-proxy <command>``; the only place that calls ``sys.exit``.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error (one line naming the key or file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from proxy import __version__, logs
from proxy.app import ParserError, reload_credentials, start
from proxy.config import DEFAULT_CONFIG_NAME, Config, load_config
from proxy.credentials import Credentials, check_algorithm, load_credentials
from proxy.errors import ConfigError, CredentialError

log = logging.getLogger("ksz_proxy.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def config_path(arg: str | None, environ: Mapping[str, str]) -> Path:
    """Return the config path: ``-c``, else ``$KSZ_PROXY_CONFIG``, else ``./ksz-proxy.toml``."""
    return Path(arg or environ.get("KSZ_PROXY_CONFIG") or DEFAULT_CONFIG_NAME)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksz-proxy",
        description="Local authenticating sidecar for the KSZ-BCSS REST APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ksz-proxy {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument("--log-format", default="json", choices=["json", "text"])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the proxy")
    run.add_argument(
        "-c", "--config", help=f"config file (default $KSZ_PROXY_CONFIG or ./{DEFAULT_CONFIG_NAME})"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    args = _parser().parse_args(argv)
    logs.setup(args.log_level, args.log_format)
    try:
        if args.command == "run":
            return _run(args)
    except (ConfigError, CredentialError) as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    except ParserError as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_USAGE


def load(path: Path, environ: Mapping[str, str]) -> tuple[Config, Credentials]:
    """Load and check the configuration and the credentials it names."""
    config = load_config(path, environ)
    credentials = load_credentials(config.client)
    check_algorithm(credentials, config.oauth.algorithm)
    return config, credentials


def _run(args: argparse.Namespace) -> int:
    config, credentials = load(config_path(args.config, os.environ), os.environ)
    return _loop_run(_serve(config, credentials))


async def _serve(config: Config, credentials: Credentials) -> int:
    drain_s = config.listen.drain_timeout_s
    running = await start(config, credentials, drain_s=drain_s)
    log.info(
        "ksz-proxy started",
        extra={
            "version": __version__,
            "proxy": running.proxy_url,
            "admin": running.admin_url,
            "environment": config.environment,
            "channel": config.channel,
            "token_url": config.oauth.token_url or config.oauth.discovery_url,
            "upstream_url": config.upstream.url,
            "routes": " ".join(r.prefix for r in config.routes),
            "client_id": config.client.id,
            "certificate_subject": credentials.subject,
            "certificate_not_after": credentials.not_after.isoformat(),
            "certificate_days_left": credentials.days_left(),
        },
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_credentials, running)
    try:
        await stop.wait()
        log.info("stopping: draining in-flight requests", extra={"drain_s": drain_s})
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        await running.close()
    log.info("ksz-proxy stopped")
    return EXIT_OK


def _loop_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return int(uvloop.run(coro))
