"""A scripted backend for demos and tests: no model, no network.

Each answer is split into word tokens, each with a chosen logprob, so routing and streaming
behave as with a real model. It never pretends to be one: `info.kind` is "fake".
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from models.base import (
    BackendInfo,
    ChatMessage,
    Generation,
    GenerationDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
    generate_from_stream,
)
from models.config import BackendConfig
from models.errors import BackendUnavailable


@dataclass(frozen=True, slots=True)
class Scripted:
    text: str
    logprob: float = -0.1


Responder = Callable[[tuple[ChatMessage, ...]], Scripted]


class FakeBackend:
    def __init__(
        self,
        config: BackendConfig,
        responder: Responder | None = None,
        *,
        delay_s: float = 0.0,
        version: str = "base",
    ) -> None:
        self.config = config
        self._responder = responder or (lambda _m: Scripted(config.fake_text, config.fake_logprob))
        self.delay_s = delay_s
        self.version = version
        self.calls = 0
        self.fail_with: Exception | None = None  # tests set this to simulate an outage
        self._ready = False

    @property
    def info(self) -> BackendInfo:
        return BackendInfo(self.config.name, "fake", self.version, self._ready)

    async def start(self) -> None:
        self._ready = True

    async def aclose(self) -> None:
        self._ready = False

    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation:
        return await generate_from_stream(self.stream(messages, params), model=self.config.name, version=self.version)

    async def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        if not self._ready:
            raise BackendUnavailable(f"{self.config.name} is not started")
        self.calls += 1
        if self.fail_with is not None:
            raise self.fail_with
        script = self._responder(messages)
        pieces = re.findall(r"\s*\S+", script.text)[: params.max_tokens]
        finish = "length" if len(pieces) < len(re.findall(r"\s*\S+", script.text)) else "stop"
        prompt_tokens = sum(len(m.content.split()) for m in messages)
        for i, piece in enumerate(pieces):
            if self.delay_s:
                await asyncio.sleep(self.delay_s / max(1, len(pieces)))
            top = tuple(TopLogprob(piece, script.logprob) for _ in range(min(params.top_logprobs, 1)))
            yield GenerationDelta(text=piece, logprobs=(TokenLogprob(piece, script.logprob, i, top),), token_ids=(i,))
        yield GenerationDelta(
            finish_reason=finish,  # type: ignore[arg-type]
            usage=Usage(prompt_tokens, len(pieces)),
            version=self.version,
        )
