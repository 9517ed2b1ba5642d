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
    """Base class for every error a backend raises."""


class BackendUnavailable(BackendError, ConnectionError):
    """The tier is not loaded yet, is shutting down, or its server refused the connection."""


class BackendTimeout(BackendError, TimeoutError):
    """The tier did not answer within its configured timeout."""


class BackendResponseError(BackendError):
    """The upstream answered with an error status or a body that is not a valid completion."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class BackendRateLimited(BackendResponseError):
    """The upstream answered 429."""


class InvalidGenerationRequest(BackendError, ValueError):
    """The request is well-formed but this backend cannot serve it (for example, too long)."""
