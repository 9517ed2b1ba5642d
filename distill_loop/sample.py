"""The online-distillation record: one prompt, the student's draft, the teacher's answer.

The gateway builds a `Sample` for every escalation, audited request and active label; this
package stores and (later) trains on it. Plain frozen values, with JSON (de)serialisation; no I/O here.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgspec

from models import ChatMessage, Generation, TokenLogprob, TopLogprob, Usage

# cache_hit: an escalation answered from the teacher cache (an earlier teacher answer, reused).
Kind = Literal["escalation", "audit", "label", "cache_hit"]


@dataclass(frozen=True, slots=True)
class Sample:
    id: str
    created_at: float  # unix seconds
    tenant: str  # API-key id (a hash prefix), never the key itself
    kind: Kind
    reason: str  # why the teacher was asked: low_confidence, student_error, audit, margin, uncovered, ...
    messages: tuple[ChatMessage, ...]
    student: Generation | None  # None when the student failed before drafting
    confidence: float | None
    features: Mapping[str, float]
    teacher: Generation
    threshold: float
    metadata: Mapping[str, str] = field(default_factory=dict)
    # The teacher's critique of the draft (what was wrong, why, the correction), added later.
    critique: str | None = None
    # The teacher's logprobs of each student-draft token (vLLM prompt_logprobs), where enabled:
    # where the teacher finds the draft unlikely is where the student went wrong.
    draft_scores: tuple[TokenLogprob, ...] = ()
    # How many requests this record stands for, as sampled: 1 for an escalation (all are
    # logged), 1/audit_fraction for an audit, with the fraction in force when it was sampled.
    # A label is 1.0 but stands for no share of traffic: it was chosen, not drawn.
    # None: unknown (records written before the store kept it); readers assume their own fraction.
    sampling_weight: float | None = None
    # The client's own `x-request-id`, if it sent one: kept for tracing, never a key (clients
    # reuse ids; the record's `id` is the gateway's).
    client_request_id: str | None = None
    # Set when the store cut the record's texts to `signal.max_record_bytes`: their UTF-8 size
    # before the cut. Such a prompt is not what the teacher answered, so it is never trained on.
    truncated_from: int | None = None


def logprobs_to_json(lps: tuple[TokenLogprob, ...]) -> list[Any]:
    """Stored as arrays, `[token, logprob, id, [[token, logprob, id], ...]]` a token: the named
    tuples themselves, which `to_json` writes as arrays. Building a dict a token and a list an
    alternative cost a teacher answer with top-5 alternatives 36 us on the writer thread, and
    its row a fifth more bytes."""
    return list(lps)


_ENCODER = msgspec.json.Encoder()


def to_json(value: Any) -> bytes:
    """Compact UTF-8 JSON, in C (msgspec): named tuples (token logprobs) as arrays, dataclasses
    (chat messages) as objects, non-finite floats as null (`logprobs_from_json` reads them back
    as -inf). orjson called back into Python for each named tuple: 192 calls for a 32-token
    answer with top-5 alternatives, three times msgspec's cost for the same bytes."""
    return _ENCODER.encode(value)


def _logprob(value: float | None) -> float:
    """JSON has no -inf: it is stored as null (a token the model ruled out)."""
    return float("-inf") if value is None else float(value)


def _token_logprob(d: Any) -> TokenLogprob:
    if isinstance(d, list):  # [token, logprob, id, top]
        return TokenLogprob(d[0], _logprob(d[1]), d[2], tuple(TopLogprob(x[0], _logprob(x[1]), *x[2:]) for x in d[3]))
    # Rows written before the array form: {"token", "logprob", "id", "top"}.
    return TokenLogprob(
        d["token"],
        _logprob(d["logprob"]),
        d.get("id"),
        tuple(TopLogprob(x[0], _logprob(x[1]), *x[2:]) for x in d.get("top", ())),
    )


def logprobs_from_json(raw: list[Any]) -> tuple[TokenLogprob, ...]:
    return tuple(map(_token_logprob, raw))


