"""HTTP endpoints: OpenAI chat completions and models, health, admin threshold and limits, metrics.

Handlers translate between the wire format (`protocol.py`) and `TieredService`; they hold
no routing logic. Streams use sse-starlette (client-disconnect cancels generation, keep-alive
pings); an error after the first byte is sent as one in-band error chunk, then [DONE].
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import inspect
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sse_starlette import EventSourceResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from gateway.errors import (
    ClientDisconnected,
    Forbidden,
    InvalidRequest,
    ModelNotFound,
    PayloadTooLarge,
    Unauthorized,
    describe,
)
from gateway.limits import TenantState, prompt_chars
from gateway.protocol import (
    MODEL_ALIASES,
    ChatCompletionRequest,
    chunk_json,
    completion_json,
    integral,
    logprobs_json,
    model_card,
    model_list,
    usage_json,
)
from gateway.service import AnswerStream, ChatCall, TieredService, new_request_id
from gateway.settings import TenantLimits
from gateway.tuning import Tuning
from models import ChatMessage, SamplingParams
from router import DEFAULT_TENANT, FixedThreshold, Policy

log = logging.getLogger(__name__)
router = APIRouter()
T = TypeVar("T")
DASHBOARD = Path(__file__).with_name("dashboard.html")
STARTED = int(time.time())


def key_id(secret: str) -> str:
    """Stable, non-reversible id of an API key: what we log and store, never the key."""
    return "key-" + hashlib.sha256(secret.encode()).hexdigest()[:12]


def _header(request: Request, name: bytes) -> str:
    """One header's value, "" when absent. Scans the raw ASGI list: `request.headers.get`
    builds a Headers object and raises KeyError per miss, a measurable cost per request."""
    for key, value in request.scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return ""


def _bearer(request: Request) -> str | None:
    auth = _header(request, b"authorization")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


async def tenant_of(request: Request) -> str:
    """Authenticate a data-plane call; returns the tenant (API-key id).

    `async` on purpose: FastAPI runs a plain `def` dependency in a worker thread, which cost
    about 100 µs per request (bench/README.md) for what is a hash and a compare.
    """
    keys: list[bytes] = request.app.state.api_key_digests
    token = _bearer(request)
    if keys:
        if token is None:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        digest = _digest(token)
        # compare_digest on every key: no early exit that leaks which key nearly matched
        if not any([hmac.compare_digest(digest, k) for k in keys]):
            raise Unauthorized("invalid API key")
    return key_id(token) if token else "anonymous"


def _basic_password(request: Request) -> str | None:
    scheme, _, value = _header(request, b"authorization").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(value.strip()).decode().partition(":")[2] or None
    except (ValueError, UnicodeDecodeError):
        return None


async def require_admin(request: Request) -> str:
    """Admin key as a Bearer token, or as the password of HTTP Basic auth (for the dashboard)."""
    admin: bytes | None = request.app.state.admin_key_digest
    if admin is None:
        raise Forbidden("admin API disabled: set server.admin_api_key (TIERGATE_SERVER__ADMIN_API_KEY)")
    token = _bearer(request) or _basic_password(request)
    if token is None or not hmac.compare_digest(_digest(token), admin):
        raise Unauthorized(
            "admin API needs 'Authorization: Bearer <admin key>' (or Basic auth, key as password)", scheme="Basic"
        )
    return key_id(token)


def _service(request: Request) -> TieredService:
    service: TieredService = request.app.state.service
    return service


def _to_call(body: ChatCompletionRequest, request: Request, tenant: str, service: TieredService) -> ChatCall:
    if body.model not in MODEL_ALIASES:
        raise ModelNotFound(
            f"model {body.model!r} does not exist; use one of {', '.join(MODEL_ALIASES)}", param="model"
        )
    server = service.settings.server
    if len(body.messages) > server.max_messages:
        raise InvalidRequest(f"at most {server.max_messages} messages", param="messages")
    # Each given limit is checked, not only the one that wins: the schema bounds both fields.
    for param, asked in (("max_completion_tokens", body.max_completion_tokens), ("max_tokens", body.max_tokens)):
        if asked is not None and asked > server.max_tokens_limit:
            raise InvalidRequest(f"{param} must be ≤ {server.max_tokens_limit}, got {asked}", param=param)
    max_tokens = body.max_completion_tokens or body.max_tokens or server.default_max_tokens
    messages = tuple(ChatMessage(m.role, m.text()) for m in body.messages)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=server.default_temperature if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        stop=tuple(body.stop or ()),
        seed=body.seed,
        top_logprobs=(body.top_logprobs or 0) if body.logprobs else 0,
    )
    # The gateway's own id keys the signal record: clients reuse theirs (a probe sent one id
    # three times, and two of the three records went to the dead-letter table).
    incoming = _header(request, b"x-request-id")
    client_id = incoming if 0 < len(incoming) <= 128 and incoming.isprintable() else None
    request_id = new_request_id()
    request.state.request_id = client_id or request_id  # what error responses echo
    return ChatCall(
        request_id=request_id,
        client_request_id=client_id,
        tenant=tenant,
        alias=body.model,  # type: ignore[arg-type]
        messages=messages,
        params=params,
        want_logprobs=bool(body.logprobs),
        metadata=dict(body.metadata or {}),
        started=time.perf_counter(),
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes (declared or streamed)."""
    declared = _header(request, b"content-length")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes exceeds the limit of {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_chat_request(raw: bytes) -> ChatCompletionRequest:
    """Validate the body straight from bytes (pydantic's JSON mode, no dict in between).
    Errors become FastAPI's RequestValidationError, so they get the same 400 as anywhere else."""
    try:
        return ChatCompletionRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from None


# The chat route is a plain Starlette route, so FastAPI cannot infer its document; this is it.
CHAT_OPERATION: dict[str, Any] = {
    "summary": "Create a chat completion (OpenAI-compatible; model tiered, student or teacher)",
    "operationId": "chat_completions",
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}},
    },
    "responses": {
        "200": {
            "description": "A chat.completion object, or an SSE stream of chat.completion.chunk objects.",
            "content": {"application/json": {}, "text/event-stream": {}},
        },
        "400": {"description": "Invalid request (`param` names the field), or a prompt too long for the tier."},
        "404": {"description": "Unknown model name (code model_not_found)."},
        # What a tier can raise (models/errors.py); the error schema is added by gateway/openapi.py.
        "429": {"description": "A remote tier answered 429; its Retry-After is passed on."},
        "502": {"description": "A remote tier answered with another error, or not with a completion."},
        "503": {"description": "A tier is not loaded yet, is shutting down, or cannot be reached (Retry-After: 2)."},
        "504": {"description": "A tier did not answer within its deadline."},
    },
}


