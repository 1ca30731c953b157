"""Own the command line: ``ksz-proxy <command>``; the only place that calls ``sys.exit``.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error (one line naming the key or file).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from proxy import __version__, logs, workers
from proxy.app import ParserError, authority, reload_credentials, start
from proxy.config import DEFAULT_CONFIG_NAME, Config, config_path
from proxy.credentials import Credentials, load_setup
from proxy.errors import ConfigError, CredentialError

log = logging.getLogger("ksz_proxy.cli")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksz-proxy",
        description="Local authenticating sidecar for the KSZ-BCSS REST APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ksz-proxy {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error"],
        help="log threshold (default: info for run, warning otherwise)",
    )
    parser.add_argument(
        "--log-format",
        default=None,
        choices=["json", "text"],
        help="log format on stderr (default: json for run, text otherwise)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default: $KSZ_PROXY_CONFIG, else ./{DEFAULT_CONFIG_NAME})"

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help=config_help)

    check = commands.add_parser("check", help="walk the KSZ onboarding steps and report each")
    check.add_argument("-c", "--config", help=config_help)
    check.add_argument("--api", help="API path prefix to call /health on (default: every route)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")

    cert = commands.add_parser("cert-info", help="show a certificate or keystore")
    source = cert.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", help="take the client credentials of this config")
    source.add_argument("file", nargs="?", help=".p12/.pfx keystore or PEM certificate")
    cert.add_argument("--password-file", help="file holding the keystore password")
    cert.add_argument("--password-env", help="environment variable holding the password")
    cert.add_argument("--export-crt", metavar="PATH", help="write the public certificate (PEM)")

    csr = commands.add_parser("csr", help="generate a private key and a certificate request")
    csr.add_argument("--subject", required=True, help='e.g. "CN=partner-acpt,O=Partner,C=BE"')
    csr.add_argument("--key-type", choices=["rsa", "ec"], default="rsa")
    csr.add_argument("--key-out", required=True, metavar="KEY")
    csr.add_argument("--csr-out", required=True, metavar="CSR")
    csr.add_argument(
        "--encrypt", action="store_true", help="encrypt the key (password from --password-*)"
    )
    csr.add_argument("--password-file", help="file holding the key password")
    csr.add_argument("--password-env", help="environment variable holding the key password")

    token = commands.add_parser("token", help="fetch a token and describe it")
    token.add_argument("-c", "--config", help=config_help)
    token.add_argument("--scope", action="append", default=[], help="scope (repeatable)")
    token.add_argument("--show-token", action="store_true", help="also print the token itself")

    sandbox = commands.add_parser("sandbox", help="run a fake KSZ with the proxy in front of it")
    sandbox.add_argument("--port", type=int, default=None, help="proxy port (default 8080)")
    sandbox.add_argument("--admin-port", type=int, default=None, help="admin port (default 9090)")
    sandbox.add_argument(
        "--demo", action="store_true", help="make one call through the proxy, print it, exit"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    args = _parser().parse_args(argv)
    is_run = args.command == "run"
    logs.setup(
        args.log_level or ("info" if is_run else "warning"),
        args.log_format or ("json" if is_run else "text"),
    )
    try:
        return _dispatch(args)
    except (ConfigError, CredentialError) as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    except ParserError as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(args)
    if args.command == "sandbox":
        from proxy.sandbox import demo

        demo_mode = bool(args.demo)
        # The demo picks free ports unless told otherwise, so it runs beside anything.
        port = args.port if args.port is not None else (0 if demo_mode else 8080)
        admin = args.admin_port if args.admin_port is not None else (0 if demo_mode else 9090)
        return _loop_run(demo.run(port=port, admin_port=admin, demo=demo_mode, out=sys.stdout))
    return _onboarding(args)


def _onboarding(args: argparse.Namespace) -> int:
    """Unpack the command line for an onboarding command and run it (imported only here)."""
    from proxy.onboarding.files import PasswordSource

    environ = os.environ
    if args.command == "csr":
        from proxy.onboarding.csr import csr

        return csr(
            subject=args.subject,
            key_type=args.key_type,
            key_out=args.key_out,
            csr_out=args.csr_out,
            encrypt=args.encrypt,
            password=PasswordSource(file=args.password_file, env=args.password_env),
            out=sys.stdout,
        )
    config = config_path(args.config, environ)
    if args.command == "check":
        from proxy.onboarding.check import check

        return check(
            config=config, api=args.api, as_json=args.json, environ=environ, out=sys.stdout
        )
    if args.command == "token":
        from proxy.onboarding.token import token

        return token(
            config=config,
            scopes=args.scope,
            show_token=args.show_token,
            environ=environ,
            out=sys.stdout,
        )
    from proxy.onboarding.certinfo import cert_info

    return cert_info(
        file=args.file,
        config=config,
        password=PasswordSource(file=args.password_file, env=args.password_env),
        export_crt=args.export_crt,
        environ=environ,
        out=sys.stdout,
    )


def _run(args: argparse.Namespace) -> int:
    config, credentials = load_setup(config_path(args.config, os.environ), os.environ)
    if config.listen.workers > 1:
        # Fork before any event loop or thread exists; see proxy.workers.
        supervisor = workers.fork_workers(config, credentials, _serve, _loop_run)
        proxy_url = f"http://{authority(config.listen.host, config.listen.port)}"
        return _loop_run(workers.supervise(supervisor, _summary(config, credentials, proxy_url)))
    return _loop_run(_serve(config, credentials))


def _summary(config: Config, credentials: Credentials, proxy_url: str) -> dict[str, Any]:
    """Return the fields of the start-up line: what runs, against what, with which certificate."""
    return {
        "version": __version__,
        "proxy": proxy_url,
        "environment": config.environment,
        "channel": config.channel,
        "token_url": config.oauth.token_url or config.oauth.discovery_url,
        "upstream_url": config.upstream.url,
        "routes": " ".join(r.prefix for r in config.routes),
        "client_id": config.client.id,
        "certificate_subject": credentials.subject,
        "certificate_not_after": credentials.not_after.isoformat(),
        "certificate_days_left": credentials.days_left(),
    }


async def _serve(
    config: Config, credentials: Credentials, *, worker: workers.WorkerSetup | None = None
) -> int:
    drain_s = config.listen.drain_timeout_s
    running = await start(
        config,
        credentials,
        drain_s=drain_s,
        admin_socket=worker.admin_socket if worker is not None else None,
    )
    # What start-up built (modules, keys, configuration) lives as long as the process: keep it
    # out of the collector's full passes, which otherwise pause the loop for over 10 ms each.
    gc.collect()
    gc.freeze()
    stop = asyncio.Event()
    watching: asyncio.Task[None] | None = None
    # With listen.workers, every line of a worker's own says which worker it is.
    who: dict[str, object] = {} if worker is None else {"worker": worker.index}
    if worker is None:
        summary = _summary(config, credentials, running.proxy_url)
        log.info("ksz-proxy started", extra={**summary, "admin": running.admin_url})
    else:
        log.info("worker started", extra={**who, "pid": os.getpid()})
        watching = asyncio.create_task(workers.watch_supervisor(worker, stop))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload_credentials, running)
    try:
        await stop.wait()
        log.info("stopping: draining in-flight requests", extra={"drain_s": drain_s, **who})
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        if watching is not None:
            watching.cancel()
        await running.close()
    log.info("ksz-proxy stopped" if worker is None else "worker stopped", extra=who)
    return EXIT_OK


def _loop_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        return asyncio.run(coro)
    return int(uvloop.run(coro))