def generation_to_json(g: Generation) -> dict[str, Any]:
    return {
        "text": g.text,
        "model": g.model,
        "version": g.version,
        "finish_reason": g.finish_reason,
        "usage": [g.usage.prompt_tokens, g.usage.completion_tokens],
        "token_ids": list(g.token_ids),
        "logprobs": logprobs_to_json(g.logprobs),
    }


def generation_from_json(d: Mapping[str, Any]) -> Generation:
    return Generation(
        text=d["text"],
        finish_reason=d["finish_reason"],
        usage=Usage(*d["usage"]),
        model=d["model"],
        token_ids=tuple(d.get("token_ids", ())),
        logprobs=logprobs_from_json(d.get("logprobs", [])),
        version=d["version"],
    )


def messages_to_json(messages: tuple[ChatMessage, ...]) -> str:
    """`[{"role": ..., "content": ...}, ...]`: the messages' own fields, as `to_json` writes dataclasses."""
    return to_json(messages).decode()


def messages_from_json(raw: str) -> tuple[ChatMessage, ...]:
    return tuple(ChatMessage(m["role"], m["content"]) for m in json.loads(raw))


TRUNCATED = "…[truncated]"


def _cut(text: str, limit: int, safe_cut: SafeCut | None = None) -> str:
    """`text` in at most `limit` UTF-8 bytes, marker included, cut on a character boundary
    (moved back by `safe_cut`, if given, to the start of an identifier it would split)."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    keep = max(0, limit - len(TRUNCATED.encode()))
    kept = raw[:keep].decode(errors="ignore")
    if safe_cut is not None:
        kept = kept[: safe_cut(text, len(kept))]
    return kept + TRUNCATED


# (text, character position) -> a position at or before it that splits no personal identifier.
SafeCut = Callable[[str, int], int]


def cap_texts(sample: Sample, max_bytes: int, safe_cut: SafeCut | None = None) -> Sample:
    """The record with its prompt messages and both answers cut to `max_bytes` of UTF-8 in
    all, and `truncated_from` set, when they are larger; otherwise the record unchanged.

    Every text is cut to one common length, the largest that fits (water-filling), so a huge
    prompt gives up its bytes and short texts stay whole. A fault probe stored five 3.9 MB
    prompts whole: 31 MB of database, a way to fill the disk.
    """
    texts = (
        [m.content for m in sample.messages] + [sample.teacher.text] + ([sample.student.text] if sample.student else [])
    )
    sizes = [len(t.encode()) for t in texts]
    total = sum(sizes)
    if total <= max_bytes:
        return sample
    # The largest per-text length `each` with sum(min(size, each)) <= max_bytes.
    each, left, ordered = 0, max_bytes, sorted(sizes)
    for i, size in enumerate(ordered):
        share = left // (len(ordered) - i)
        if size > share:
            each = share
            break
        left -= size
    messages = tuple(ChatMessage(m.role, _cut(m.content, each, safe_cut)) for m in sample.messages)
    teacher = replace(sample.teacher, text=_cut(sample.teacher.text, each, safe_cut))
    student = replace(sample.student, text=_cut(sample.student.text, each, safe_cut)) if sample.student else None
    return replace(sample, messages=messages, teacher=teacher, student=student, truncated_from=total)


def to_chat_jsonl(sample: Sample) -> dict[str, Any]:
    """The record as an OpenAI/TRL chat example: prompt messages plus the teacher's answer."""
    return {
        "messages": [{"role": m.role, "content": m.content} for m in sample.messages]
        + [{"role": "assistant", "content": sample.teacher.text}],
        "metadata": {
            "id": sample.id,
            "created_at": sample.created_at,
            "tenant": sample.tenant,
            "kind": sample.kind,
            "reason": sample.reason,
            "confidence": sample.confidence,
            "threshold": sample.threshold,
            "student_draft": sample.student.text if sample.student else None,
            "student_version": sample.student.version if sample.student else None,
            "teacher_model": sample.teacher.model,
            **dict(sample.metadata),
        },
    }