CHAT_PATHS = frozenset(("/v1/chat/completions", "/chat/completions"))


async def serve_chat(app: FastAPI, scope: Scope, receive: Receive, send: Send) -> None:
    """A chat completion straight from the ASGI server, past Starlette's middleware stack and
    router (about 60 µs of the gateway's CPU a request in an in-process harness, bench/README.md).
    What those layers did for this route is done here: an error is rendered by the app's own
    handler for it (the OpenAI error shape, as on every other route), and a bug is answered
    with a 500 and logged by that handler rather than taking the connection down."""
    scope["app"] = app
    request = Request(scope, receive, send)
    try:
        response = await chat_completions(request)
    except Exception as exc:  # noqa: BLE001 - every error gets the app's answer for it
        handler = next((app.exception_handlers[t] for t in type(exc).__mro__ if t in app.exception_handlers), None)
        if handler is None:
            raise
        answer = handler(request, exc)
        response = await answer if inspect.isawaitable(answer) else answer
    await response(scope, receive, send)


def install_chat_routes(app: FastAPI) -> None:
    """Mount chat completions first in the app, as plain Starlette routes (documented by
    gateway/openapi.py from `CHAT_OPERATION`).

    The hottest endpoint skips FastAPI's per-request machinery (dependency solving, the body
    model, exit stacks, matching past the docs routes): about 55 µs of the gateway's CPU per
    request (bench/README.md). It validates its own body and raises the same errors, which the
    app's handlers render. The app sends a POST there to `serve_chat` directly; these routes
    answer what else reaches the paths (405 for another method) and document the operation.
    """
    for path in sorted(CHAT_PATHS):
        app.router.routes.insert(0, Route(path, chat_completions, methods=["POST"], name=f"chat:{path}"))


