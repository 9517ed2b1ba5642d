"""Gateway errors and the one place exceptions become HTTP responses in the OpenAI shape.

    GatewayError
    ├── InvalidRequest (ValueError)     400 invalid_request_error
    │   └── PayloadTooLarge             413 invalid_request_error / request_too_large
    ├── Unauthorized (PermissionError)  401 authentication_error (with a Bearer or Basic challenge)
    ├── Forbidden (PermissionError)     403 permission_error
    ├── ModelNotFound (LookupError)     404 invalid_request_error / model_not_found
    ├── RateLimited                     429 rate_limit_exceeded / rate_limit_exceeded (a key's limit, gateway/limits.py)
    │   └── TeacherBudgetExceeded       429 rate_limit_exceeded / teacher_budget_exceeded (no draft to fall back on)
    └── ClientDisconnected              499: the client left before its answer; nothing is sent

    models.BackendUnavailable (ConnectionError)
    ├── TierOverloaded                  503 service_unavailable / overloaded, Retry-After: shed by admission
    └── TierCircuitOpen                 503 service_unavailable / circuit_open, Retry-After: the tier's breaker is open

The last two are the gateway's own refusals to call a tier (gateway/guard.py). They are backend
errors so that the service treats them as a tier it cannot reach, and tells them apart where it
matters: overload is never escalated to the teacher.

An exception says what it means to a client itself, as httpx's do: `http_status`, the OpenAI
error `type` and `code` are class attributes, on these and on the backend errors
(models/errors.py: 400, 429 with the upstream's Retry-After, 502, 503 with Retry-After, 504)
and the registry's `UnknownVersion` (404); `retry_after` and `headers`, where an exception has
them, become response headers. `describe` reads them; nothing here matches on an
exception family. Any other exception is a bug: it is logged with its traceback and answered
500. FastAPI's 422 becomes a 400.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from distill_loop import DistillError
from models import BackendError, BackendUnavailable

log = logging.getLogger(__name__)


class GatewayError(Exception):
    http_status = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(GatewayError, ValueError):
    http_status = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    http_status = 413
    code = "request_too_large"


class Unauthorized(GatewayError, PermissionError):
    http_status = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def __init__(self, message: str, *, scheme: str = "Bearer") -> None:
        """`scheme`: the challenge sent back, Bearer for API keys, Basic where a browser may
        ask a person for the admin key (the dashboard)."""
        super().__init__(message)
        self.challenge = f'{scheme} realm="tiergate"'


class Forbidden(GatewayError, PermissionError):
    http_status = 403
    error_type = "permission_error"


class ModelNotFound(GatewayError, LookupError):
    http_status = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


class TierOverloaded(BackendUnavailable):
    """The tier's admission is full: too many calls running and waiting, or the wait ran out."""

    code = "overloaded"
    retry_after = 1.0


class TierCircuitOpen(BackendUnavailable):
    """The tier's circuit breaker is open: it failed too often, and is given time to recover."""

    code = "circuit_open"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1.0, retry_after)


class ClientDisconnected(GatewayError):
    """The client closed the connection before its answer was ready (nginx's 499)."""

    http_status = 499
    error_type = "client_disconnected"


class RateLimited(GatewayError):
    """A key went over one of its limits. `limit` names it (requests, tokens, calls, usd);
    `retry_after` is when the request would fit again, in seconds; `headers` are the key's
    `x-ratelimit-*` headers."""

    http_status = 429
    error_type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, *, limit: str, retry_after: float, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.limit = limit
        self.retry_after = retry_after
        self.headers = headers or {}


class TeacherBudgetExceeded(RateLimited):
    """A teacher call over the key's teacher budget. With a student draft to serve it never
    reaches the client (the draft is served, degraded); without one it is the answer."""

    code = "teacher_budget_exceeded"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and extra headers for any exception.

    Meaning comes from the exception class's `http_status`, `error_type` and `code`; an
    exception without them is unexpected, and gets an opaque 500.
    """
    status = getattr(exc, "http_status", None)
    if not isinstance(status, int):
        return 500, error_body("internal error", "server_error"), {"x-should-retry": "false"}
    body = error_body(
        str(exc), getattr(exc, "error_type", "server_error"), getattr(exc, "param", None), getattr(exc, "code", None)
    )
    extra = getattr(exc, "headers", None)
    headers: dict[str, str] = dict(extra) if isinstance(extra, dict) else {}
    challenge = getattr(exc, "challenge", None)
    if challenge:
        headers["www-authenticate"] = challenge
    retry_after = getattr(exc, "retry_after", None)
    if retry_after is not None:
        headers["retry-after"] = str(max(1, math.ceil(retry_after)))
    return status, body, headers


def is_unexpected(exc: BaseException) -> bool:
    """A bug rather than an outcome: no exception class of ours says what it means."""
    return not isinstance(getattr(exc, "http_status", None), int)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


def _allowed_methods(request: Request) -> str:
    """Every method the path answers. Starlette's 405 names only the first route that matched the
    path, so `/admin/threshold` (a GET route and a PUT route) claimed to allow GET alone."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches(request.scope)
        if match is not Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return ", ".join(sorted(methods))


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed_methods(request)
        return JSONResponse(error_body(str(exc.detail), etype), status_code=exc.status_code, headers=headers)

    async def _any(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = describe(exc)
        if is_unexpected(exc):
            log.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        elif status >= 500:
            log.error("request failed with %d: %s", status, exc)
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            headers["x-request-id"] = request_id
        return JSONResponse(body, status_code=status, headers=headers)

    # Starlette sends a handler registered for Exception itself to its server-error middleware,
    # which re-raises after answering: right for bugs (uvicorn logs them too), noise for the
    # expected errors of our own packages, which are registered by their base classes.
    for exc_type in (GatewayError, BackendError, DistillError, Exception):
        app.add_exception_handler(exc_type, _any)
