"""Own the header rules of the forwarding path, as pure functions over multidicts.

Order matters and is fixed here: hop-by-hop headers (the fixed set plus every name listed in
``Connection``) go first, then the caller's ``Authorization``/``Proxy-Authorization``, the headers
the proxy sets itself and the rewrite and identity headers some gateways act on (every
``X-Forwarded-*``, ``X-Original-URL`` ...), and only then is exactly one ``Authorization: Bearer``
added -- so ``Connection: Authorization`` cannot remove the injected token.

On the way back, a header whose value carries the token in use is removed (``remove_token``):
an upstream's debug header must not hand the caller the partner's token.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy, istr

TRACE_ID: Final = istr("BelGov-Trace-Id")

# RFC 9110 section 7.6.1 plus the old names still seen in the wild.
HOP_BY_HOP: Final = frozenset(
    istr(h)
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Proxy-Authenticate",
        "Proxy-Authorization",
    )
)

# Never passed upstream as sent: credentials of the caller, framing the client library redoes,
# forwarding claims the caller could forge, and the proxy's own shared secret.
REQUEST_DROP: Final = frozenset(
    istr(h)
    for h in (
        "Authorization",
        "Host",
        "Content-Length",
        "Expect",
        "Forwarded",
        "X-Forwarded-For",
        "X-Forwarded-Host",
        "X-Forwarded-Proto",
        "X-Forwarded-Port",
        "X-Forwarded-Prefix",
        "X-Forwarded-Server",
        "X-Real-IP",
        "X-KSZ-Proxy-Key",
        "BelGov-Trace-Id",
    )
)

# Headers that make some gateways re-route a request, change its method or re-identify its
# sender (SECURITY 43). Every ``X-Forwarded-*`` goes too, by prefix (``REQUEST_DROP_PREFIX``).
REWRITE_AND_IDENTITY: Final = frozenset(
    istr(h)
    for h in (
        # the target, rewritten (IIS URL Rewrite, Symfony, Zend, some API gateways)
        "X-Original-URL",
        "X-Rewrite-URL",
        "X-Original-URI",
        "X-Override-URL",
        # the method, overridden (a refused TRACE would come back as an override)
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        # the caller's address or host, as set by CDNs and load balancers
        "True-Client-IP",
        "X-Client-IP",
        "Client-IP",
        "X-Cluster-Client-IP",
        "X-Original-Forwarded-For",
        "X-Originating-IP",
        "X-Remote-IP",
        "X-Remote-Addr",
        "X-ProxyUser-IP",
        "CF-Connecting-IP",
        "Fastly-Client-IP",
        "X-Host",
        "X-Original-Host",
        # the caller's TLS client certificate, as terminating proxies pass it on
        "X-Client-Cert",
        "X-SSL-Client-Cert",
        "SSL-Client-Cert",
        "X-ARR-ClientCert",
        "Client-Cert",
        "Client-Cert-Chain",
    )
)
REQUEST_DROP_PREFIX: Final = "x-forwarded-"

# Framing of the upstream answer is redone by the server side.
RESPONSE_DROP: Final = frozenset(istr(h) for h in ("Content-Length",))

# The same names in lower case, computed once (see _filtered).
_HOP_LOWER: Final = frozenset(name.lower() for name in HOP_BY_HOP)
_REQUEST_DROP_LOWER: Final = (
    _HOP_LOWER
    | {name.lower() for name in REQUEST_DROP}
    | {name.lower() for name in REWRITE_AND_IDENTITY}
)
_RESPONSE_DROP_LOWER: Final = _HOP_LOWER | {name.lower() for name in RESPONSE_DROP}

_TRACE_ID_VALUE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,35}")
_TOKEN_SPLIT: Final = re.compile(r"[\s,]+")


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[istr]:
    """Return the header names listed in every ``Connection`` header."""
    return frozenset(istr(n) for n in _listed_names(headers.getall("Connection", ())))


def _listed_names(values: Iterable[str]) -> Iterator[str]:
    """Yield the names in comma- or space-separated header values."""
    for value in values:
        yield from (n for n in _TOKEN_SPLIT.split(value) if n)


def strip_hop_by_hop(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra_drop: Iterable[istr] = ()
) -> CIMultiDict[str]:
    """Return a copy without hop-by-hop headers, names listed in Connection and ``extra_drop``."""
    return _filtered(headers, _HOP_LOWER.union(name.lower() for name in extra_drop))


def _filtered(
    headers: CIMultiDictProxy[str] | CIMultiDict[str],
    drop_lower: frozenset[str],
    drop_prefix: str | None = None,
) -> CIMultiDict[str]:
    """Return a copy without the names in ``drop_lower``, starting with ``drop_prefix`` (lower
    case) or listed in Connection."""
    # istr hashes and compares like a plain str (case-sensitive), so "x-ksz-proxy-key" would
    # not be found in a set holding istr("X-KSZ-Proxy-Key"): compare lower-case names instead.
    if "Connection" in headers:
        # "keep-alive" (most servers' answer) names a header that is dropped anyway: skip the
        # split for any value that is one such name.
        listed = [v for v in headers.getall("Connection") if v.strip().lower() not in drop_lower]
        if listed:
            drop_lower = drop_lower.union(n.lower() for n in _listed_names(listed))
    if drop_prefix is None:
        return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop_lower])
    return CIMultiDict(
        [
            (k, v)
            for k, v in headers.items()
            if (low := k.lower()) not in drop_lower and not low.startswith(drop_prefix)
        ]
    )


def trace_id_for(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str:
    """Return the caller's BelGov-Trace-Id when it is one valid value, else a fresh UUID4."""
    if TRACE_ID in headers:
        values = headers.getall(TRACE_ID)
        if len(values) == 1 and _TRACE_ID_VALUE.fullmatch(values[0]):
            return values[0]
    return new_trace_id()