async def chat_completions(request: Request) -> Response | JSONAnswer:
    tenant = await tenant_of(request)  # authenticate before reading the body
    service = _service(request)
    limits = service.limits
    # The request bucket before the body is read: a flooding key is refused for a few µs.
    quota = limits.admit(tenant) if limits.active else None
    body = parse_chat_request(await read_body(request, service.settings.server.max_body_bytes))
    call = _to_call(body, request, tenant, service)
    charged = 0 if quota is None else limits.charge_tokens(quota, prompt_chars(call.messages), call.params.max_tokens)
    service.metrics.inflight.inc()
    try:
        if body.stream:
            handle = await service.open_stream(call)
        else:
            route, gen = await _unless_disconnected(request, service.complete(call))
    except BaseException:
        service.metrics.inflight.dec()
        if quota is not None:
            limits.settle_tokens(quota, charged, 0)  # not answered: the tokens were not used
        raise
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        headers = handle.route.headers(call.request_id, call.client_request_id)
        if quota is not None:
            headers.update(limits.headers(quota))
        settle = None if quota is None else (quota, charged)
        return EventSourceResponse(
            _sse(service, call, handle, include_usage, settle),
            headers=headers,
            sep="\n",
            ping=service.settings.server.sse_ping_s,
        )
    service.metrics.inflight.dec()
    headers = route.headers(call.request_id, call.client_request_id)
    if quota is not None:
        limits.settle_tokens(quota, charged, gen.usage.prompt_tokens + gen.usage.completion_tokens)
        headers.update(limits.headers(quota))
    payload = completion_json(
        request_id=call.request_id,
        model=service.concrete_model(route.tier, gen.version),
        text=gen.text,
        finish_reason=gen.finish_reason,
        usage=usage_json(gen.usage.prompt_tokens, gen.usage.completion_tokens),
        logprobs=logprobs_json(gen.logprobs, call.params.top_logprobs) if call.want_logprobs else None,
        tiergate=route.body(call.request_id),
    )
    return JSONAnswer(payload, headers)


class JSONAnswer:
    """A 200 with a JSON body, sent as the two raw ASGI messages: what Starlette's `Response`
    sends for it, without its header normalisation and media-type handling, which cost the
    hottest path about 15 µs a request. Header names are the gateway's own (lowercase); values
    are latin-1, as HTTP/1.1 carries them (a client's `x-request-id` came in as latin-1)."""

    __slots__ = ("body", "headers")

    def __init__(self, payload: Any, headers: dict[str, str]) -> None:
        self.body = orjson.dumps(payload)
        self.headers = headers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(self.body))]
        raw += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": 200, "headers": raw})
        await send({"type": "http.response.body", "body": self.body})


# A request still running after this long gets a task that watches for the client leaving.
# Most answers come sooner, and a watcher for each of them cost ~15 us of a ~450 us request;
# a client that left earlier is noticed then (uvicorn keeps the disconnect for the next receive).
WATCH_AFTER_S = 0.05


