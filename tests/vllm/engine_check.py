"""Run by the vLLM venv's python (tests/vllm/test_vllm.py): the in-process AsyncLLM backend on the
real SmolLM2, with logprobs, streaming, a hot-swap to a registry version and back through the
same publisher a vLLM server's student uses, a request vLLM rejects, and one past its deadline.
Prints one JSON object."""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from collections.abc import Awaitable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill_loop import BASE, Registry, VersionMeta, VllmPublisher  # noqa: E402
from models import (  # noqa: E402
    BackendConfig,
    BackendError,
    ChatMessage,
    RuntimeLoraStudent,
    SamplingParams,
    SwappableStudent,
)
from models.vllm_engine import VllmEngineBackend  # noqa: E402


async def main(adapter: str) -> dict[str, object]:
    backend = VllmEngineBackend(
        BackendConfig(
            kind="vllm",
            model="smollm2-135m-instruct",
            engine_args={
                "enable_lora": True,
                "max_lora_rank": 16,
                "max_loras": 2,
                "enforce_eager": True,
                "kv_cache_memory_bytes": 128 * 2**20,
            },
        )
    )
    # The gateway's StudentManager picks a publisher by capability: this one swaps runtime LoRA.
    capability = isinstance(backend, RuntimeLoraStudent) and not isinstance(backend, SwappableStudent)
    await backend.start()
    msgs = (ChatMessage("user", "Hi"),)
    greedy = SamplingParams(max_tokens=12, temperature=0, top_logprobs=2)
    registry = Registry(Path(tempfile.mkdtemp()) / "registry")
    registry.add("v0001", Path(adapter), VersionMeta(name="v0001", parent=BASE, created_at=0.0))
    try:
        base = await backend.generate(msgs, greedy)
        streamed = [d async for d in backend.stream(msgs, greedy)]
        publisher = VllmPublisher(registry, backend)
        registry.set_current("v0001", "promoted")
        swapped = await publisher.sync()
        tuned = await backend.generate(msgs, greedy)
        registry.set_current(BASE, "rollback")
        rolled_back = await publisher.sync()
        again = await backend.generate(msgs, greedy)
        rejected = await error_of(backend.generate(msgs, SamplingParams(max_tokens=4, top_logprobs=21)))
        serving = backend.config
        # The same engine with a deadline no machine meets for a long story; then the usual one.
        backend.config = serving.model_copy(update={"read_timeout_s": 0.02})
        story = (ChatMessage("user", "Tell me a long story about a dragon and a knight."),)
        late = await error_of(backend.generate(story, SamplingParams(max_tokens=256, temperature=0)))
        backend.config = serving
        after_late = await backend.generate(msgs, greedy)
    finally:
        await backend.aclose()
    return {
        "base_text": base.text,
        "base_version": base.version,
        "n_logprobs": len(base.logprobs),
        "completion_tokens": base.usage.completion_tokens,
        "top_k": len(base.logprobs[0].top) if base.logprobs else 0,
        "first_logprob": base.logprobs[0].logprob if base.logprobs else None,
        "stream_text": "".join(d.text for d in streamed),
        "stream_finish": streamed[-1].finish_reason,
        "capability": capability,
        "swapped": swapped,
        "tuned_text": tuned.text,
        "tuned_version": tuned.version,
        "rolled_back": rolled_back,
        "after_rollback_text": again.text,
        "after_rollback_version": again.version,
        "rejected": rejected,
        "late": late,
        "after_late_text": after_late.text,
    }


async def error_of(call: Awaitable[object]) -> str:
    """The name of the BackendError `call` raised (anything else fails the check)."""
    try:
        await call
    except BackendError as exc:
        return type(exc).__name__
    return "no error"


if __name__ == "__main__":  # vLLM spawns processes on CPU: the guard is required
    print(json.dumps(asyncio.run(main(sys.argv[1]))))  # noqa: T201
