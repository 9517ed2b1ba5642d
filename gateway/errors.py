"""Gateway errors and the one place exceptions become HTTP responses in the OpenAI shape.

    GatewayError
    ├── InvalidRequest (ValueError)     400 invalid_request_error
    ├── Unauthorized (PermissionError)  401 authentication_error
    ├── Forbidden (PermissionError)     403 permission_error
    └── ModelNotFound (LookupError)     404 model_not_found

Backend errors map as: InvalidGenerationRequest 400, BackendUnavailable 503 (with
Retry-After), BackendTimeout 504, any other error 500. FastAPI's 422 becomes a 400.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from models import BackendError, BackendTimeout, BackendUnavailable, InvalidGenerationRequest

log = logging.getLogger(__name__)


class GatewayError(Exception):
    status_code = 500
    error_type = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequest(GatewayError, ValueError):
    status_code = 400
    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status_code = 413
    code = "request_too_large"


class Unauthorized(GatewayError, PermissionError):
    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"


class Forbidden(GatewayError, PermissionError):
    status_code = 403
    error_type = "permission_error"


class ModelNotFound(GatewayError, LookupError):
    status_code = 404
    error_type = "invalid_request_error"
    code = "model_not_found"


def error_body(message: str, error_type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any], dict[str, str]]:
    """Status, OpenAI error body and extra headers for any exception."""
    if isinstance(exc, Unauthorized):  # lets a browser ask for the admin key (dashboard)
        body = error_body(str(exc), exc.error_type, exc.param, exc.code)
        return 401, body, {"www-authenticate": 'Basic realm="tiergate"'}
    if isinstance(exc, GatewayError):
        return exc.status_code, error_body(str(exc), exc.error_type, exc.param, exc.code), {}
    if isinstance(exc, LookupError):  # e.g. distill_loop.UnknownVersion
        return 404, error_body(str(exc), "invalid_request_error", code="not_found"), {}
    if isinstance(exc, InvalidGenerationRequest):
        return 400, error_body(str(exc), "invalid_request_error"), {}
    if isinstance(exc, BackendUnavailable):
        return 503, error_body(str(exc), "service_unavailable", code="backend_unavailable"), {"retry-after": "2"}
    if isinstance(exc, BackendTimeout):
        return 504, error_body(str(exc), "timeout", code="backend_timeout"), {}
    if isinstance(exc, BackendError):
        return 502, error_body(str(exc), "upstream_error", code="backend_error"), {}
    return 500, error_body("internal error", "server_error"), {"x-should-retry": "false"}


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value"))
    return (f"{param}: {msg}" if param else msg), param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        etype = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), etype), status_code=exc.status_code, headers=exc.headers)

    async def _any(request: Request, exc: Exception) -> JSONResponse:
        status, body, headers = describe(exc)
        if status >= 500:
            log.error("request failed with %d: %s", status, exc, exc_info=status == 500)
        request_id = getattr(request.state, "request_id", None)
        if request_id:
            headers["x-request-id"] = request_id
        return JSONResponse(body, status_code=status, headers=headers)

    # Our own and backend errors are expected outcomes; Exception is the last resort (500).
    for exc_type in (GatewayError, BackendError, LookupError, Exception):
        app.add_exception_handler(exc_type, _any)