async def _unless_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Run `work` in this task, cancelled if the client disconnects first: a client that went
    away gets no teacher call and no record, as a stream already stops. The body is read by
    now, so the next ASGI message can only be the disconnect. One watcher task, started only
    once the request has run `WATCH_AFTER_S`: this runs on every non-streaming request."""
    task = asyncio.current_task()
    assert task is not None
    gone: list[bool] = []
    loop = asyncio.get_running_loop()
    watch: list[asyncio.Task[None]] = []
    start = loop.call_later(
        WATCH_AFTER_S, lambda: watch.append(loop.create_task(_cancel_on_disconnect(request, task, gone)))
    )
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise
        task.uncancel()
        _service(request).metrics.client_disconnects.inc()
        raise ClientDisconnected("client disconnected") from None
    finally:
        start.cancel()
        if watch:
            watch[0].cancel()


async def _cancel_on_disconnect(request: Request, task: asyncio.Task[Any], gone: list[bool]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    gone.append(True)
    task.cancel()


async def _sse(
    service: TieredService,
    call: ChatCall,
    handle: AnswerStream,
    include_usage: bool,
    settle: tuple[TenantState, int] | None,
) -> AsyncIterator[dict[str, str]]:
    """The SSE events of an answer. `settle`: the key's token charge, replaced by the real usage
    at the end (kept whole when the stream is cut short)."""
    route = handle.route
    created = int(time.time())
    model = service.concrete_model(route.tier)
    tier_body = route.body(call.request_id)

    def chunk(**kw: Any) -> dict[str, str]:
        return {
            "data": orjson.dumps(chunk_json(request_id=call.request_id, created=created, model=model, **kw)).decode()
        }

    first_content = True
    try:
        yield chunk(delta={"role": "assistant", "content": ""}, tiergate=tier_body)
        async for delta in handle.deltas:
            if delta.text or delta.logprobs:
                if first_content and delta.text:
                    service.metrics.ttft.labels(route.tier).observe(time.perf_counter() - call.started)
                    first_content = False
                lp = logprobs_json(delta.logprobs, call.params.top_logprobs) if call.want_logprobs else None
                yield chunk(delta={"content": delta.text}, logprobs=lp)
            if delta.finish_reason is not None:
                usage = delta.usage
                if settle is not None and usage is not None:
                    service.limits.settle_tokens(*settle, usage.prompt_tokens + usage.completion_tokens)
                final_body = route.body(call.request_id, handle.decision)
                # tiergate again at the end: a forced-student stream is scored only now.
                yield chunk(delta={}, finish_reason=delta.finish_reason, tiergate=final_body)
                if include_usage and usage is not None:
                    yield chunk(
                        delta=None,
                        usage=usage_json(usage.prompt_tokens, usage.completion_tokens),
                        tiergate=final_body,
                    )
        yield {"data": "[DONE]"}
    except Exception as exc:  # noqa: BLE001 - after the first byte, errors go in-band
        status, err, _ = describe(exc)
        log.warning("stream %s failed after start (%d)", call.request_id, status, exc_info=exc)
        yield {"data": json.dumps(err)}
        yield {"data": "[DONE]"}
    finally:
        service.metrics.inflight.dec()


@router.get("/v1/models")
async def list_models(request: Request, _tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    return model_list(STARTED, _concrete(_service(request)))


@router.get("/v1/models/{model_id}", responses={404: {"description": "Unknown model name (code model_not_found)."}})
async def get_model(model_id: str, request: Request, _tenant: str = Depends(tenant_of)) -> dict[str, Any]:
    concrete = _concrete(_service(request))
    if model_id not in concrete:
        raise ModelNotFound(f"model {model_id!r} does not exist", param="model")
    return model_card(model_id, STARTED, concrete[model_id])


def _concrete(service: TieredService) -> dict[str, str]:
    student, teacher = service.concrete_model("student"), service.concrete_model("teacher")
    return {"tiered": f"{student} -> {teacher}", "student": student, "teacher": teacher}


@router.get("/health/live")
async def live() -> dict[str, str]:
    return {"status": "alive"}


READINESS = {
    "type": "object",
    "properties": {"status": {"enum": ["ready", "not_ready"]}, "tiers": {"additionalProperties": {"type": "boolean"}}},
}


@router.get(
    "/health/ready",
    responses={
        200: {"description": "Both tiers are loaded.", "content": {"application/json": {"schema": READINESS}}},
        503: {
            "description": "A tier is still loading, or shutting down.",
            "content": {"application/json": {"schema": READINESS}},
        },
    },
)
async def ready(request: Request) -> JSONResponse:
    """503 while a tier loads, during shutdown, or while neither tier can take calls. One open
    circuit leaves the gateway ready but `degraded`: the other tier still answers (a load
    balancer that pulled every replica off a dead shared teacher would turn it into an outage)."""
    service = _service(request)
    breakers = {name: guard.breaker.state for name, guard in service.guards.items()}
    tiers = {name: backend.info.ready and breakers[name] != "open" for name, backend in service.tiers.items()}
    loaded = all(backend.info.ready for backend in service.tiers.values())
    ok = loaded and any(tiers.values()) and not request.app.state.shutting_down
    status = ("ready" if all(tiers.values()) else "degraded") if ok else "not_ready"
    return JSONResponse({"status": status, "tiers": tiers, "breakers": breakers}, status_code=200 if ok else 503)


@router.get("/health")
async def health(request: Request) -> dict[str, Any]:
    service = _service(request)
    return {
        "tiers": {
            name: {"name": i.name, "kind": i.kind, "version": i.version, "ready": i.ready, **i.detail}
            for name, b in service.tiers.items()
            for i in (b.info,)
        },
        "threshold": service.policies.threshold(DEFAULT_TENANT),
        "signal_queue_depth": service.store.pending,
    }


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"description": "Prometheus text exposition (docs/metrics.md).", "content": {"text/plain": {}}}},
)
async def metrics(request: Request) -> Response:
    service = _service(request)
    service.metrics.signal_queue.set(service.store.pending)
    return Response(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)


M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M]) -> Callable[[Request], Awaitable[M]]:
    """A dependency that validates an admin body as `model` straight from its JSON bytes, whatever
    the Content-Type, as the chat route does: `curl -d` sends a form type, which FastAPI's own
    body parameters reject. Errors are the usual 400; oversized bodies get 413."""

    async def parse(request: Request) -> M:
        raw = await read_body(request, _service(request).settings.server.max_body_bytes)
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None

    return parse


def body_doc(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body for a route that reads `json_body(model)`."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


VERSION_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "This student has no version registry here, or no such kept version."}
}
# Admin bodies: unknown fields and coercions (`"threshold": true`) are refused.
ADMIN_BODY = ConfigDict(extra="forbid", strict=True)


class RollbackIn(BaseModel):
    model_config = ADMIN_BODY
    version: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")


RollbackBody = Annotated[RollbackIn, Depends(json_body(RollbackIn))]


@router.get("/admin/student/versions", responses=VERSION_NOT_FOUND)
async def student_versions(request: Request, _admin: str = Depends(require_admin)) -> dict[str, Any]:
    registry = request.app.state.students.require_registry()
    return {
        "current": registry.current(),
        "serving": _service(request).student_version(),
        "versions": [dataclasses.asdict(registry.meta(v)) for v in registry.versions()],
        "history": registry.history()[-50:],
    }


@router.post("/admin/student/rollback", openapi_extra=body_doc(RollbackIn), responses=VERSION_NOT_FOUND)
async def student_rollback(
    request: Request, admin: str = Depends(require_admin), *, body: RollbackBody
) -> dict[str, str]:
    old, new = await request.app.state.students.rollback(body.version, admin)
    log.info("student rolled back by %s: %s -> %s", admin, old, new)
    return {"previous": old, "current": new, "serving": _service(request).student_version()}


class ThresholdIn(BaseModel):
    model_config = ADMIN_BODY
    threshold: float = Field(ge=0.0, le=1.0)


ThresholdBody = Annotated[ThresholdIn, Depends(json_body(ThresholdIn))]


@router.get("/admin/threshold")
async def get_threshold(request: Request, _admin: str = Depends(require_admin)) -> dict[str, float]:
    return {"threshold": _service(request).policies.threshold(DEFAULT_TENANT)}


@router.put("/admin/threshold", openapi_extra=body_doc(ThresholdIn))
async def put_threshold(
    request: Request, admin: str = Depends(require_admin), *, body: ThresholdBody
) -> dict[str, float]:
    """Set the default policy to a fixed threshold (the common case of PUT /admin/policy)."""
    service = _service(request)
    old = service.policies.threshold(DEFAULT_TENANT)
    await service.policies.set(DEFAULT_TENANT, FixedThreshold(body.threshold), admin)
    service.metrics.threshold.set(body.threshold)
    log.info("threshold changed by %s: %.4f -> %.4f", admin, old, body.threshold)
    return {"threshold": body.threshold, "previous": old}


def _needs(kind: str, field: str) -> dict[str, Any]:
    return {
        "if": {"properties": {"kind": {"const": kind}}},
        "then": {"required": [field], "properties": {field: {"type": "number"}}},
    }


class PolicyIn(BaseModel):
    """Which of threshold, rate and quality a policy needs follows its kind (gateway/tuning.py
    `resolve`); the schema says so, so clients can check before they ask."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "allOf": [_needs("fixed", "threshold"), _needs("target_rate", "rate"), _needs("target_quality", "quality")]
        },
    )
    tenant: str = Field(default=DEFAULT_TENANT, min_length=1, max_length=64)
    kind: Literal["fixed", "target_rate", "target_quality"]
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    rate: float | None = Field(default=None, ge=0.0, le=1.0)
    quality: float | None = Field(default=None, ge=0.0, le=1.0)
    window: int = Field(default=500, ge=20, le=100_000)
    # Decide this tenant's routed requests on a prefix of the draft (early) or on the whole
    # draft (full); unset: the gateway's `router.decision`.
    decision: Literal["early", "full"] | None = None

    _integers = field_validator("window", mode="before")(integral)


