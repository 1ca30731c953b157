"""Own the onboarding commands: check, cert-info, csr and token (being written)."""

from __future__ import annotations

import argparse
from typing import TextIO


def check(args: argparse.Namespace, out: TextIO) -> int:
    """Walk the onboarding steps and print a checklist."""
    del args
    print("not implemented yet", file=out)
    return 1


cert_info = csr = token = check
