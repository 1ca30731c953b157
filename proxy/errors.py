"""Own every error ksz-proxy raises, with its HTTP status and stable reason code.

The tree (``code`` is the reason code answers, logs and metrics carry)::

    ProxyError                     any failure ksz-proxy reports itself
    ├── ConfigError                the configuration file is wrong   (CLI exit 2)
    ├── CredentialError            key, certificate or keystore wrong (CLI exit 2)
    ├── ParserError                aiohttp's C HTTP parser is missing (CLI exit 1)
    ├── TokenUnavailable           no usable token for a scope set    (503)
    │                   code: token_unreachable | token_timeout | token_tls | token_unavailable
    │                         | token_rejected | token_invalid_response
    │                         | token_proxy_auth (the forward proxy refused its credentials)
    │                         | token_proxy (the forward proxy is down or refused the tunnel)
    ├── UpstreamError              the KSZ REST endpoint failed       (502)
    │   │                   code: upstream_dns | upstream_connect | upstream_tls
    │   │                         | upstream_reset | upstream_protocol | upstream_proxy
    │   ├── ProxyTunnelError       the forward proxy opened no tunnel (502, upstream_proxy)
    │   └── UpstreamTimeout        ... or did not answer in time      (504, upstream_timeout)
    ├── RequestRejected            the caller's request is refused    (400, 403, 404, 405, ...)
    ├── NotReady                   not serving now: draining, no token yet, overloaded (503)
    └── InternalError              a bug in the proxy                 (500, internal)

Every error is made the same way: ``Error(detail, *, reason=..., ...)``; what the answer says
(status, reason, retry-after hint) is fixed at construction and never changed afterwards.

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
    # What ``code`` puts before the reason: the family, where reasons alone would be ambiguous.
    code_prefix: ClassVar[str] = ""

    def __init__(
        self, detail: str, *, reason: str = "internal", retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.reason = reason
        self._retry_after_s = retry_after_s

    @property
    def code(self) -> str:
        """Return the stable reason code used in problem+json answers, logs and metrics."""
        return self.code_prefix + self.reason

    @property
    def retry_after_s(self) -> int | None:
        """Return the Retry-After hint in whole seconds, if the error has one."""
        if self._retry_after_s is None:
            return None
        return max(1, math.ceil(self._retry_after_s))

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

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason="no_c_parser")


class TokenUnavailable(ProxyError):
    """No usable access token: the token endpoint failed and no cached token is still valid.

    ``reason`` is one of ``unreachable``, ``timeout``, ``tls``, ``unavailable`` (the endpoint
    answered 429 or 5xx), ``rejected`` (then ``oauth_error`` carries the RFC 6749 error code, for
    example ``invalid_client``), ``invalid_response``, ``proxy_auth`` (the forward proxy refused
    its credentials: 407) or ``proxy`` (the forward proxy is unreachable or refused the tunnel).
    ``hint_s`` is the server's own Retry-After, when it sent one; the provider's backoff honours
    it.
    """

    status = 503
    problem_type = BELGIF + "serviceUnavailable"
    title = "Service Unavailable"
    code_prefix = "token_"

    REASONS: ClassVar[frozenset[str]] = frozenset(
        {
            "unreachable",
            "timeout",
            "tls",
            "unavailable",
            "rejected",
            "invalid_response",
            "proxy_auth",
            "proxy",
        }
    )

    def __init__(
        self,
        detail: str,
        *,
        reason: str,
        oauth_error: str | None = None,
        retry_after_s: float = 5.0,
        hint_s: float | None = None,
    ) -> None:
        if reason not in self.REASONS:
            raise ValueError(f"unknown token failure reason {reason!r}")
        super().__init__(detail, reason=reason, retry_after_s=retry_after_s)
        self.oauth_error = oauth_error
        self.hint_s = hint_s

    @property
    def retry_after_s(self) -> int:
        """Return the Retry-After hint in whole seconds; a token failure always has one."""
        return super().retry_after_s or 1

    def retry_in(self, seconds: float) -> TokenUnavailable:
        """Return the same failure, telling callers to come back in ``seconds``."""
        return TokenUnavailable(
            self.detail,
            reason=self.reason,
            oauth_error=self.oauth_error,
            retry_after_s=seconds,
            hint_s=self.hint_s,
        )

    def __repr__(self) -> str:
        return (
            f"TokenUnavailable(reason={self.reason!r}, oauth_error={self.oauth_error!r}, "
            f"detail={self.detail!r})"
        )


class UpstreamError(ProxyError):
    """The KSZ REST endpoint could not be reached or broke the exchange.

    ``reason`` is one of ``dns``, ``connect``, ``tls``, ``reset``, ``protocol`` or ``proxy``
    (the forward proxy is unreachable, refused its credentials or refused the tunnel).
    """

    status = 502
    problem_type = BELGIF + "badGateway"
    title = "Bad Gateway"
    code_prefix = "upstream_"

    def __init__(self, detail: str, *, reason: str) -> None:
        super().__init__(detail, reason=reason)


class ProxyTunnelError(UpstreamError):
    """The forward proxy opened no tunnel to the KSZ REST endpoint.

    ``proxy_status`` is its answer to ``CONNECT`` (407: credentials refused), or None when it was
    unreachable, unknown to DNS or closed without a whole answer.
    """

    def __init__(self, detail: str, *, proxy_status: int | None) -> None:
        super().__init__(detail, reason="proxy")
        self.proxy_status = proxy_status


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
    }

    def __init__(self, detail: str, *, status: int, reason: str) -> None:
        super().__init__(detail, reason=reason)
        self.status = status  # type: ignore[misc]  # per instance on purpose
        self.problem_type, self.title = self._TYPES[status]  # type: ignore[misc]


class NotReady(ProxyError):
    """The proxy cannot serve now (draining, no token yet, overloaded); come back in a second."""

    status = 503
    problem_type = BELGIF + "serviceUnavailable"
    title = "Service Unavailable"

    def __init__(self, detail: str, *, reason: str, retry_after_s: float = 1) -> None:
        super().__init__(detail, reason=reason, retry_after_s=retry_after_s)


class InternalError(ProxyError):
    """The proxy failed in a way it did not foresee (a bug); the answer says nothing more."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail, reason="internal")