PolicyBody = Annotated[PolicyIn, Depends(json_body(PolicyIn))]


# Finite only: a NaN window or bucket would reach the JSON answer as NaN, which is no JSON.
Hours = Annotated[float | None, Query(allow_inf_nan=False, description="Look back this many hours (all when absent).")]
BucketSeconds = Annotated[
    float, Query(allow_inf_nan=False, description="Bucket width in seconds; under 1 counts as 1.")
]


def _tuning(request: Request) -> Tuning:
    tuning: Tuning = request.app.state.tuning
    return tuning


def _resolve(body: PolicyIn, request: Request, hours: float | None) -> tuple[Policy, dict[str, Any] | None]:
    try:
        return _tuning(request).resolve(body.model_dump(), hours)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param=body.kind) from exc


@router.get("/admin/policy")
async def get_policies(request: Request, _admin: str = Depends(require_admin)) -> dict[str, Any]:
    return {"policies": _service(request).policies.all()}


@router.put("/admin/policy", openapi_extra=body_doc(PolicyIn))
async def put_policy(
    request: Request,
    hours: Hours = None,
    admin: str = Depends(require_admin),
    *,
    body: PolicyBody,
) -> dict[str, Any]:
    """Apply a fixed, target-rate or target-quality policy for a tenant (or "*"), audited."""
    policy, predicted = await asyncio.to_thread(_resolve, body, request, hours)
    service = _service(request)
    old = await service.policies.set(body.tenant, policy, admin)
    if body.tenant == DEFAULT_TENANT:
        service.metrics.threshold.set(policy.current())
    log.info("policy for %s changed by %s: %s -> %s", body.tenant, admin, old, policy.to_json())
    return {"tenant": body.tenant, "previous": old, "policy": policy.to_json(), "predicted": predicted}


