"""Own the command line: ``ksz-proxy <command>``; the only place that calls ``sys.exit``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Run the command line and return the exit code."""
    del argv
    print("ksz-proxy: not implemented yet", file=sys.stderr)
    return 1
