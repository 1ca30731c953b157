"""Own the command line: ``ksz-proxy <command>``; the only place that calls ``sys.exit``.

Exit codes: 0 ok, 1 failure, 2 usage or configuration error (one line naming the key or file).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Coroutine, Mapping
from pathlib import Path
from typing import Any

from proxy import __version__, logs, workers
from proxy.clients import load_setup
from proxy.config import DEFAULT_CONFIG_NAME, config_path
from proxy.errors import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    CredentialError,
    ParserError,
)
from proxy.server import WorkerSetup, authority, serve, summary

__all__ = ["EXIT_FAILURE", "EXIT_OK", "EXIT_USAGE", "main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ksz-proxy",
        description="Local authenticating sidecar for the KSZ-BCSS REST APIs.",
    )
    parser.add_argument("--version", action="version", version=f"ksz-proxy {__version__}")
    _log_options(parser, None)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"config file (default: $KSZ_PROXY_CONFIG, else ./{DEFAULT_CONFIG_NAME})"

    run = commands.add_parser("run", help="run the proxy")
    run.add_argument("-c", "--config", help=config_help)

    check = commands.add_parser("check", help="walk the KSZ onboarding steps and report each")
    check.add_argument("-c", "--config", help=config_help)
    check.add_argument("--api", help="API path prefix to call /health on (default: every route)")
    check.add_argument("--json", action="store_true", help="print the result as JSON")
    check.add_argument("--client", help="check this client only (default: every client)")

    cert = commands.add_parser("cert-info", help="show a certificate or keystore")
    # Without FILE or -c, and no configuration to fall back on, it shows how to call it.
    cert.set_defaults(usage=cert.format_usage())
    source = cert.add_mutually_exclusive_group()
    source.add_argument("-c", "--config", help="take the client credentials of this config")
    source.add_argument("file", nargs="?", help=".p12/.pfx keystore or PEM certificate")
    cert.add_argument("--password-file", help="file holding the keystore password")
    cert.add_argument("--password-env", help="environment variable holding the password")
    cert.add_argument("--export-crt", metavar="PATH", help="write the public certificate (PEM)")

    csr = commands.add_parser("csr", help="generate a private key and a certificate request")
    csr.add_argument("--subject", required=True, help='e.g. "CN=partner-acpt,O=Partner,C=BE"')
    csr.add_argument(
        "--key-type",
        choices=["rsa", "ec"],
        default="rsa",
        help="rsa: RSA 3072 (default); ec: EC P-256",
    )
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
    token.add_argument(
        "--client", help='fetch for this client (default: "default", or the only client)'
    )

    keystore = commands.add_parser(
        "keystore",
        help="build the PKCS#12 keystore (.p12) from a PEM key and its certificate",
        description=(
            "Join the private key made by `ksz-proxy csr` and the certificate the CA returned "
            "into a PKCS#12 keystore (mode 0600) for client.pkcs12. The pair is checked as the "
            "proxy checks it. An existing --password-file is used as the keystore password; a "
            "missing one is created with a new random password (mode 0600)."
        ),
    )
    keystore.add_argument("--key", required=True, metavar="KEY", help="PEM private key")
    keystore.add_argument(
        "--cert", required=True, metavar="CRT", help="its certificate (PEM or DER, with any chain)"
    )
    keystore.add_argument("--out", required=True, metavar="P12", help="keystore to create")
    keystore.add_argument(
        "--password-file",
        required=True,
        metavar="FILE",
        help="keystore password (created with a random password when missing)",
    )
    keystore.add_argument(
        "--key-password-file", metavar="FILE", help="password of KEY when it is encrypted"
    )

    sandbox = commands.add_parser(
        "sandbox",
        help="run a fake KSZ with the proxy in front of it",
        description="Run a fake KSZ (authorization server and REST API) on loopback with the proxy "
        "in front of it. The sandbox never uses a forward proxy, even when HTTPS_PROXY is set; "
        "to reach the real KSZ through your organisation's proxy, configure [egress] "
        "(docs/configuration.md) and verify with `ksz-proxy check`.",
    )
    sandbox.add_argument("--port", type=int, default=None, help="proxy port (default 8080)")
    sandbox.add_argument("--admin-port", type=int, default=None, help="admin port (default 9090)")
    sandbox.add_argument(
        "--demo",
        action="store_true",
        help="make two calls through the proxy (a health check and an echo), print them, exit",
    )
    for sub in commands.choices.values():
        # Also after the command (`ksz-proxy sandbox --log-level info`); given there, it wins.
        _log_options(sub, argparse.SUPPRESS)
    return parser


def _log_options(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="log threshold (default: info for run, warning otherwise)",
    )
    parser.add_argument(
        "--log-format",
        default=default,
        choices=["json", "text"],
        help="log format on stderr (default: json for run, text otherwise)",
    )


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    args = _parser().parse_args(argv)
    is_run = args.command == "run"
    logs.setup(
        args.log_level or ("info" if is_run else "warning"),
        args.log_format or ("json" if is_run else "text"),
        pinned=args.log_level is not None,
    )
    try:
        code = _dispatch(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below
        return code
    except BrokenPipeError:
        return _reader_gone()
    except (ConfigError, CredentialError) as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_USAGE
    except ParserError as exc:
        print(f"ksz-proxy: {exc.detail}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return EXIT_FAILURE


def _reader_gone() -> int:
    """Exit quietly when stdout's reader left early (``ksz-proxy check | head -1``).

    Output still buffered would fail again when the interpreter flushes it at exit, so stdout
    is pointed at /dev/null first (as the Python documentation on SIGPIPE advises).
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
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
    if args.command == "keystore":
        from proxy.onboarding.keystore import keystore

        return keystore(
            key=args.key,
            cert=args.cert,
            keystore_out=args.out,
            password_file=args.password_file,
            key_password_file=args.key_password_file,
            out=sys.stdout,
        )
    config = config_path(args.config, environ)
    if args.command == "check":
        from proxy.onboarding.check import check

        return check(
            config=config,
            api=args.api,
            as_json=args.json,
            environ=environ,
            out=sys.stdout,
            client=args.client,
        )
    if args.command == "token":
        from proxy.onboarding.token import token

        return token(
            config=config,
            scopes=args.scope,
            show_token=args.show_token,
            environ=environ,
            out=sys.stdout,
            client=args.client,
        )
    if args.command == "cert-info" and args.file is None and not _config_at_hand(args, environ):
        print(args.usage.rstrip(), file=sys.stderr)
        print(
            "ksz-proxy cert-info: give a FILE (.p12, .pfx, .crt, .pem) or -c CONFIG",
            file=sys.stderr,
        )
        return EXIT_USAGE
    from proxy.onboarding.certinfo import cert_info

    return cert_info(
        file=args.file,
        config=config,
        password=PasswordSource(file=args.password_file, env=args.password_env),
        export_crt=args.export_crt,
        environ=environ,
        out=sys.stdout,
    )


