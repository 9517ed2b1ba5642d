"""The in-process backend on a tiny random Llama: logprobs, batching, stops, seeds, swaps, faults."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from models import (
    BackendConfig,
    BackendError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    GenerationDelta,
    InvalidGenerationRequest,
    SamplingParams,
    SwappableStudent,
    collect,
)
from models.local import LoadedModel, LocalBackend, load_model, pick_dtype
from tests.fakes import make_adapter

pytestmark = pytest.mark.anyio
MSG = (ChatMessage("user", "Where is my refund?"),)


@pytest.fixture
async def backend(tiny_model_dir: Path) -> AsyncIterator[LocalBackend]:
    b = LocalBackend(
        BackendConfig(kind="local", model=str(tiny_model_dir), dtype="float32", device="cpu", batch_wait_ms=50.0)
    )
    await b.start()
    try:
        yield b
    finally:
        await b.aclose()


async def test_greedy_logprobs_match_a_plain_forward_pass(backend: LocalBackend) -> None:
    gen = await backend.generate(MSG, SamplingParams(max_tokens=8, temperature=0, top_logprobs=3))
    assert gen.usage.completion_tokens == len(gen.token_ids) == len(gen.logprobs)
    loaded = backend.loaded
    assert loaded is not None
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": MSG[0].content}], add_generation_prompt=True, tokenize=False
    )
    ids = loaded.tokenizer(prompt, add_special_tokens=False)["input_ids"] + list(gen.token_ids)
    with torch.inference_mode():
        logits = loaded.model(torch.tensor([ids])).logits[0].float()
    expected = torch.log_softmax(logits, -1)
    n = len(ids) - len(gen.token_ids)
    for i, (tid, lp) in enumerate(zip(gen.token_ids, gen.logprobs, strict=True)):
        row = expected[n - 1 + i]
        assert int(row.argmax()) == tid  # greedy
        assert lp.logprob == pytest.approx(float(row[tid]), abs=1e-4)
        assert len(lp.top) == 3 and lp.top[0].logprob == pytest.approx(lp.logprob, abs=1e-4)


async def test_concurrent_requests_are_batched_and_match_solo_results(backend: LocalBackend) -> None:
    params = SamplingParams(max_tokens=6, temperature=0)
    prompts = [(ChatMessage("user", f"question number {i} " * (i + 1)),) for i in range(6)]
    solo = [await backend.generate(p, params) for p in prompts]
    batches_before = backend.batches_run
    together = await asyncio.gather(*[backend.generate(p, params) for p in prompts])
    assert backend.batches_run - batches_before < len(prompts)
    assert backend.max_batch_seen > 1
    # Left padding and row removal must not change any row's greedy output.
    assert [g.token_ids for g in together] == [g.token_ids for g in solo]


async def test_seeded_sampling_is_reproducible(backend: LocalBackend) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234)
    a = await backend.generate(MSG, params)
    b = await backend.generate(MSG, params)
    assert a.token_ids == b.token_ids


async def test_max_tokens_gives_length_finish(backend: LocalBackend) -> None:
    gen = await backend.generate(MSG, SamplingParams(max_tokens=3, temperature=0))
    if gen.finish_reason == "length":
        assert gen.usage.completion_tokens == 3
    else:  # the random model may emit EOS first; then it stopped early
        assert gen.usage.completion_tokens < 3


async def test_stop_string_truncates_and_never_leaks(backend: LocalBackend) -> None:
    free = await backend.generate(MSG, SamplingParams(max_tokens=20, temperature=0))
    if len(free.text) < 4:
        pytest.skip("tiny model produced too little text to cut")
    stop = free.text[2:4]
    deltas = [d async for d in backend.stream(MSG, SamplingParams(max_tokens=20, temperature=0, stop=(stop,)))]
    text = "".join(d.text for d in deltas)
    assert stop not in text
    assert text == free.text[: free.text.find(stop)]
    assert deltas[-1].finish_reason == "stop"


async def test_prompt_too_long_is_rejected(tiny_model_dir: Path) -> None:
    b = LocalBackend(BackendConfig(kind="local", model=str(tiny_model_dir), max_model_len=16, device="cpu"))
    await b.start()
    try:
        with pytest.raises(InvalidGenerationRequest):
            await b.generate((ChatMessage("user", "word " * 50),), SamplingParams(max_tokens=4))
    finally:
        await b.aclose()


async def test_not_started_or_closed_backend_is_unavailable(tiny_model_dir: Path) -> None:
    b = LocalBackend(BackendConfig(kind="local", model=str(tiny_model_dir), device="cpu"))
    with pytest.raises(BackendUnavailable):
        await b.generate(MSG, SamplingParams(max_tokens=2))
    await b.start()
    await b.aclose()
    with pytest.raises(BackendUnavailable):
        await b.generate(MSG, SamplingParams(max_tokens=2))


async def test_swap_serves_the_new_model_on_the_next_request(backend: LocalBackend, tmp_path: Path) -> None:
    from tests.fakes import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=7)
    params = SamplingParams(max_tokens=8, temperature=0)
    before = await backend.generate(MSG, params)
    await backend.swap(load_model(other, torch.device("cpu"), torch.float32, version="v2"))
    after = await backend.generate(MSG, params)
    assert after.version == "v2" and backend.info.version == "v2"
    assert after.logprobs != before.logprobs


async def test_unknown_model_is_a_clear_error(tmp_path: Path) -> None:
    b = LocalBackend(BackendConfig(kind="local", model=str(tmp_path / "nothing"), device="cpu"))
    with pytest.raises(BackendUnavailable, match="neither a bundled model"):
        await b.start()


async def test_load_version_merges_the_adapter_and_base_restores_the_outputs(
    backend: LocalBackend, tiny_model_dir: Path, tmp_path: Path
) -> None:
    assert isinstance(backend, SwappableStudent)
    params = SamplingParams(max_tokens=8, temperature=0)
    before = await backend.generate(MSG, params)
    await backend.load_version("v1", make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3))
    tuned = await backend.generate(MSG, params)
    assert tuned.version == backend.info.version == "v1"
    assert tuned.logprobs != before.logprobs
    await backend.load_version("base", None)
    after = await backend.generate(MSG, params)
    assert after.version == "base"
    assert (after.token_ids, after.logprobs) == (before.token_ids, before.logprobs)


async def test_a_bfloat16_version_keeps_the_buffers_transformers_keeps_in_float32(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    b = LocalBackend(BackendConfig(kind="local", model=str(tiny_model_dir), dtype="bfloat16", device="cpu"))
    await b.start()
    try:
        assert b.loaded is not None
        base = {name: t.dtype for name, t in b.loaded.model.named_buffers()}
        await b.load_version("v1", make_adapter(tiny_model_dir, tmp_path / "adapter", seed=3))
        assert b.loaded.version == "v1"
        assert {name: t.dtype for name, t in b.loaded.model.named_buffers()} == base
        assert torch.float32 in base.values()  # RoPE's inv_freq: what a cast of the whole model would round
        assert {p.dtype for p in b.loaded.model.parameters()} == {torch.bfloat16}
    finally:
        await b.aclose()


async def test_a_version_that_cannot_be_built_is_a_backend_error_and_the_old_one_serves_on(
    backend: LocalBackend, tmp_path: Path
) -> None:
    with pytest.raises(BackendError, match="cannot build version v9"):
        await backend.load_version("v9", tmp_path / "no-such-adapter")
    assert backend.info.version == "base"
    assert (await backend.generate(MSG, SamplingParams(max_tokens=2))).version == "base"


class _FaultyModel:
    """Stands in for the transformers model: every forward pass raises `fault`."""

    def __init__(self, model: object, fault: BaseException) -> None:
        self.config = model.config  # type: ignore[attr-defined]
        self.generation_config = model.generation_config  # type: ignore[attr-defined]
        self.fault = fault

    def __call__(self, **_: object) -> object:
        raise self.fault


class _DecodeBug(Exception):
    """A programming error in decode (not TypeError or IndexError, so nothing else can raise it)."""


@pytest.mark.parametrize(
    ("fault", "caller_sees"),
    [
        (_DecodeBug("bug in decode"), _DecodeBug),  # a bug: the caller gets it as it is
        (torch.OutOfMemoryError("out of memory"), BackendUnavailable),  # expected: a backend error
    ],
)
async def test_a_failed_batch_fails_every_row_and_the_owner_thread_serves_on(
    backend: LocalBackend, fault: BaseException, caller_sees: type[BaseException]
) -> None:
    good = backend.loaded
    assert good is not None
    await backend.swap(LoadedModel(_FaultyModel(good.model, fault), good.tokenizer, "faulty"))
    params = SamplingParams(max_tokens=4, temperature=0)
    prompts = [(ChatMessage("user", f"question {i}"),) for i in range(3)]
    batches_before = backend.batches_run
    results = await asyncio.gather(*[backend.generate(p, params) for p in prompts], return_exceptions=True)
    assert backend.batches_run - batches_before < len(prompts)  # some batch held several rows
    assert all(type(r) is caller_sees for r in results), results
    if caller_sees is _DecodeBug:
        assert results[0] is fault and not isinstance(results[0], BackendError)
    await backend.swap(good)
    assert (await backend.generate(MSG, params)).usage.completion_tokens > 0


async def test_a_swap_runs_after_the_batch_it_met_even_under_steady_load(tiny_model_dir: Path) -> None:
    """A call met while a batch was filling runs right after that batch. It used to be put back
    at the end of the inbox, behind the jobs that came in meanwhile: with callers arriving all
    the time (rows finish at different steps), a hot-swap waited until the load stopped."""
    backend = LocalBackend(BackendConfig(kind="local", model=str(tiny_model_dir), dtype="float32", device="cpu"))
    await backend.start()
    stop = asyncio.Event()

    async def client(i: int) -> None:
        params = SamplingParams(max_tokens=2 + i % 7, temperature=0)  # rows leave the batch at different steps
        for _ in range(150):  # bounded: with the old queueing a call waited out all of this
            if stop.is_set():
                return
            await backend.generate((ChatMessage("user", f"steady load {i}"),), params)

    clients = [asyncio.create_task(client(i)) for i in range(12)]
    waits = []
    try:
        await asyncio.sleep(0.2)
        for _ in range(5):
            before = backend.batches_run
            await backend.call_on_owner(lambda: None)
            waits.append(backend.batches_run - before)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        await backend.aclose()
    assert max(waits) <= 2, f"calls waited {waits} batches"


LONG = (ChatMessage("user", "Tell me everything about refunds, shipping and passwords."),)
LONG_PARAMS = SamplingParams(max_tokens=200, temperature=0)


async def _start_long(backend: LocalBackend) -> asyncio.Task[list[GenerationDelta]]:
    """Stream LONG (greedy, 200 tokens) and return once its first token came; the task returns
    every delta."""
    started = asyncio.Event()

    async def read() -> list[GenerationDelta]:
        deltas = []
        async for d in backend.stream(LONG, LONG_PARAMS):
            deltas.append(d)
            started.set()
        return deltas

    task = asyncio.create_task(read())
    await started.wait()
    return task


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(max_tokens=12, temperature=0, top_logprobs=3),
        SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7, top_logprobs=1),
    ],
    ids=["greedy", "seeded"],
)
async def test_a_newcomer_joins_the_running_batch_and_decodes_as_it_would_alone(
    backend: LocalBackend, params: SamplingParams
) -> None:
    """Continuous batching: a request sent while another decodes starts at the next step, in the
    same batch (not after it), and both get the tokens they get alone; logprobs up to rounding."""
    newcomer = (ChatMessage("user", "Is shipping free?"),)  # shorter than LONG: padded in front
    long_alone = await backend.generate(LONG, LONG_PARAMS)
    alone = await backend.generate(newcomer, params)
    assert long_alone.usage.completion_tokens > 100  # long enough to still run when the newcomer comes

    batches_before, order = backend.batches_run, []
    long_task = await _start_long(backend)
    long_task.add_done_callback(lambda _: order.append("long finished"))
    deltas = []
    async for d in backend.stream(newcomer, params):
        if not deltas:
            order.append("newcomer's first token")
        deltas.append(d)
    long_deltas = await long_task

    assert order == ["newcomer's first token", "long finished"]
    assert backend.batches_run - batches_before == 1 and backend.max_batch_seen >= 2
    joined = collect(deltas, model="m", version="base")
    long_joined = collect(long_deltas, model="m", version="base")
    for got, want in ((joined, alone), (long_joined, long_alone)):
        assert (got.token_ids, got.text, got.finish_reason) == (want.token_ids, want.text, want.finish_reason)
        for x, y in zip(got.logprobs, want.logprobs, strict=True):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t.token_id for t in x.top] == [t.token_id for t in y.top]


class _CountingModel:
    """The transformers model, recording the rows and attention width of every decode forward."""

    def __init__(self, model: object) -> None:
        self.model = model
        self.config = model.config  # type: ignore[attr-defined]
        self.generation_config = model.generation_config  # type: ignore[attr-defined]
        self.decode_rows: list[int] = []
        self.decode_widths: list[int] = []

    def __call__(self, **kwargs: torch.Tensor) -> object:
        if kwargs["input_ids"].shape[1] == 1:
            self.decode_rows.append(kwargs["input_ids"].shape[0])
            self.decode_widths.append(kwargs["attention_mask"].shape[1])
        return self.model(**kwargs)  # type: ignore[operator]


async def _counting(backend: LocalBackend) -> _CountingModel:
    good = backend.loaded
    assert good is not None
    counting = _CountingModel(good.model)
    await backend.swap(LoadedModel(counting, good.tokenizer, "counted"))
    return counting


async def test_a_caller_that_stops_reading_leaves_the_batch_at_the_next_step(backend: LocalBackend) -> None:
    counting = await _counting(backend)
    long_task = await _start_long(backend)
    reader = backend.stream(MSG, SamplingParams(max_tokens=100, temperature=0))
    await anext(reader)
    decoded_before = len(counting.decode_rows)
    await reader.aclose()  # stream()'s finally cancels the job, as when a client disconnects
    await long_task
    after = counting.decode_rows[decoded_before:]
    # At most the step already running when the caller left still carries its row; every later
    # step decodes the long request alone, and there are such steps (it was still running).
    assert after.count(2) <= 1 and after[-1] == 1 and all(n <= 2 for n in after), after


async def test_a_swap_closes_the_batch_to_newcomers_and_running_rows_finish_on_the_old_model(
    backend: LocalBackend, tmp_path: Path
) -> None:
    from tests.fakes import build_tiny_model

    other = load_model(build_tiny_model(tmp_path / "other", seed=7), torch.device("cpu"), torch.float32, version="v2")
    long_task = await _start_long(backend)
    swap = asyncio.create_task(backend.swap(other))
    await asyncio.sleep(0)  # the swap is queued before the newcomer
    newcomer = asyncio.create_task(backend.generate(MSG, SamplingParams(max_tokens=4, temperature=0)))
    long_deltas = await long_task
    await swap
    assert long_deltas[-1].version == "base"
    assert (await newcomer).version == "v2"


async def test_a_row_that_outlives_a_wider_one_loses_its_padding_and_decodes_as_alone(backend: LocalBackend) -> None:
    """The newcomer joins behind LONG's prompt and first tokens (padded in front to that width);
    once LONG leaves, that padding is cut, and its tokens are still those it gets alone."""
    counting = await _counting(backend)
    newcomer, params = (ChatMessage("user", "hi"),), SamplingParams(max_tokens=60, temperature=0, top_logprobs=2)
    alone = await backend.generate(newcomer, params)
    assert alone.usage.completion_tokens > 20
    short_long = SamplingParams(max_tokens=10, temperature=0)
    started = asyncio.Event()

    async def read_long() -> None:
        async for _ in backend.stream(LONG, short_long):
            started.set()

    long_task = asyncio.create_task(read_long())
    await started.wait()
    decoded_before = len(counting.decode_rows)
    joined = await backend.generate(newcomer, params)
    await long_task
    rows, widths = counting.decode_rows[decoded_before:], counting.decode_widths[decoded_before:]
    left = rows.index(1, rows.index(2))  # the first step after LONG left (it ran alone before the join)
    assert widths[left] < widths[left - 1]  # the newcomer's padding in front was cut
    assert (joined.token_ids, joined.text) == (alone.token_ids, alone.text)
    for x, y in zip(joined.logprobs, alone.logprobs, strict=True):
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)


async def test_a_job_that_waited_out_its_deadline_fails_at_admission_without_a_prefill(
    backend: LocalBackend,
) -> None:
    """A job kept waiting (behind a swap, say) past its deadline gets its timeout when it would
    have joined the batch, and takes no row: the others are admitted as usual."""
    from models.local import _Job

    def job(deadline: float) -> _Job:
        loop = asyncio.get_running_loop()
        return _Job([1, 2], SamplingParams(max_tokens=2), (), False, loop, asyncio.Queue(), deadline)

    late, fresh = job(time.monotonic() - 1.0), job(time.monotonic() + 60.0)
    waiting = deque([late, fresh])
    assert backend._admit(waiting, None) == [fresh]
    err = await asyncio.wait_for(late.out.get(), 5)
    assert isinstance(err, BackendTimeout) and "before it started" in str(err)


def test_auto_dtype_is_bfloat16_only_where_the_hardware_computes_in_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU without AVX-512 BF16 or AMX emulates bfloat16 (3.4x slower at 16 callers on one,
    bench/README.md): `auto` serves float32 there; named dtypes are taken as given."""
    cpu = torch.device("cpu")
    assert pick_dtype("float32", cpu) is torch.float32 and pick_dtype("bfloat16", cpu) is torch.bfloat16
    for supported, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda s=supported: s)
        assert pick_dtype("auto", cpu) is expected
    for supported, expected in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda s=supported: s)
        assert pick_dtype("auto", torch.device("cuda")) is expected
    backend = LocalBackend(BackendConfig(kind="local", model="tiny", device="cpu"))
    assert backend.info.detail["dtype"] == str(pick_dtype("auto", cpu)).removeprefix("torch.")
