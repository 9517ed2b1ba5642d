"""The one protocol every model backend implements, and the frozen values it returns.

A backend turns chat messages plus sampling parameters into a `Generation` (or a stream of
`GenerationDelta`s) with text, token ids, per-token logprobs and usage. It knows nothing about
routing, tiers or distillation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Sampling for one request. `temperature == 0` means greedy decoding."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Alternatives returned per position (0-20). Sampled-token logprobs are always returned.
    top_logprobs: int = 0


# Named tuples, not frozen dataclasses: a draft builds one per token (and k more per token with
# top-k), and a frozen dataclass's __init__ costs about 3.5x a tuple's on that hot path.
class TopLogprob(NamedTuple):
    token: str
    logprob: float
    token_id: int | None = None  # known for in-process models and vLLM's token_id:N form


class TokenLogprob(NamedTuple):
    """Logprob of one generated token under the model's unmodified distribution."""

    token: str
    logprob: float
    token_id: int | None = None
    top: tuple[TopLogprob, ...] = ()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class Generation:
    text: str
    finish_reason: FinishReason
    usage: Usage
    # The concrete model that produced the text (e.g. "smollm2-135m-instruct@base").
    model: str
    token_ids: tuple[int, ...] = ()
    # Empty when the backend (e.g. a remote server) gave none.
    logprobs: tuple[TokenLogprob, ...] = ()
    # Which student/teacher version answered; the registry name for students.
    version: str = "base"


@dataclass(frozen=True, slots=True)
class GenerationDelta:
    """A piece of a streamed generation. The last delta has `finish_reason` and `usage` set."""

    text: str = ""
    logprobs: tuple[TokenLogprob, ...] = ()
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    # Set on the last delta: the model version that produced the whole stream.
    version: str | None = None


@dataclass(frozen=True, slots=True)
class BackendInfo:
    name: str
    kind: str
    version: str
    ready: bool
    detail: dict[str, str] = field(default_factory=dict)


@runtime_checkable
class Backend(Protocol):
    """A model tier. Implementations must be safe to call from many coroutines at once.

    `generate`/`stream` raise `models.errors.BackendError` subclasses, never third-party errors.
    """

    @property
    def info(self) -> BackendInfo: ...

    async def start(self) -> None:
        """Load or connect. Returns once the backend is ready, or raises BackendError."""

    async def aclose(self) -> None:
        """Release resources. In-flight calls fail with BackendUnavailable."""

    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation: ...

    def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]: ...


def collect(deltas: list[GenerationDelta], *, model: str, version: str) -> Generation:
    """Fold a finished stream into one Generation."""
    last = deltas[-1] if deltas else GenerationDelta(finish_reason="stop", usage=Usage(0, 0))
    return Generation(
        text="".join(d.text for d in deltas),
        finish_reason=last.finish_reason or "stop",
        usage=last.usage or Usage(0, sum(len(d.token_ids) for d in deltas)),
        model=model,
        token_ids=tuple(t for d in deltas for t in d.token_ids),
        logprobs=tuple(lp for d in deltas for lp in d.logprobs),
        version=last.version or version,
    )