def _config_at_hand(args: argparse.Namespace, environ: Mapping[str, str]) -> bool:
    """Return True when -c, $KSZ_PROXY_CONFIG or ./ksz-proxy.toml names a configuration."""
    return (
        bool(args.config or environ.get("KSZ_PROXY_CONFIG")) or Path(DEFAULT_CONFIG_NAME).exists()
    )


def _run(args: argparse.Namespace) -> int:
    config, credentials = load_setup(config_path(args.config, os.environ), os.environ)
    logs.use_config_level(config.log.level)
    if config.listen.workers <= 1:
        return _loop_run(serve(config, credentials))

    def run_worker(setup: WorkerSetup) -> int:
        try:
            return _loop_run(serve(config, credentials, worker=setup))
        except ConfigError as exc:
            print(f"ksz-proxy: worker {setup.index}: {exc.detail}", file=sys.stderr)
            return EXIT_USAGE
        except KeyboardInterrupt:
            return EXIT_FAILURE  # Ctrl-C during start-up, before the worker's own handlers

    # Fork before any event loop or thread exists; see proxy.workers.
    supervisor = workers.fork_workers(config, run_worker)
    proxy_url = f"http://{authority(config.listen.host, config.listen.port)}"
    code = _loop_run(workers.supervise(supervisor, summary(config, credentials, proxy_url)))
    if supervisor.refused is not None:
        print(f"ksz-proxy: {supervisor.refused.detail}", file=sys.stderr)
    return code


def _loop_run(coro: Coroutine[Any, Any, int]) -> int:
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
            return asyncio.run(coro)
        return int(uvloop.run(coro))
    finally:
        # Lines still batched when the loop ended (its flush timer can no longer fire) go out
        # before anything the command prints to stderr after it.
        for handler in logging.root.handlers:
            handler.flush()
