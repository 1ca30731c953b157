"""The request-smuggling corpus: raw request tails, and what each one must meet.

Each case is the part of a request after ``POST <path> HTTP/1.1`` and ``Host``: framing headers,
the blank line, a body. Two tests use it:

- ``test_hostile.py`` sends every case to the running proxy: each is answered 400, the
  connection closed, the upstream sees nothing (SECURITY 2, 44, 46);
- ``test_aiohttp_parser.py`` feeds every case to the installed aiohttp's C request parser and
  compares its verdict with the one recorded here for ``CHECKED_AIOHTTP``: an aiohttp upgrade
  that parses any case differently fails by name before it reaches production.

``parser`` says what aiohttp's C parser does alone: ``refused`` (it raises ``BadHttpMessage``,
aiohttp answers 400) or ``accepted`` (ksz-proxy's own rules refuse it: ``framing.py`` and
``inbound.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

# The aiohttp release whose parser verdicts are recorded below.
CHECKED_AIOHTTP: Final = "3.14.5"


@dataclass(frozen=True, slots=True)
class Case:
    tail: bytes
    parser: Literal["refused", "accepted"]


def _refused(tail: bytes) -> Case:
    return Case(tail=tail, parser="refused")


def _accepted(tail: bytes) -> Case:
    return Case(tail=tail, parser="accepted")


CORPUS: Final[dict[str, Case]] = {
    "cl_and_te": _refused(
        b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /x HTTP/1.1\r\n\r\n"
    ),
    "te_and_cl": _refused(b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    "two_lengths": _refused(b"Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
    "same_length_twice_comma": _refused(b"Content-Length: 5, 6\r\n\r\nhello!"),
    "te_chunked_identity": _refused(
        b"Transfer-Encoding: chunked, identity\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_xchunked": _refused(b"Transfer-Encoding: xchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "te_space_before_colon": _refused(
        b"Transfer-Encoding : chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_leading_space_line": _refused(
        b" Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_twice": _refused(
        b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_vertical_tab": _refused(b"Transfer-Encoding:\x0bchunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"),
    "obs_fold": _refused(b"X-Folded: a\r\n b\r\nContent-Length: 5\r\n\r\nhello"),
    "obs_fold_te": _refused(
        b"Transfer-Encoding: identity\r\n chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "bare_lf": _refused(b"Content-Length: 5\nX-A: b\r\n\r\nhello"),
    "bare_cr": _refused(b"Content-Length: 5\rX-A: b\r\n\r\nhello"),
    "nul_in_value": _refused(b"X-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello"),
    "length_plus": _refused(b"Content-Length: +5\r\n\r\nhello"),
    "length_minus": _refused(b"Content-Length: -5\r\n\r\nhello"),
    "length_two_numbers": _refused(b"Content-Length: 5 5\r\n\r\nhello"),
    "length_hex": _refused(b"Content-Length: 0x5\r\n\r\nhello"),
    "chunk_size_overflow": _refused(
        b"Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFFF1\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk_bare_lf": _refused(b"Transfer-Encoding: chunked\r\n\r\n5\nhello\n0\n\n"),
    # Accepted by the C parser; refused by ksz-proxy (issue 13).
    "te_identity_chunked": _accepted(
        b"Transfer-Encoding: identity, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_gzip_chunked": _accepted(
        b"Transfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    ),
    "chunk_extension_1_mib": _accepted(
        b"Transfer-Encoding: chunked\r\n\r\n5;e=" + b"a" * (1 << 20) + b"\r\nhello\r\n0\r\n\r\n"
    ),
    "underscore_in_name": _accepted(b"X_Forwarded_For: 10.0.0.1\r\nContent-Length: 5\r\n\r\nhello"),
    "latin1_value": _accepted(b"X-Name: caf\xe9\r\nContent-Length: 5\r\n\r\nhello"),
}
