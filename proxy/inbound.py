"""Own the inbound policy: which requests the proxy listener accepts, as pure functions.

Anyone who can reach the listener acts with the partner's legal authority at KSZ, so a request is
checked before anything else happens (no token fetched, nothing sent upstream):

- method: the usual REST methods only; CONNECT, TRACE and unknown methods get 405;
- version: HTTP/1.0 and HTTP/1.1 only; a fragment (``#``) anywhere in the target: 400;
- target: origin-form only (``/path?query``); absolute-form (``http://evil/x``) and ``*`` get 400;
- path: no dot segments (also ``..;`` and percent-encoded dots), no encoded slash or backslash,
  no backslash, no ``%00`` or control characters, no ``//``, and none of these either once the
  path is decoded again (``%252e``, ``..%3b``) the way lenient servers do: 400;
- ``Host``: must be in ``listen.allowed_hosts`` with the listener's port (DNS rebinding): 421;
- browsers: any ``Origin`` header or a ``Sec-Fetch-Site`` other than ``none``: 403;
- ``Upgrade`` (websocket, h2c): 400;
- header names with ``_``, and header values that are not UTF-8: 400 (``check_header_bytes``);
- optional shared secret in ``X-KSZ-Proxy-Key``, compared in constant time: 403.

The framing rules (``Transfer-Encoding``, chunk extensions, trailers) are in ``framing.py``.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable, Mapping
from typing import Final
from urllib.parse import unquote

from multidict import MultiMapping

from proxy.config import ListenConfig, Route
from proxy.errors import RequestRejected

ALLOWED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ALLOW_HEADER: Final = ", ".join(sorted(ALLOWED_METHODS))
PROXY_KEY_HEADER: Final = "X-KSZ-Proxy-Key"

# Percent-encodings that change path structure once decoded: dot, slash, backslash, NUL.
_ENCODED_STRUCTURE: Final = re.compile(r"%(2e|2f|5c|00)", re.IGNORECASE)
_BAD_PERCENT: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_CONTROL: Final = re.compile(r"[\x00-\x20\x7f]")
# A refused Host is quoted in the 421 answer up to this many characters.
_SHOWN_HOST_CHARS: Final = 64
# A path still changing after this many decodings is refused rather than decoded further.
_MAX_DECODINGS: Final = 3
_VERSIONS: Final = frozenset({(1, 0), (1, 1)})


def check_method(method: str) -> None:
    """Refuse methods a REST client never needs (CONNECT, TRACE, unknown)."""
    if method not in ALLOWED_METHODS:
        raise RequestRejected(
            "This method is not forwarded.", status=405, reason="method_not_allowed"
        )


def split_target(raw_target: str) -> tuple[str, str]:
    """Split an origin-form request target into (raw path, raw query with its '?', or '')."""
    if not raw_target.startswith("/"):
        # absolute-form (http://host/x), authority-form or asterisk-form (OPTIONS *)
        raise RequestRejected(
            "Only origin-form request targets are accepted.", status=400, reason="bad_target"
        )
    path, sep, query = raw_target.partition("?")
    return path, sep + query


def check_version(version: tuple[int, int]) -> None:
    """Refuse request lines other than HTTP/1.0 and HTTP/1.1.

    llhttp also accepts ``HTTP/0.9``, ``HTTP/2.0`` and a request line without a version, and
    then reads header lines after them: framing other parsers read differently.
    """
    if tuple(version) not in _VERSIONS:
        raise RequestRejected(
            "The request is not valid HTTP/1.1.", status=400, reason="bad_request"
        )


def check_fragment(raw_target: str) -> None:
    """Refuse a target with a fragment (``#``), which the upstream request could not carry."""
    if "#" in raw_target:
        raise RequestRejected(
            "The request target carries a fragment.", status=400, reason="bad_target"
        )


def check_path(raw_path: str) -> None:
    """Refuse a raw path that could mean something else once decoded or normalised."""
    if (
        "#" in raw_path
        or _CONTROL.search(raw_path)
        or ("%" in raw_path and _BAD_PERCENT.search(raw_path))
    ):
        raise RequestRejected("The request path is not acceptable.", status=400, reason="bad_path")
    # Some servers decode twice (``%252e`` is ``.`` to them) or decode before they strip
    # ``;params`` (``..%3b`` is ``..``): check the structure of every decoding, byte by byte.
    path = raw_path
    for _ in range(_MAX_DECODINGS + 1):
        if _ambiguous_structure(path):
            raise RequestRejected(
                "The request path is not acceptable.", status=400, reason="bad_path"
            )
        decoded = unquote(path, encoding="latin-1")
        if decoded == path:
            return
        path = decoded
    raise RequestRejected("The request path is not acceptable.", status=400, reason="bad_path")


def _ambiguous_structure(path: str) -> bool:
    if "\\" in path or "//" in path or ("%" in path and _ENCODED_STRUCTURE.search(path)):
        return True
    if "/." not in path and not path.startswith("."):
        return False  # no segment starts with a dot, so none is "." or ".." (with ";x" or not)
    # "..;x" is ".." to servlet containers that strip path parameters.
    return any(segment.split(";", 1)[0] in (".", "..") for segment in path.split("/"))


def find_route(routes: Iterable[Route], raw_path: str) -> Route:
    """Return the route whose prefix holds ``raw_path`` (routes come longest prefix first)."""
    for route in routes:
        if route.matches(raw_path):
            return route
    raise RequestRejected("No route is configured for this path.", status=404, reason="no_route")


def check_host(host: str | None, listen: ListenConfig, port: int) -> None:
    """Refuse a ``Host`` that is not ours: a DNS-rebinding page names its own host."""
    if not host:
        raise RequestRejected("A Host header is required.", status=400, reason="missing_host")
    name, host_port = parse_host(host)
    if (
        name is None
        or name not in listen.allowed_hosts
        or (host_port is not None and host_port != port)
    ):
        raise RequestRejected(
            f"Host {shown_host(host)} is not served here: call localhost or 127.0.0.1 on this "
            "port, or add the name to listen.allowed_hosts.",
            status=421,
            reason="host_not_allowed",
        )


def shown_host(host: str) -> str:
    """Return ``host`` fit to quote in an answer or a log: safe characters only, bounded."""
    head = host[:_SHOWN_HOST_CHARS]
    safe = "".join(c if c.isascii() and (c.isalnum() or c in ".-_:[]") else "?" for c in head)
    return f'"{safe}{"..." if len(host) > _SHOWN_HOST_CHARS else ""}"'


def parse_host(host: str) -> tuple[str | None, int | None]:
    """Split a Host header into (lower-case name without brackets, port or None)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None, None
        name, rest = host[1:end], host[end + 1 :]
        if rest and not rest.startswith(":"):
            return None, None
        port_text = rest[1:] if rest else None
    else:
        name, sep, port_text_raw = host.partition(":")
        port_text = port_text_raw if sep else None
    if port_text is None:
        return name, None
    # str.isdigit also accepts "²" and full-width digits, which int() rejects or misreads.
    if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        return None, None
    return name, int(port_text)


def check_browser(headers: MultiMapping[str]) -> None:
    """Refuse requests a browser sends on a web page's behalf; never answer with CORS headers."""
    if "Origin" in headers or any(
        site.strip().lower() != "none" for site in headers.getall("Sec-Fetch-Site", ())
    ):
        raise RequestRejected(
            "Browser requests are not forwarded.", status=403, reason="browser_request"
        )


def check_upgrade(headers: Mapping[str, str]) -> None:
    """Refuse protocol upgrades (websocket, h2c): the proxy forwards plain HTTP/1.1 only."""
    if "Upgrade" in headers or "HTTP2-Settings" in headers:
        raise RequestRejected(
            "Protocol upgrades are not supported.", status=400, reason="upgrade_refused"
        )


def check_header_bytes(raw_headers: Iterable[tuple[bytes, bytes]]) -> None:
    """Refuse header names with ``_`` and header values that would not go upstream unchanged.

    **Underscores: refused, not dropped.** CGI, WSGI, PHP and nginx/Apache in some set-ups map
    ``-`` and ``_`` to the same variable, so ``X_Forwarded_For`` or ``Proxy_Authorization`` can
    reach an application as the header the proxy removed under its real name. Dropping them
    silently (nginx's default) would hide from the caller why a header never arrived; no KSZ API
    uses such names, so a 400 ``bad_header`` names the problem instead (SECURITY 43).

    **Values: byte-exact or refused.** aiohttp reads header bytes as UTF-8 and its writer drops
    what is not (``caf\xe9`` would go upstream as ``caf``); valid UTF-8 and ASCII go upstream
    byte for byte, anything else is refused with 400 ``bad_header`` (SECURITY 46).
    """
    for name, value in raw_headers:
        if b"_" in name:
            raise RequestRejected(
                "Header names may not contain '_'.", status=400, reason="bad_header"
            )
        if not value.isascii():
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestRejected(
                    "A header value is neither ASCII nor UTF-8.", status=400, reason="bad_header"
                ) from None


def check_proxy_key(headers: MultiMapping[str], expected: bytes | None) -> None:
    """Require the shared secret when one is configured, compared in constant time."""
    if expected is None:
        return
    values = headers.getall(PROXY_KEY_HEADER, ())
    given = values[0].encode("utf-8", "surrogateescape") if len(values) == 1 else b""
    if not hmac.compare_digest(given, expected):
        raise RequestRejected(
            "A valid X-KSZ-Proxy-Key header is required.", status=403, reason="proxy_key"
        )
