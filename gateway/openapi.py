"""The OpenAPI document, post-processed in one place so that it says what the server does.

FastAPI infers paths, parameters and bodies, but documents a 422 that never comes (errors.py
answers 400) and none of the errors that do come. `install_openapi` adds, per operation: 400
where there is input to validate, 413 where there is a body, 401/403 and the security scheme
by path (`/v1/*` data plane, `/admin/*` admin, as gateway/routes.py checks them), the OpenAI
error schema on every error, and the deployment's own limits (`server.max_tokens_limit`,
`server.max_messages`). Statuses that only some routes raise (404, the tiers' 429/502/503/504)
are declared on those routes. Nothing here runs per request; tests/gateway/test_fuzz.py holds
the server to this document.
"""

from __future__ import annotations

import copy
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from gateway.protocol import ChatCompletionRequest
from gateway.routes import CHAT_OPERATION
from gateway.settings import Settings

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "OpenAI's error shape; gateway/errors.py is the one place that builds it.",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
DESCRIPTIONS = {
    "400": "Invalid request: the body is not JSON or fails validation (`param` names the field).",
    "401": "Missing or invalid key.",
    "403": "The admin API is disabled: server.admin_api_key is not set.",
    "413": "The body is larger than server.max_body_bytes.",
}
SECURITY_SCHEMES = {
    "apiKey": {"type": "http", "scheme": "bearer", "description": "One of server.api_keys."},
    "adminKey": {"type": "http", "scheme": "bearer", "description": "server.admin_api_key."},
    "adminBasic": {"type": "http", "scheme": "basic", "description": "server.admin_api_key as the password."},
}


def _error(status: str, challenge: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": DESCRIPTIONS[status]}
    if challenge:
        out["headers"] = {
            "WWW-Authenticate": {"required": True, "schema": {"type": "string", "example": challenge}},
        }
    return out


def _bound(prop: dict[str, Any], key: str, value: int) -> None:
    """Set `key` on the non-null member of an `X | None` property (pydantic's anyOf)."""
    for member in prop.get("anyOf", [prop]):
        if member.get("type") != "null":
            member[key] = value


def _chat_schemas(settings: Settings) -> dict[str, Any]:
    """ChatCompletionRequest and its parts, with this deployment's limits filled in."""
    chat = ChatCompletionRequest.model_json_schema(ref_template="#/components/schemas/{model}")
    components: dict[str, Any] = chat.pop("$defs", {})
    props = chat["properties"]
    server = settings.server
    props["messages"]["maxItems"] = server.max_messages
    for name in ("max_tokens", "max_completion_tokens"):
        _bound(props[name], "maximum", server.max_tokens_limit)
        props[name]["description"] = f"At most server.max_tokens_limit ({server.max_tokens_limit}); each is checked."
    return {**components, "ChatCompletionRequest": chat}


def _document_operation(path: str, op: dict[str, Any], settings: Settings) -> None:
    responses: dict[str, Any] = op.setdefault("responses", {})
    had_validation = responses.pop("422", None) is not None
    if had_validation or "requestBody" in op or op.get("parameters"):
        responses.setdefault("400", _error("400"))
    if "requestBody" in op:
        responses.setdefault("413", _error("413"))
    if path.startswith("/admin/"):
        op["security"] = [{"adminKey": []}, {"adminBasic": []}]
        if settings.server.admin_api_key is None:
            responses.setdefault("403", _error("403"))
        else:
            responses.setdefault("401", _error("401", 'Basic realm="tiergate"'))
    elif path.startswith("/v1/") and settings.server.api_keys:
        op["security"] = [{"apiKey": []}]
        responses.setdefault("401", _error("401", 'Bearer realm="tiergate"'))
    for status, response in responses.items():
        if status.isdigit() and int(status) >= 400 and "content" not in response:
            response["content"] = {"application/json": {"schema": ERROR_REF}}


def build_openapi(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The document /openapi.json serves: FastAPI's, plus the chat route, errors and limits."""
    doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):  # the 422 body nobody sends
        schemas.pop(unused, None)
    schemas.update(_chat_schemas(settings))
    schemas["ErrorResponse"] = ERROR_SCHEMA
    doc["components"]["securitySchemes"] = SECURITY_SCHEMES
    doc["paths"]["/v1/chat/completions"] = {"post": copy.deepcopy(CHAT_OPERATION)}
    for path, ops in doc["paths"].items():
        for op in ops.values():
            _document_operation(path, op, settings)
    return doc


def install_openapi(app: FastAPI, settings: Settings) -> None:
    """Serve `build_openapi` (built once, on the first request for it) as the app's schema."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