@router.post("/admin/policy/dry-run", openapi_extra=body_doc(PolicyIn))
async def dry_run_policy(
    request: Request,
    hours: Hours = None,
    _admin: str = Depends(require_admin),
    *,
    body: PolicyBody,
) -> dict[str, Any]:
    """What a policy would do on logged traffic, without applying it."""
    policy, predicted = await asyncio.to_thread(_resolve, body, request, hours)
    current = await asyncio.to_thread(_tuning(request).whatif, hours, body.tenant)
    return {"policy": policy.to_json(), "predicted": predicted, "current": current["current"]}


@router.get("/admin/policy/audit")
async def policy_audit(request: Request, limit: int = 100, _admin: str = Depends(require_admin)) -> dict[str, Any]:
    return {"audit": await asyncio.to_thread(_service(request).policies.audit, min(max(limit, 1), 1000))}


class LimitsIn(TenantLimits):
    """A tenant ("*": the default) and the limits to change; the others stay as they are.
    Strict, as every admin body: `false` is not a budget (YAML and environment values, read
    through `TenantLimits` itself, stay lax)."""

    model_config = ConfigDict(frozen=True, **ADMIN_BODY)

    tenant: str = Field(default=DEFAULT_TENANT, min_length=1, max_length=64)

    _integers = field_validator("requests_per_minute", "tokens_per_minute", "teacher_calls_per_minute", mode="before")(
        integral
    )


