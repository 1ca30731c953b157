"""Own every error ksz-proxy raises, with its HTTP status and stable reason code.

The tree::

    ProxyError                     any failure ksz-proxy reports itself
    ├── ConfigError                the configuration file is wrong   (CLI exit 2)
    ├── CredentialError            key, certificate or keystore wrong (CLI exit 2)
    ├── TokenUnavailable           no usable token for a scope set    (503)
    │                   unreachable | timeout | tls | unavailable | rejected | invalid_response
    ├── UpstreamError              the KSZ REST endpoint failed       (502)
    │   │                          reason: dns | connect | tls | reset | protocol
    │   └── UpstreamTimeout        ... or did not answer in time      (504)
    └── RequestRejected            the caller's request is refused    (400, 403, 404, 405, ...)

Lower-library errors (aiohttp, ssl, cryptography, OSError) are translated into this tree at
exactly one edge each, with ``raise X(...) from exc``. Messages are fixed texts or name a key path
or a file: never a token, an assertion, a password or a body received from a remote server,
because messages end up in logs and in problem+json answers.
"""

from __future__ import annotations

import math
from typing import ClassVar

# The command line's exit codes, as drawn in the tree above.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

BELGIF = "urn:problem-type:belgif:"
OWN = "urn:problem-type:ksz-proxy:"


class ProxyError(Exception):
    """Base of every error ksz-proxy reports itself."""

    status: ClassVar[int] = 500
    problem_type: ClassVar[str] = BELGIF + "internalServerError"
    title: ClassVar[str] = "Internal Server Error"

    def __init__(self, detail: str, *, reason: str = "internal") -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason

    @property
    def retry_after_s(self) -> int | None:
        """Return the Retry-After hint in whole seconds, if the error has one."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reason={self.reason!r}, detail={self.detail!r})"


class ConfigError(ProxyError):
    """The configuration is invalid; the message starts with the key path (``upstream.url:``)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason="config")


class CredentialError(ProxyError):
    """The partner key, certificate or keystore cannot be used; the message names the file."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason="credentials")


class ParserError(ProxyError):
    """aiohttp's C HTTP parser is not in use; the pure-Python fallback is refused."""


class TokenUnavailable(ProxyError):
    """No usable access token: the token endpoint failed and no cached token is still valid.

    ``reason`` is one of ``unreachable``, ``timeout``, ``tls``, ``unavailable`` (the endpoint
    answered 429 or 5xx), ``rejected`` (then ``oauth_error`` carries the RFC 6749 error code, for
    example ``invalid_client``) or ``invalid_response``.
    """

    status = 503
    problem_type = BELGIF + "serviceUnavailable"
    title = "Service Unavailable"

    REASONS: ClassVar[frozenset[str]] = frozenset(
        {"unreachable", "timeout", "tls", "unavailable", "rejected", "invalid_response"}
    )

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        oauth_error: str | None = None,
        retry_after_s: float = 5.0,
    ) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown token failure reason {reason!r}")
        super().__init__(detail, reason=reason)
        self.oauth_error = oauth_error
        self._retry_after_s = retry_after_s
        # The server's own Retry-After, when it sent one; the provider's backoff honours it.
        self.hint_s: float | None = None

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self._retry_after_s))

    def set_retry_after(self, seconds: float) -> None:
        """Set the retry-after hint callers will see (the provider's next attempt)."""
        self._retry_after_s = seconds

    @property
    def problem_reason(self) -> str:
        """Return the reason code used in problem+json answers and metrics (``token_<reason>``)."""
        return f"token_{self.reason}"

    def __repr__(self) -> str:
        return (
            f"TokenUnavailable(reason={self.reason!r}, oauth_error={self.oauth_error!r}, "
            f"detail={self.detail!r})"
        )


class UpstreamError(ProxyError):
    """The KSZ REST endpoint could not be reached or broke the exchange.

    ``reason`` is one of ``dns``, ``connect``, ``tls``, ``reset`` or ``protocol``.
    """

    status = 502
    problem_type = BELGIF + "badGateway"
    title = "Bad Gateway"

    @property
    def problem_reason(self) -> str:
        """Return the reason code used in problem+json answers (``upstream_<reason>``)."""
        return f"upstream_{self.reason}"


class UpstreamTimeout(UpstreamError):
    """The KSZ REST endpoint did not answer within the configured time."""

    status = 504
    problem_type = OWN + "gatewayTimeout"
    title = "Gateway Timeout"

    def __init__(self, detail: str = "The upstream service did not answer in time.") -> None:
        super().__init__(detail, reason="timeout")


class RequestRejected(ProxyError):
    """The caller's request is refused before anything is sent upstream."""

    _TYPES: ClassVar[dict[int, tuple[str, str]]] = {
        400: (BELGIF + "badRequest", "Bad Request"),
        403: (OWN + "forbidden", "Forbidden"),
        404: (BELGIF + "resourceNotFound", "Resource Not Found"),
        405: (OWN + "methodNotAllowed", "Method Not Allowed"),
        408: (OWN + "requestTimeout", "Request Timeout"),
        413: (BELGIF + "payloadTooLarge", "Payload Too Large"),
        414: (OWN + "uriTooLong", "URI Too Long"),
        421: (OWN + "misdirectedRequest", "Misdirected Request"),
        431: (OWN + "requestHeaderFieldsTooLarge", "Request Header Fields Too Large"),
        500: (BELGIF + "internalServerError", "Internal Server Error"),
        503: (BELGIF + "serviceUnavailable", "Service Unavailable"),
    }

    def __init__(
        self, status: int, reason: str, detail: str, *, retry_after_s: int | None = None
    ) -> None:
        super().__init__(detail, reason=reason)
        self.status = status  # type: ignore[misc]  # per instance on purpose
        self.problem_type, self.title = self._TYPES[status]  # type: ignore[misc]
        self._retry_after_s = retry_after_s

    @property
    def retry_after_s(self) -> int | None:
        return self._retry_after_s

    @property
    def problem_reason(self) -> str:
        """Return the reason code used in problem+json answers."""
        return self.reason
