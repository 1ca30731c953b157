"""Own the problem+json answers the proxy makes itself (RFC 9457, Belgif shape).

Every field is a fixed text chosen by the error class or a reason code; nothing from an exception
message of a lower library, an upstream body or a token-endpoint body ever lands here.
"""

from __future__ import annotations

import json
from typing import Final

from aiohttp import web

from proxy.errors import ProxyError, TokenUnavailable

PROBLEM_JSON: Final = "application/problem+json"


def problem_body(error: ProxyError, *, instance: str) -> dict[str, object]:
    """Return the problem document for ``error`` about the request path ``instance``."""
    body: dict[str, object] = {
        "type": error.problem_type,
        "title": error.title,
        "status": error.status,
        "detail": error.detail,
        "instance": instance,
        "reason": error.code,
    }
    if isinstance(error, TokenUnavailable) and error.oauth_error:
        body["oauthError"] = error.oauth_error
    return body


def problem_response(
    error: ProxyError,
    *,
    instance: str,
    trace_id: str,
    close: bool = False,
    extra_headers: dict[str, str] | None = None,
    response_class: type[web.Response] = web.Response,
) -> web.Response:
    """Return a complete problem+json response for ``error``.

    The proxy listener passes ``_aiohttp.Http11Response``, whose status line says ``HTTP/1.1``
    whatever version the refused request named.
    """
    headers = {"BelGov-Trace-Id": trace_id, "Cache-Control": "no-store"}
    retry_after = error.retry_after_s
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if extra_headers:
        headers.update(extra_headers)
    if close:
        # Said explicitly: for a request that named no HTTP/1.1, aiohttp would not say it.
        headers["Connection"] = "close"
    response = response_class(
        status=error.status,
        body=json.dumps(problem_body(error, instance=instance)).encode(),
        content_type=PROBLEM_JSON,
        headers=headers,
    )
    if close:
        response.force_close()
    return response
