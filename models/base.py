"""The one protocol every model backend implements, the frozen values it returns, the
capabilities some backends add, and the few steps every backend takes the same way.

A backend turns chat messages plus sampling parameters into a `Generation` (or a stream of
`GenerationDelta`s) with text, token ids, per-token logprobs and usage. It knows nothing about
routing, tiers or distillation.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal, NamedTuple, Protocol, runtime_checkable

from models.errors import (
    BackendError,
    BackendRateLimited,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    InvalidGenerationRequest,
)

if TYPE_CHECKING:
    from models.config import BackendConfig

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


# -- capabilities: what the gateway and the loop may ask of a backend beyond `Backend` ----------
# Callers test for a capability with isinstance on these protocols, never for a concrete class,
# so a new backend gains hot-swap or draft scoring by implementing the methods, and a gateway
# whose tiers are remote never imports the in-process (torch) backends to ask.


@runtime_checkable
class SwappableStudent(Backend, Protocol):
    """A student that builds a registry version itself (base weights plus a LoRA adapter) and
    swaps to it without failing a request: in-process models, once the rows running on the old one finish."""

    async def load_version(self, version: str, adapter: Path | None) -> None:
        """Build `version` from the base weights and `adapter` (None: the base model), then
        serve it. Requests already running finish on the old weights. Raises BackendError."""


@runtime_checkable
class RuntimeLoraStudent(Backend, Protocol):
    """A student on an engine with runtime LoRA (a vLLM server or in-process AsyncLLM): adapters
    are loaded under names and requests are sent to one name at a time."""

    @property
    def served_model(self) -> str:
        """The name later requests are sent to (the base model's, or an adapter's)."""

    def use_model(self, model: str, version: str | None = None) -> None:
        """Send later requests to `model`, reported as student `version`. One assignment."""

    def inflight(self, model: str) -> int:
        """Requests now running against a served name."""

    async def wait_idle(self, model: str, timeout: float = 120.0) -> bool:
        """Wait until no request runs against `model`; False on timeout."""

    async def load_adapter(self, name: str, path: str) -> None:
        """Register the adapter folder `path` (readable by the engine) under `name`."""

    async def unload_adapter(self, name: str) -> None: ...


@runtime_checkable
class DraftScorer(Protocol):
    """A teacher that scores another model's draft: its own logprob of each draft token."""

    async def score(self, messages: tuple[ChatMessage, ...], draft: str, top_k: int = 1) -> tuple[TokenLogprob, ...]:
        """One entry per draft token, with up to `top_k` alternatives. Raises BackendError."""


# -- what every backend does the same way ---------------------------------------------------


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


async def generate_from_stream(deltas: AsyncIterator[GenerationDelta], *, model: str, version: str) -> Generation:
    """`Backend.generate` for a backend whose `stream` is the real path: read it to the end.

    `version` is reported only if no delta names one (the last delta normally does)."""
    return collect([d async for d in deltas], model=model, version=version)


def check_prompt_fits(config: BackendConfig, prompt_tokens: int, params: SamplingParams) -> None:
    """Raise InvalidGenerationRequest if the prompt plus `max_tokens` exceeds `max_model_len`."""
    if prompt_tokens + params.max_tokens > config.max_model_len:
        raise InvalidGenerationRequest(
            f"prompt ({prompt_tokens} tokens) plus max_tokens ({params.max_tokens}) exceeds "
            f"{config.name}'s max_model_len of {config.max_model_len}"
        )


def error_for_status(message: str, status: int, *, retry_after: float | None = None) -> BackendError:
    """The error for an engine's or server's HTTP-style status (`message` says who and what)."""
    if status == 429:
        return BackendRateLimited(message, status_code=status, retry_after=retry_after)
    if status in (400, 413, 422):
        return InvalidGenerationRequest(message)
    if status in (502, 503):
        return BackendUnavailable(message)
    if status == 504:
        return BackendTimeout(message)
    return BackendResponseError(message, status_code=status)


class Candidate(NamedTuple):
    """One entry of an engine's logprob table for one position (vLLM's `Logprob`, or its JSON)."""

    token: str
    logprob: float
    rank: int | None  # 1 = the most likely token; None when the engine gave no rank


_UNRANKED = 1 << 30


def rank_position(token_id: int, table: Mapping[int, Candidate], top_k: int) -> TokenLogprob | None:
    """`token_id`'s own logprob at one position, with the table's `top_k` best entries by rank.

    None when the table has no entry for `token_id`. vLLM always includes the sampled (or
    prompt) token, so such a table is a malformed answer and callers raise BackendResponseError.
    No placeholder is made up instead: a stand-in such as -9999.0 would be stored in
    `draft_scores` and read back as a real, very sure "the teacher would never say this", and
    -inf is no better (JSON cannot hold it; the store reads its null back as a ruled-out token).
    """
    own = table.get(token_id)
    if own is None:
        return None
    ranked = sorted(table.items(), key=lambda kv: _UNRANKED if kv[1].rank is None else kv[1].rank)[:top_k]
    top = tuple(TopLogprob(c.token, c.logprob, i) for i, c in ranked)
    return TokenLogprob(own.token, own.logprob, token_id, top)
