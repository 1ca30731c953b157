"""What strict and lenient servers could make of a raw request path (for the path fuzzers)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import unquote_to_bytes


def remove_dot_segments(path: str) -> str:
    """Remove '.' and '..' segments as RFC 3986 section 5.2.4 says."""
    source, output = path, ""
    while source:
        if source.startswith("../"):
            source = source[3:]
        elif source.startswith("./"):
            source = source[2:]
        elif source.startswith("/./"):
            source = source[2:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = source[3:]
            output = output[: max(output.rfind("/"), 0)]
        elif source == "/..":
            source = "/"
            output = output[: max(output.rfind("/"), 0)]
        elif source in (".", ".."):
            source = ""
        else:
            start = 1 if source.startswith("/") else 0
            end = source.find("/", start)
            end = len(source) if end < 0 else end
            output += source[:end]
            source = source[end:]
    return output


def decode_once(path: str) -> str:
    # Byte-wise (one character per byte), so every %XX is one character and nothing fails.
    return unquote_to_bytes(path.encode("latin-1")).decode("latin-1")


def decode_fully(path: str) -> str:
    while (decoded := decode_once(path)) != path:
        path = decoded
    return path


def strip_params(path: str) -> str:
    return "/".join(segment.split(";", 1)[0] for segment in path.split("/"))


def interpretations(raw_path: str) -> Iterator[str]:
    """Yield what strict and lenient servers could make of a raw path."""
    raw = raw_path.encode("utf-8", "surrogateescape").decode("latin-1")
    yield remove_dot_segments(decode_once(raw))
    for decoded in (decode_once(raw), decode_fully(raw)):
        lenient = decoded.replace("\\", "/")
        yield remove_dot_segments(lenient)
        yield remove_dot_segments(strip_params(lenient))
    # servlet containers strip parameters before they decode
    yield remove_dot_segments(decode_fully(strip_params(raw)).replace("\\", "/"))
