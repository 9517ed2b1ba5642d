"""Prefix caching in the in-process backend: the static start of every prompt is prefilled once.

On the tiny random Llama the cached path must give the same tokens and logprobs as a whole
prefill, alone and in batches of uneven prompts; on the real Gemma-3 teacher it must do so past
its sliding window (512 tokens), where the rows' caches are joined with padding in front."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from models import BackendConfig, ChatMessage, Generation, SamplingParams, collect
from models.local import LocalBackend
from models.prefix import MIN_PREFIX_TOKENS, static_prefix

pytestmark = pytest.mark.anyio
# A system prompt long enough to cache on the tiny model's byte-level tokenizer.
KNOWLEDGE = "Refunds take five business days. Shipping is free over fifty dollars. " * 6
QUESTIONS = ("Where is my refund?", "Is shipping free?", "How do I reset my password from the account page, please?")


async def _answers(config: BackendConfig, params: SamplingParams) -> tuple[list[Generation], list[Generation], int]:
    """Each question alone, then all of them together, and how many batches used the cache."""
    backend = LocalBackend(config)
    await backend.start()
    try:
        convs = [(ChatMessage("user", q),) for q in QUESTIONS]
        solo = [await backend.generate(c, params) for c in convs]
        together = list(await asyncio.gather(*[backend.generate(c, params) for c in convs]))
        loaded = backend.loaded
        assert loaded is not None
        return solo, together, loaded.prefix.hits if loaded.prefix is not None else 0
    finally:
        await backend.aclose()


def _assert_same(cached: list[Generation], whole: list[Generation], tol: float) -> None:
    for a, b in zip(cached, whole, strict=True):
        assert a.token_ids == b.token_ids and a.text == b.text
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=tol)
        assert a.usage == b.usage  # usage counts the whole prompt, cached or not


@pytest.mark.parametrize("prompt_format", ["chat_template", "transcript"])
async def test_a_cached_prefix_gives_what_a_whole_prefill_gives(tiny_model_dir: Path, prompt_format: str) -> None:
    base = BackendConfig(
        model=str(tiny_model_dir),
        device="cpu",
        dtype="float32",
        system_prompt=KNOWLEDGE,
        prompt_format=prompt_format,  # type: ignore[arg-type]
        batch_wait_ms=50.0,
    )
    params = SamplingParams(max_tokens=8, temperature=0, top_logprobs=2)
    solo, together, hits = await _answers(base, params)
    solo_whole, together_whole, no_hits = await _answers(base.model_copy(update={"prefix_cache": False}), params)
    assert hits >= 2 and no_hits == 0
    _assert_same(solo, solo_whole, 1e-4)
    _assert_same(together, together_whole, 1e-4)


async def test_short_or_absent_system_prompts_are_not_cached(tiny_model_dir: Path) -> None:
    backend = LocalBackend(BackendConfig(model=str(tiny_model_dir), device="cpu", dtype="float32"))
    await backend.start()
    try:
        loaded = backend.loaded
        assert loaded is not None and loaded.prefix is None
        tok = loaded.tokenizer
        long_ids = static_prefix(BackendConfig(model="x", system_prompt=KNOWLEDGE), tok)
        assert len(long_ids) >= MIN_PREFIX_TOKENS
        # The prefix is exactly the text before the conversation (less one token of margin).
        text = tok.apply_chat_template(
            [{"role": "system", "content": KNOWLEDGE}, {"role": "user", "content": "q"}],
            add_generation_prompt=True,
            tokenize=False,
        )
        assert tok(text, add_special_tokens=False)["input_ids"][: len(long_ids)] == list(long_ids)
    finally:
        await backend.aclose()


async def test_a_swapped_version_gets_its_own_prefix_cache(tiny_model_dir: Path) -> None:
    from models.local import load_model

    config = BackendConfig(model=str(tiny_model_dir), device="cpu", dtype="float32", system_prompt=KNOWLEDGE)
    backend = LocalBackend(config)
    await backend.start()
    try:
        params = SamplingParams(max_tokens=4, temperature=0)
        await backend.generate((ChatMessage("user", "hi"),), params)
        old = backend.loaded
        assert old is not None and old.prefix is not None and old.prefix.hits == 1
        import torch

        await backend.swap(load_model(tiny_model_dir, torch.device("cpu"), torch.float32, "v0001"))
        await backend.generate((ChatMessage("user", "hi"),), params)
        new = backend.loaded
        assert new is not None and new is not old and new.prefix is not None
        assert new.prefix.hits == 1 and old.prefix.hits == 1  # never the old weights' keys and values
    finally:
        await backend.aclose()


@pytest.mark.slow
async def test_the_real_teacher_past_its_sliding_window(tmp_path: Path) -> None:
    """Gemma-3-270M keeps only 512 tokens in five of every six layers: a prefix longer than
    that must still give what a whole prefill gives (float32, so only summation order differs)."""
    from bench.kb import DATA, load_kb, teacher_prompt

    faq = teacher_prompt(load_kb(DATA / "kb.jsonl")[:6], "faq")
    config = BackendConfig(
        model="gemma-3-270m",
        prompt_format="transcript",
        system_prompt=faq,
        device="cpu",
        dtype="float32",
        max_model_len=4096,
        batch_wait_ms=50.0,
    )
    params = SamplingParams(max_tokens=12, temperature=0, top_logprobs=2)
    solo, together, hits = await _answers(config, params)
    solo_whole, together_whole, _ = await _answers(config.model_copy(update={"prefix_cache": False}), params)
    assert solo[0].usage.prompt_tokens > 600 and hits >= 2
    _assert_same(solo, solo_whole, 2e-3)
    _assert_same(together, together_whole, 2e-3)


@pytest.mark.slow
async def test_the_real_teacher_joins_a_running_batch_past_its_sliding_window() -> None:
    """A request that joins a running Gemma-3 batch (both prompts past the 512-token window, the
    newcomer padded in front), then outlives the row ahead and loses that padding, gets what it
    gets alone; so does the row it joined."""
    from bench.kb import DATA, load_kb, teacher_prompt

    config = BackendConfig(
        model="gemma-3-270m",
        prompt_format="transcript",
        system_prompt=teacher_prompt(load_kb(DATA / "kb.jsonl")[:6], "faq"),
        device="cpu",
        dtype="float32",
        max_model_len=4096,
    )
    ahead, newcomer = (ChatMessage("user", QUESTIONS[2]),), (ChatMessage("user", QUESTIONS[0]),)  # longer first
    ahead_params = SamplingParams(max_tokens=6, temperature=0, top_logprobs=2)
    params = SamplingParams(max_tokens=16, temperature=0, top_logprobs=2)
    backend = LocalBackend(config)
    await backend.start()
    try:
        alone = [await backend.generate(ahead, ahead_params), await backend.generate(newcomer, params)]
        started = asyncio.Event()

        async def read_ahead() -> Generation:
            deltas = []
            async for d in backend.stream(ahead, ahead_params):
                deltas.append(d)
                started.set()
            return collect(deltas, model="m", version="base")

        ahead_task = asyncio.create_task(read_ahead())
        await started.wait()
        joined = await backend.generate(newcomer, params)
        together = [await ahead_task, joined]
        assert backend.batches_run == 3 and backend.max_batch_seen == 2  # two alone, then one joined
    finally:
        await backend.aclose()
    _assert_same(together, alone, 2e-3)