class _RandomHex:
    """Hex digits from os.urandom, read 4 KiB at a time instead of 16 bytes per trace id.

    The same randomness as ``uuid.uuid4()``, with one system call per 256 ids. A forked worker
    (``listen.workers``) starts with an empty buffer of its own, so no two processes hand out
    the same digits.
    """

    def __init__(self) -> None:
        self._digits = ""
        self._at = 0
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._digits, self._at = "", 0

    def take32(self) -> str:
        """Return 32 random hex digits (128 bits)."""
        at = self._at
        if at + 32 > len(self._digits):
            self._digits, at = os.urandom(4096).hex(), 0
        self._at = at + 32
        return self._digits[at : at + 32]


_RANDOM: Final = _RandomHex()
# The UUID variant digit (10xx in binary) for each possible random hex digit.
_VARIANT: Final = {d: "89ab"[int(d, 16) & 3] for d in "0123456789abcdef"}


def new_trace_id() -> str:
    """Return a random UUID4 string, as str(uuid.uuid4()) writes one (version 4, RFC 4122)."""
    x = _RANDOM.take32()
    return f"{x[:8]}-{x[8:12]}-4{x[13:16]}-{_VARIANT[x[16]]}{x[17:20]}-{x[20:]}"


def upstream_request_headers(
    inbound: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    authorization: str,
    trace_id: str,
    content_length: int | None,
) -> CIMultiDict[str]:
    """Return the headers to send upstream: filtered, then exactly one Authorization added."""
    headers = _filtered(inbound, _REQUEST_DROP_LOWER, REQUEST_DROP_PREFIX)
    headers[TRACE_ID] = trace_id
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    headers["Authorization"] = authorization
    return headers


def downstream_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str],
) -> CIMultiDict[str]:
    """Return the upstream answer's headers to send back, without hop-by-hop and framing."""
    return _filtered(upstream, _RESPONSE_DROP_LOWER)


def remove_token(headers: CIMultiDict[str], token: str) -> int:
    """Remove every header whose value contains ``token``; return how many were removed."""
    if not token:
        return 0
    kept = [(name, value) for name, value in headers.items() if token not in value]
    removed = len(headers) - len(kept)
    if removed:
        headers.clear()
        headers.extend(kept)
    return removed
