"""The in-process vLLM backend over a fake engine: error mapping, the deadline, aborts, logprobs.

The fake speaks the part of vLLM's AsyncLLM the backend uses (`generate` as an async generator
of cumulative outputs, `abort`, `add_lora`), with its own exception classes standing in for
vLLM's, so this runs where vLLM is not installed. tests/vllm runs the real engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest

from models import (
    BackendConfig,
    BackendError,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    InvalidGenerationRequest,
    RuntimeLoraStudent,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
)
from models.vllm_engine import VllmApi, VllmEngineBackend

pytestmark = pytest.mark.anyio
MSG = (ChatMessage("user", "Where is my refund?"),)


# -- vLLM's exceptions, as far as the backend tells them apart --------------------------------
class EngineDead(Exception):
    pass


class Retryable(Exception):
    pass


class WithStatus(Exception):
    def __init__(self, message: str, http_status: int) -> None:
        super().__init__(message)
        self.http_status = http_status


class ClientError(Exception):
    pass


class ServerError(Exception):
    pass


class GenerateFailed(ServerError):
    pass


# -- the engine --------------------------------------------------------------------------------
@dataclass
class Logprob:
    logprob: float
    rank: int | None
    decoded_token: str | None


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[dict[int, Logprob]]
    finish_reason: str | None


@dataclass
class Output:
    outputs: list[Completion]
    finished: bool


class Lora(NamedTuple):
    lora_name: str
    lora_int_id: int
    lora_path: str


class Tokenizer:
    chat_template = None  # so prompts are transcripts

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode())}


ANSWER = [(11, " Your", -0.5), (12, " refund", -0.25), (13, " is", -0.125)]


@dataclass
class FakeEngine:
    """Streams ANSWER one token per output, each with its own logprob and one better-ranked
    alternative; `fault` is raised and `hang` waits before the token at index `at`."""

    fault: BaseException | None = None
    hang: bool = False
    at: int = 1
    drop_own_logprob: bool = False
    add_lora_result: bool | BaseException = True
    requests: list[tuple[str, dict[str, Any], Any]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)

    async def generate(
        self, prompt: dict[str, Any], sampling: dict[str, Any], request_id: str, lora_request: Any = None
    ) -> AsyncIterator[Output]:
        self.requests.append((request_id, sampling, lora_request))
        ids: list[int] = []
        lps: list[dict[int, Logprob]] = []
        for i, (tid, text, lp) in enumerate(ANSWER):
            if i == self.at and self.fault is not None:
                raise self.fault
            if i == self.at and self.hang:
                await asyncio.sleep(3600)
            ids.append(tid)
            table = {99: Logprob(-0.01, 1, " The")}
            if not self.drop_own_logprob:
                table[tid] = Logprob(lp, 2, text)
            lps.append(table)
            done = i == len(ANSWER) - 1
            text_so_far = "".join(t for _, t, _ in ANSWER[: i + 1])
            yield Output([Completion(text_so_far, list(ids), list(lps), "stop" if done else None)], done)
            await asyncio.sleep(0)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if isinstance(self.fault, EngineDead):  # a dead engine cannot abort either
            raise EngineDead("engine core died")

    def get_tokenizer(self) -> Tokenizer:
        return Tokenizer()

    def shutdown(self) -> None:
        pass

    async def add_lora(self, request: Lora) -> bool:
        if isinstance(self.add_lora_result, BaseException):
            raise self.add_lora_result
        return self.add_lora_result

    async def remove_lora(self, lora_id: int) -> bool:
        return True


def fake_vllm(engine: FakeEngine) -> VllmApi:
    return VllmApi(
        build_engine=lambda _args: engine,
        sampling_params=dict,
        tokens_prompt=dict,
        lora_request=Lora,
        unavailable=(EngineDead, Retryable),
        with_status=WithStatus,
        invalid=ClientError,
        failed=ServerError,
    )


@contextlib.asynccontextmanager
async def started(engine: FakeEngine, tmp_path: Path, **config: Any) -> AsyncIterator[VllmEngineBackend]:
    (tmp_path / "config.json").write_text("{}")  # a model folder, as far as resolving it goes
    backend = VllmEngineBackend(BackendConfig(kind="vllm", model=str(tmp_path), **config), vllm=fake_vllm(engine))
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def test_generate_collects_the_stream_with_ranked_logprobs(tmp_path: Path) -> None:
    engine = FakeEngine()
    async with started(engine, tmp_path) as backend:
        gen = await backend.generate(MSG, SamplingParams(max_tokens=8, top_logprobs=2))
    assert (gen.text, gen.token_ids, gen.finish_reason, gen.version) == ("Your refund is", (11, 12, 13), "stop", "base")
    assert gen.logprobs[0] == TokenLogprob(
        " Your", -0.5, 11, (TopLogprob(" The", -0.01, 99), TopLogprob(" Your", -0.5, 11))
    )
    assert [lp.logprob for lp in gen.logprobs] == [-0.5, -0.25, -0.125]
    assert gen.usage.completion_tokens == 3
    assert engine.requests[0][1]["logprobs"] == 2 and engine.aborted == []


@pytest.mark.parametrize(
    ("fault", "caller_sees"),
    [
        (EngineDead("engine core died"), BackendUnavailable),
        (Retryable("try again"), BackendUnavailable),
        (WithStatus("queue full", 503), BackendUnavailable),
        (ClientError("prompt is longer than the maximum model length"), InvalidGenerationRequest),
        (GenerateFailed("generate failed"), BackendResponseError),
        (KeyError("a bug"), KeyError),  # not vLLM's: propagates as it is
    ],
)
async def test_engine_errors_are_translated_and_the_request_aborted(
    tmp_path: Path, fault: BaseException, caller_sees: type[BaseException]
) -> None:
    engine = FakeEngine(fault=fault)
    async with started(engine, tmp_path) as backend:
        with pytest.raises(caller_sees) as caught:
            await backend.generate(MSG, SamplingParams())
    assert type(caught.value) is caller_sees
    assert isinstance(caught.value, BackendError) != (caller_sees is KeyError)
    assert engine.aborted == [engine.requests[0][0]]


async def test_a_generation_past_its_deadline_times_out_and_is_aborted(tmp_path: Path) -> None:
    engine = FakeEngine(hang=True)
    async with started(engine, tmp_path, read_timeout_s=0.2) as backend:
        t0 = time.monotonic()
        with pytest.raises(BackendTimeout, match="deadline"):
            await backend.generate(MSG, SamplingParams())
    assert time.monotonic() - t0 < 2.0
    assert engine.aborted == [engine.requests[0][0]]


async def test_a_caller_that_stops_reading_aborts_the_request(tmp_path: Path) -> None:
    engine = FakeEngine()
    async with started(engine, tmp_path) as backend:
        async with contextlib.aclosing(backend.stream(MSG, SamplingParams())) as deltas:
            async for _ in deltas:
                break
        assert engine.aborted == [engine.requests[0][0]]
        assert backend.inflight("base") == 0


async def test_a_sampled_token_without_its_own_logprob_is_an_error_not_a_made_up_one(tmp_path: Path) -> None:
    engine = FakeEngine(drop_own_logprob=True)
    async with started(engine, tmp_path) as backend:
        with pytest.raises(BackendResponseError, match="no logprob for sampled token 11"):
            await backend.generate(MSG, SamplingParams())


async def test_a_prompt_too_long_never_reaches_the_engine(tmp_path: Path) -> None:
    engine = FakeEngine()
    async with started(engine, tmp_path, max_model_len=16) as backend:
        with pytest.raises(InvalidGenerationRequest, match="max_model_len"):
            await backend.generate(MSG, SamplingParams(max_tokens=4))
    assert engine.requests == []


async def test_not_started_is_unavailable(tmp_path: Path) -> None:
    backend = VllmEngineBackend(BackendConfig(kind="vllm", model=str(tmp_path)), vllm=fake_vllm(FakeEngine()))
    with pytest.raises(BackendUnavailable):
        await backend.generate(MSG, SamplingParams())


async def test_requests_go_to_the_adapter_in_use(tmp_path: Path) -> None:
    engine = FakeEngine()
    async with started(engine, tmp_path) as backend:
        assert isinstance(backend, RuntimeLoraStudent)
        await backend.load_adapter("student-v1-1", "/adapters/v1")
        backend.use_model("student-v1-1", "v1")
        gen = await backend.generate(MSG, SamplingParams())
        await backend.unload_adapter("student-v1-1")
    assert gen.version == "v1"
    assert engine.requests[0][2] == Lora("student-v1-1", 1, "/adapters/v1")


@pytest.mark.parametrize(
    ("result", "caller_sees"),
    [
        (False, BackendError),  # vLLM said no
        (Exception("adapter rank 64 exceeds max_lora_rank 16"), BackendError),  # the engine core said why
        (EngineDead("engine core died"), BackendUnavailable),
        (TypeError("a bug"), TypeError),
    ],
)
async def test_an_adapter_the_engine_cannot_load_is_a_backend_error(
    tmp_path: Path, result: bool | BaseException, caller_sees: type[BaseException]
) -> None:
    async with started(FakeEngine(add_lora_result=result), tmp_path) as backend:
        with pytest.raises(caller_sees) as caught:
            await backend.load_adapter("student-v1-1", "/adapters/v1")
        assert type(caught.value) is caller_sees
        assert backend.served_model == "base"