LimitsBody = Annotated[LimitsIn, Depends(json_body(LimitsIn))]


@router.get("/admin/limits")
async def get_limits(
    request: Request, tenant: str | None = None, _admin: str = Depends(require_admin)
) -> dict[str, Any]:
    """Every tenant with limits of its own and the default; with `?tenant=`, that tenant's
    limits and what it has left now."""
    limits = _service(request).limits
    if tenant is None:
        return {"limits": limits.configured()}
    return {"tenant": tenant, "limits": limits.limits(tenant).model_dump(), "usage": limits.usage(tenant)}


@router.put("/admin/limits", openapi_extra=body_doc(LimitsIn))
async def put_limits(request: Request, admin: str = Depends(require_admin), *, body: LimitsBody) -> dict[str, Any]:
    """Change a tenant's limits at runtime, audited; they persist across restarts."""
    changes = body.model_dump(exclude_unset=True, exclude={"tenant"})
    old, new = await _service(request).limits.set(body.tenant, changes, admin)
    log.info("limits for %s changed by %s: %s -> %s", body.tenant, admin, old.model_dump(), new.model_dump())
    return {"tenant": body.tenant, "previous": old.model_dump(), "limits": new.model_dump()}


@router.get("/admin/limits/audit")
async def limits_audit(request: Request, limit: int = 100, _admin: str = Depends(require_admin)) -> dict[str, Any]:
    return {"audit": await asyncio.to_thread(_service(request).limits.audit, min(max(limit, 1), 1000))}


@router.get("/admin/whatif")
async def whatif(
    request: Request, hours: Hours = None, tenant: str = DEFAULT_TENANT, _admin: str = Depends(require_admin)
) -> dict[str, Any]:
    """Escalation rate vs estimated quality and cost across thresholds, current point marked."""
    return await asyncio.to_thread(_tuning(request).whatif, hours, tenant)


@router.get("/admin/timeline")
async def timeline(
    request: Request, hours: Hours = None, bucket_s: BucketSeconds = 3600.0, _admin: str = Depends(require_admin)
) -> dict[str, Any]:
    rows = await asyncio.to_thread(_tuning(request).timeline, hours, max(bucket_s, 1.0))
    return {"buckets": rows, "serving": _service(request).student_version()}


@router.get("/admin/dashboard", response_class=HTMLResponse)
async def dashboard(_admin: str = Depends(require_admin)) -> HTMLResponse:
    return HTMLResponse(DASHBOARD.read_text(encoding="utf-8"))
