"""Own the header rules of the forwarding path, as pure functions over multidicts.

Order matters and is fixed here: hop-by-hop headers (the fixed set plus every name listed in
``Connection``) go first, then the caller's ``Authorization``/``Proxy-Authorization`` and the
headers the proxy sets itself, and only then is exactly one ``Authorization: Bearer`` added -- so
``Connection: Authorization`` cannot remove the injected token.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
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

# Framing of the upstream answer is redone by the server side.
RESPONSE_DROP: Final = frozenset(istr(h) for h in ("Content-Length",))

_TRACE_ID_VALUE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,35}")
_TOKEN_SPLIT: Final = re.compile(r"[\s,]+")


def connection_listed(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> frozenset[istr]:
    """Return the header names listed in every ``Connection`` header."""
    names: set[istr] = set()
    for value in headers.getall("Connection", ()):
        names.update(istr(n) for n in _TOKEN_SPLIT.split(value) if n)
    return frozenset(names)


def strip_hop_by_hop(
    headers: CIMultiDictProxy[str] | CIMultiDict[str], extra_drop: Iterable[istr] = ()
) -> CIMultiDict[str]:
    """Return a copy without hop-by-hop headers, names listed in Connection and ``extra_drop``."""
    # istr hashes and compares like a plain str (case-sensitive), so "x-ksz-proxy-key" would
    # not be found in a set holding istr("X-KSZ-Proxy-Key"): compare lower-case names instead.
    names = (*HOP_BY_HOP, *connection_listed(headers), *extra_drop)
    drop = frozenset(name.lower() for name in names)
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in drop)


def trace_id_for(headers: CIMultiDictProxy[str] | CIMultiDict[str]) -> str:
    """Return the caller's BelGov-Trace-Id when it is one valid value, else a fresh UUID4."""
    values = headers.getall(TRACE_ID, ())
    if len(values) == 1 and _TRACE_ID_VALUE.fullmatch(values[0]):
        return values[0]
    return str(uuid.uuid4())


def upstream_request_headers(
    inbound: CIMultiDictProxy[str] | CIMultiDict[str],
    *,
    authorization: str,
    trace_id: str,
    content_length: int | None,
) -> CIMultiDict[str]:
    """Return the headers to send upstream: filtered, then exactly one Authorization added."""
    headers = strip_hop_by_hop(inbound, REQUEST_DROP)
    headers[TRACE_ID] = trace_id
    if content_length is not None:
        headers["Content-Length"] = str(content_length)
    headers["Authorization"] = authorization
    return headers


def downstream_response_headers(
    upstream: CIMultiDictProxy[str] | CIMultiDict[str],
) -> CIMultiDict[str]:
    """Return the upstream answer's headers to send back, without hop-by-hop and framing."""
    return strip_hop_by_hop(upstream, RESPONSE_DROP)
