"""OpenAI wire format: the chat-completions request model and the response/chunk builders.

Validation of client input happens here (pydantic in strict mode, so `true` is not a number
and `1.5` not an integer; extra fields allowed and ignored, as OpenAI-compatible servers must).
Every enforced range is stated in the JSON schema too, which gateway/openapi.py publishes.
Responses are built as plain dicts for speed. No routing.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.config import JsonDict

from models import TokenLogprob

MODEL_ALIASES = ("tiered", "student", "teacher")
# `seed` travels to the tiers as a signed 64-bit integer (vLLM, torch and JSON encoders all stop there).
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1
MAX_STOP = 4
MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512
MAX_TOP_LOGPROBS = 20
# Wire models refuse type coercion: `"max_tokens": true` is a 400, not 1, and `"5"` no number.
WIRE = ConfigDict(extra="allow", strict=True)


def integral(v: object) -> object:
    """A before-validator for integer fields, so they read as the published schema's integers:
    `16.0` is one (strict pydantic alone would refuse it); `1.5`, `true` and `"16"` are not,
    and strict validation still refuses them. (A field validator rather than an Annotated one:
    that would hide the field's bounds from its JSON schema.)"""
    return int(v) if isinstance(v, float) and v.is_integer() else v


# `stop` and `metadata` are checked by validators (one error naming the field, whatever the
# union member); their schemas state the same bounds from the same constants.
StopField = Annotated[
    str | list[str] | None,
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP},
                {"type": "null"},
            ],
            "description": f"One stop sequence or a list of at most {MAX_STOP}; none may be empty.",
        }
    ),
]
MetadataField = Annotated[
    dict[str, str] | None,
    WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "object",
                    "maxProperties": MAX_METADATA_PAIRS,
                    "propertyNames": {"maxLength": MAX_METADATA_KEY},
                    "additionalProperties": {"type": "string", "maxLength": MAX_METADATA_VALUE},
                },
                {"type": "null"},
            ],
            "description": f"At most {MAX_METADATA_PAIRS} string pairs, keys of at most {MAX_METADATA_KEY} and "
            f"values of at most {MAX_METADATA_VALUE} characters; stored with the signal record.",
        }
    ),
]
# A positive top_logprobs needs logprobs: true (enforced by `_logprobs_pairing`).
LOGPROBS_RULE: JsonDict = {
    "if": {"properties": {"top_logprobs": {"type": "integer", "minimum": 1}}, "required": ["top_logprobs"]},
    "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
}


class TextPart(BaseModel):
    model_config = WIRE
    type: Literal["text"]
    text: str


class MessageIn(BaseModel):
    model_config = WIRE
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = WIRE
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, json_schema_extra=LOGPROBS_RULE)

    model: str = "tiered"
    messages: list[MessageIn] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=1)  # one choice per request is all we serve
    stop: StopField = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    metadata: MetadataField = None
    user: str | None = None

    _integers = field_validator("max_tokens", "max_completion_tokens", "n", "seed", "top_logprobs", mode="before")(
        integral
    )

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("metadata")
    @classmethod
    def _metadata_bounds(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is not None and (
            len(v) > MAX_METADATA_PAIRS
            or any(len(k) > MAX_METADATA_KEY or len(x) > MAX_METADATA_VALUE for k, x in v.items())
        ):
            raise ValueError(
                f"metadata: at most {MAX_METADATA_PAIRS} pairs, keys ≤ {MAX_METADATA_KEY} "
                f"and values ≤ {MAX_METADATA_VALUE} characters"
            )
        return v

    @model_validator(mode="after")
    def _logprobs_pairing(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self


def logprobs_json(lps: tuple[TokenLogprob, ...], top_k: int) -> dict[str, Any]:
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {
        "content": [
            {**entry(t.token, t.logprob), "top_logprobs": [entry(x.token, x.logprob) for x in t.top[:top_k]]}
            for t in lps
        ],
        "refusal": None,
    }


def usage_json(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_json(
    *,
    request_id: str,
    model: str,
    text: str,
    finish_reason: str,
    usage: dict[str, Any],
    logprobs: dict[str, Any] | None,
    tiergate: dict[str, Any],
) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
        ],
        "usage": usage,
        "tiergate": tiergate,
    }


def chunk_json(
    *,
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    logprobs: dict[str, Any] | None = None,
    usage: dict[str, Any] | None = None,
    tiergate: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        "usage": usage,
    }
    if tiergate is not None:
        out["tiergate"] = tiergate
    return out


def model_list(created: int, concrete: dict[str, str]) -> dict[str, Any]:
    return {"object": "list", "data": [model_card(m, created, concrete[m]) for m in MODEL_ALIASES]}


def model_card(alias: str, created: int, concrete: str) -> dict[str, Any]:
    return {"id": alias, "object": "model", "created": created, "owned_by": "tiergate", "root": concrete}
