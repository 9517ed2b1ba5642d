"""Exceptions raised by model backends.

    BackendError
    ├── BackendUnavailable (ConnectionError)   the tier is not loaded, or its server cannot be reached
    ├── BackendTimeout (TimeoutError)          the tier did not answer within its deadline
    ├── BackendResponseError                   the server answered, but not with a usable completion
    │   └── BackendRateLimited                 the server said 429
    └── InvalidGenerationRequest (ValueError)  the request cannot be served by this backend (e.g. prompt too long)

Third-party exceptions (httpx, torch) are translated where they enter; nothing above this
layer sees them.
"""

from __future__ import annotations


class BackendError(Exception):
    """Base class for every error a backend raises.

    Each class states what it means to a client in OpenAI's terms (`http_status`, `error_type`,
    `code`), as httpx's exceptions carry their meaning; `gateway/errors.py` is the one place that
    turns that into a response. `retry_after` (seconds), when known, is passed on to the client.
    """

    http_status = 502
    error_type = "upstream_error"
    code: str | None = "backend_error"
    retry_after: float | None = None


class BackendUnavailable(BackendError, ConnectionError):
    """The tier is not loaded yet, is shutting down, or its server refused the connection."""

    http_status = 503
    error_type = "service_unavailable"
    code = "backend_unavailable"
    retry_after = 2.0


class BackendTimeout(BackendError, TimeoutError):
    """The tier did not answer within its configured timeout."""

    http_status = 504
    error_type = "timeout"
    code = "backend_timeout"


class BackendResponseError(BackendError):
    """The upstream answered with an error status or a body that is not a valid completion."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code  # the upstream's HTTP status, when it gave one


class BackendRateLimited(BackendResponseError):
    """The upstream answered 429; `retry_after` is its Retry-After in seconds, when it sent one."""

    http_status = 429
    error_type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, status_code: int | None = 429, retry_after: float | None = None) -> None:
        super().__init__(message, status_code=status_code)
        self.retry_after = retry_after


class InvalidGenerationRequest(BackendError, ValueError):
    """The request is well-formed but this backend cannot serve it (for example, too long)."""

    http_status = 400
    error_type = "invalid_request_error"
    code = None
