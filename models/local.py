"""In-process transformers backend with continuous (iteration-level) batching on one owner thread.

Requests from any coroutine are queued; the owner thread decodes every running request together,
one token per step, in one KV-cached batch with per-row sampling, stop strings and deadlines,
and sends tokens back to each caller's event loop as they come. A request that arrives while a
batch runs is prefilled on a cache of its own and joins the batch at the next step (the caches
padded in front to one length, at most `max_batch_size` rows); a row that finishes, or whose
caller stopped reading, leaves at once. A `call_on_owner` (a hot-swap) runs between steps: it
closes the batch to newcomers, the rows already running finish on the old model, then it runs.
Torch never runs on the event loop. Running out of memory is a BackendError; anything else
raised while decoding is a bug, and reaches each caller in the batch as it is. It knows nothing
about tiers or routing, and neither pages the KV cache nor preempts rows: that is vLLM's job
(`models/remote.py`).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from models.base import (
    BackendInfo,
    ChatMessage,
    Generation,
    GenerationDelta,
    SamplingParams,
    TokenLogprob,
    TopLogprob,
    Usage,
    check_prompt_fits,
    generate_from_stream,
)
from models.config import BackendConfig
from models.convert import resolve_model_dir
from models.errors import BackendError, BackendTimeout, BackendUnavailable
from models.prefix import PrefixKV, join_caches, joinable, static_prefix
from models.prompt import Prompt, build_prompt

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(eq=False)
class _Job:
    prompt_ids: list[int]
    params: SamplingParams
    stops: tuple[str, ...]
    lstrip: bool
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[GenerationDelta | BaseException]
    deadline: float
    cancelled: threading.Event = field(default_factory=threading.Event)

    def emit(self, item: GenerationDelta | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed: nobody is listening any more
            self.cancelled.set()


@dataclass(eq=False)
class _Call:
    """A function to run on the owner thread when no batch runs (e.g. a student hot-swap)."""

    fn: Callable[[], Any]
    future: Future[Any]


@dataclass
class _Row:
    job: _Job
    generator: torch.Generator | None
    ids: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    pending_lp: list[TokenLogprob] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)
    done: bool = False


class LoadedModel:
    """A tokenizer and model pair, immutable once built. Swaps build a new one."""

    def __init__(self, model: Any, tokenizer: Any, version: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.version = version
        # The static start of this backend's prompts, set when the backend installs the model
        # (it depends on the backend's prompt format and system prompt); None = no prefix cache.
        self.prefix: PrefixKV | None = None
        eos: set[int] = set()
        for candidate in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
            if isinstance(candidate, int):
                eos.add(candidate)
            elif isinstance(candidate, list):
                eos.update(c for c in candidate if isinstance(c, int))
        self.eos_ids = frozenset(eos)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos or {0})


# Loads are serialised: two at once only fight over the same cores (and transformers'
# lazy imports are not safe to run from two threads at once).
_LOAD_LOCK = threading.Lock()


def load_model(
    path: Path, device: torch.device, dtype: torch.dtype, version: str = "base", adapter: Path | None = None
) -> LoadedModel:
    """The base weights at `path`, with the peft LoRA `adapter` merged in when given."""
    with _LOAD_LOCK:
        return _load_model(path, device, dtype, version, adapter)


def _load_model(
    path: Path, device: torch.device, dtype: torch.dtype, version: str, adapter: Path | None
) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(path)
    # Loaded in the serving dtype, and the adapter merged there: `.to(dtype)` afterwards would
    # also cast the buffers transformers keeps in float32 (RoPE's inv_freq), so a version would
    # not compute like the base model it was built on.
    model: Any = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter is not None:
        from peft import PeftModel  # only a student that swaps versions needs peft

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model = model.to(device)
    model.eval()
    return LoadedModel(model, tokenizer, version)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """The serving dtype; "auto" is bfloat16 only where the hardware computes in it. A CPU
    without AVX-512 BF16 or AMX (oneDNN's check) emulates bfloat16 in float32 and pays for the
    conversions: there float32 is the faster one."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


class LocalBackend:
    """A transformers model served from one owner thread. See the module docstring."""

    def __init__(self, config: BackendConfig, *, cache_dir: Path | None = None) -> None:
        self.config = config
        self._cache_dir = cache_dir
        self._device = pick_device(config.device)
        self._dtype = pick_dtype(config.dtype, self._device)
        self._inbox: queue.Queue[_Job | _Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._path: Path | None = None  # the base weights, resolved once by start()
        self._loaded: LoadedModel | None = None
        self._closed = False
        # Observable in tests and benchmarks. A batch runs from its first rows until no row is
        # left; under steady load that can be one batch for the whole run.
        self.batches_run = 0
        self.max_batch_seen = 0  # most rows decoded in one step
        self.steps_run = 0  # decode steps (one token for every running row)
        self.rows_stepped = 0  # rows summed over those steps: rows_stepped / steps_run is the mean batch

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def info(self) -> BackendInfo:
        loaded = self._loaded
        return BackendInfo(
            name=self.config.name,
            kind="local",
            version=loaded.version if loaded else "base",
            ready=loaded is not None and not self._closed,
            detail={"device": str(self._device), "dtype": str(self._dtype).removeprefix("torch.")},
        )

    @property
    def loaded(self) -> LoadedModel | None:
        return self._loaded

    async def start(self) -> None:
        if self._thread is not None:
            return
        path = self._path = await asyncio.to_thread(resolve_model_dir, self.config.model, self._cache_dir)
        self._thread = threading.Thread(target=self._owner, name=f"tiergate-{self.config.name}", daemon=True)
        self._thread.start()
        await self.call_on_owner(lambda: self._install(load_model(path, self._device, self._dtype)))
        log.info("loaded %s from %s on %s", self.config.name, path, self._device)

    def _install(self, loaded: LoadedModel) -> None:
        if self.config.prefix_cache and loaded.prefix is None:
            ids = static_prefix(self.config, loaded.tokenizer)
            loaded.prefix = PrefixKV(ids) if ids else None
        self._loaded = loaded

    async def call_on_owner(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the owner thread when no batch runs, so it never overlaps a generation.

        A batch running when it arrives takes no newcomers; its rows finish (each within its
        own `max_tokens` steps), then `fn` runs, then the requests that waited start."""
        if self._thread is None or self._closed:
            raise BackendUnavailable(f"{self.config.name} is not running")
        fut: Future[Any] = Future()
        self._inbox.put(_Call(fn, fut))
        return await asyncio.wrap_future(fut)

    async def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` from the next batch on; rows already running finish on the old one."""
        await self.call_on_owner(lambda: self._install(loaded))

    async def load_version(self, version: str, adapter: Path | None) -> None:
        """Build `version` (the base weights, plus `adapter` merged in) off the owner thread, so
        serving goes on meanwhile, then `swap` to it. Raises BackendError; the old model serves on.
        """
        path = self._path
        if path is None or self._closed:
            raise BackendUnavailable(f"{self.config.name} is not running")
        try:
            loaded = await asyncio.to_thread(load_model, path, self._device, self._dtype, version, adapter)
        except torch.OutOfMemoryError as exc:
            raise BackendUnavailable(f"{self.config.name}: out of memory building version {version}") from exc
        except (OSError, ValueError) as exc:  # missing or unreadable files; an adapter that does not fit
            raise BackendError(f"{self.config.name}: cannot build version {version}: {exc}") from exc
        await self.swap(loaded)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join, 30)

    # -- public generation API ---------------------------------------------------------------
    async def generate(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> Generation:
        loaded = self._loaded
        version = loaded.version if loaded else "base"
        return await generate_from_stream(self.stream(messages, params), model=self.config.name, version=version)

    async def stream(self, messages: tuple[ChatMessage, ...], params: SamplingParams) -> AsyncIterator[GenerationDelta]:
        loaded = self._loaded
        if loaded is None or self._closed:
            raise BackendUnavailable(f"{self.config.name} is still loading or shutting down")
        prompt_ids, prompt = self._encode(loaded, messages, params)
        job = _Job(
            prompt_ids=prompt_ids,
            params=params,
            stops=tuple(params.stop) + prompt.stops,
            lstrip=prompt.lstrip,
            loop=asyncio.get_running_loop(),
            out=asyncio.Queue(),
            deadline=time.monotonic() + self.config.read_timeout_s,
        )
        self._inbox.put(job)
        try:
            while True:
                item = await job.out.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            job.cancelled.set()  # a caller that stops reading frees its batch row at the next step

    def _encode(
        self, loaded: LoadedModel, messages: tuple[ChatMessage, ...], params: SamplingParams
    ) -> tuple[list[int], Prompt]:
        prompt = build_prompt(self.config, loaded.tokenizer, messages)
        ids: list[int] = loaded.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        check_prompt_fits(self.config, len(ids), params)
        return ids, prompt

    # -- owner thread ------------------------------------------------------------------------
    def _owner(self) -> None:
        waiting: deque[_Job] = deque()  # taken from the inbox, not yet in the batch
        # Calls wait for the running batch to finish and close it to newcomers meanwhile. A call
        # put back behind the jobs that arrived after it never ran under steady load (a hot-swap
        # starved for 60 s+); one that only waited for the batch to end would starve too now,
        # since newcomers could keep a batch running for ever.
        calls: list[_Call] = []
        batch: _Batch | None = None
        stopping = False
        while True:
            stopping = self._collect(waiting, calls, idle=batch is None and not stopping) or stopping
            if batch is None:
                if stopping:
                    break
                for call in calls:
                    self._run_call(call)
                calls.clear()
            newcomers = [] if calls or stopping else self._admit(waiting, batch)
            if batch is not None or newcomers:
                batch = self._run_step(batch, newcomers)
        for pending in [*waiting, *calls, *self._drain_inbox()]:
            if isinstance(pending, _Job):
                pending.emit(BackendUnavailable(f"{self.config.name} is shutting down"))
            else:
                pending.future.set_exception(BackendUnavailable("backend closed"))

    def _collect(self, waiting: deque[_Job], calls: list[_Call], *, idle: bool) -> bool:
        """Move what the inbox holds into `waiting` and `calls`; True once `aclose` asked to stop.

        When `idle` and nothing waits, block for the first item, then give more jobs up to
        `batch_wait_ms` to arrive, so that a burst starts with one prefill for all of it."""
        block = idle and not waiting and not calls
        fill_until = 0.0
        while True:
            if block:
                item = self._inbox.get()
                block, fill_until = False, time.monotonic() + self.config.batch_wait_ms / 1000
            else:
                filling = not calls and len(waiting) < self.config.max_batch_size
                timeout = fill_until - time.monotonic() if filling else 0.0
                try:
                    item = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    return False
            if item is None:
                return True
            if isinstance(item, _Call):
                calls.append(item)
            else:
                waiting.append(item)

    def _admit(self, waiting: deque[_Job], batch: _Batch | None) -> list[_Job]:
        """The waiting jobs that join now, oldest first, up to the batch's free rows."""
        if batch is not None and not batch.joinable:
            return []  # this model's cache cannot be padded and joined: newcomers wait for the batch to end
        room = self.config.max_batch_size - (len(batch.rows) if batch is not None else 0)
        jobs: list[_Job] = []
        now = time.monotonic()
        while waiting and len(jobs) < room:
            job = waiting.popleft()
            if job.cancelled.is_set():
                continue
            if now > job.deadline:  # it waited out its deadline (behind a swap, say): no prefill for it
                job.emit(BackendTimeout("generation exceeded its deadline before it started"))
                continue
            jobs.append(job)
        return jobs

    def _drain_inbox(self) -> list[_Job | _Call]:
        items: list[_Job | _Call] = []
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return items
            if item is not None:
                items.append(item)

    @staticmethod
    def _run_call(call: _Call) -> None:
        try:
            call.future.set_result(call.fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
            call.future.set_exception(exc)

    def _run_step(self, batch: _Batch | None, newcomers: list[_Job]) -> _Batch | None:
        """Prefill `newcomers` into `batch` (a new one if None), then one decode step for every
        row. The batch, or None once no row is left or the step failed."""
        loaded = batch.loaded if batch is not None else self._loaded
        assert loaded is not None
        if batch is None:
            self.batches_run += 1
        try:
            with torch.inference_mode():
                if newcomers:
                    fresh = _prefill_batch(loaded, newcomers, self._device)
                    batch = fresh if batch is None else _join(batch, fresh)
                assert batch is not None
                self.max_batch_seen = max(self.max_batch_seen, len(batch.rows))
                self.steps_run += 1
                self.rows_stepped += len(batch.rows)
                return batch if _step(batch, self._device) else None
        except torch.OutOfMemoryError as exc:
            jobs = _jobs(batch, newcomers)
            log.warning("batch of %d ran out of memory on %s", len(jobs), self.config.name)
            error = BackendUnavailable(f"{self.config.name}: out of memory ({len(jobs)} requests)")
            error.__cause__ = exc
            self._fail(jobs, error)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the owner thread
            # Anything else is a bug, not a backend failure: each caller gets the exception
            # itself, with its traceback, and the gateway logs it and answers 500 rather than
            # escalating it as a student error.
            self._fail(_jobs(batch, newcomers), exc)
        return None

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        """Send `error` to every request of a batch (one that already has its answer never reads it)."""
        for job in jobs:
            job.emit(error)


@dataclass(eq=False)
class _Batch:
    """The rows decoding together on one model; each tensor has one row per entry of `rows`."""

    loaded: LoadedModel
    rows: list[_Row]
    cache: DynamicCache
    mask_B_T: torch.Tensor  # 1 = a prompt or generated token, 0 = left padding
    next_pos_B: torch.Tensor  # each row's position for its next token
    logits_B_V: torch.Tensor  # each row's logits for its next token, not sampled yet
    joinable: bool  # the cache's layers can be padded and joined (models/prefix.py)


def _jobs(batch: _Batch | None, newcomers: list[_Job]) -> list[_Job]:
    """Every request of a step, once each (newcomers may already be rows of `batch`)."""
    rows = batch.rows if batch is not None else []
    return list(dict.fromkeys([*(r.job for r in rows), *newcomers]))


def _prefill_batch(loaded: LoadedModel, jobs: list[_Job], device: torch.device) -> _Batch:
    """A batch of `jobs` alone, with left padding, prefilled and ready for its first sample.

    When every prompt starts with the model's cached static prefix, only the rest of each is
    prefilled (models/prefix.py)."""
    model = loaded.model
    rows = [_Row(job=j, generator=_generator(j.params, device)) for j in jobs]
    prefix = loaded.prefix
    if prefix is not None and all(prefix.covers(j.prompt_ids) for j in jobs) and prefix.ready(model, device):
        cache, mask_B_T, next_pos_B, logits_B_V = prefix.prefill(model, [j.prompt_ids for j in jobs], device)
    else:
        cache, mask_B_T, next_pos_B, logits_B_V = _prefill(model, loaded.pad_id, jobs, device)
    return _Batch(loaded, rows, cache, mask_B_T, next_pos_B, logits_B_V, joinable(cache))


def _join(running: _Batch, fresh: _Batch) -> _Batch:
    """`fresh`'s rows appended to `running`'s: the shorter side's caches and masks padded in front,
    so every row sees what it saw alone (positions are per row and unchanged)."""
    width = max(running.mask_B_T.shape[1], fresh.mask_B_T.shape[1])
    masks = [F.pad(b.mask_B_T, (width - b.mask_B_T.shape[1], 0)) for b in (running, fresh)]
    return _Batch(
        running.loaded,
        running.rows + fresh.rows,
        join_caches([running.cache, fresh.cache]),
        torch.cat(masks),
        torch.cat([running.next_pos_B, fresh.next_pos_B]),
        torch.cat([running.logits_B_V, fresh.logits_B_V]),
        running.joinable,
    )


def _step(batch: _Batch, device: torch.device) -> bool:
    """Sample and emit each row's next token, drop the rows that finished, and run one decode
    forward for the rest. False once no row is left."""
    loaded, rows, tok = batch.loaded, batch.rows, batch.loaded.tokenizer
    logprobs_B_V = torch.log_softmax(batch.logits_B_V, dim=-1)
    chosen = _choose(rows, batch.logits_B_V)
    max_top = max(r.job.params.top_logprobs for r in rows)
    top_vals_B_K = top_ids_B_K = None
    if max_top:
        top_vals_B_K, top_ids_B_K = logprobs_B_V.topk(max_top, dim=-1)
    chosen_lp = logprobs_B_V.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    chosen_ids = chosen.tolist()
    now = time.monotonic()
    for b, row in enumerate(rows):
        tid = chosen_ids[b]
        top: tuple[TopLogprob, ...] = ()
        if row.job.params.top_logprobs and top_vals_B_K is not None and top_ids_B_K is not None:
            k = row.job.params.top_logprobs
            top = tuple(
                TopLogprob(tok.decode([i]), v, i)
                for i, v in zip(top_ids_B_K[b, :k].tolist(), top_vals_B_K[b, :k].tolist(), strict=True)
            )
        _advance(row, tid, chosen_lp[b], top, loaded, now)
    keep = [b for b, r in enumerate(rows) if not r.done]
    if not keep:
        return False
    if len(keep) < len(rows):  # finished rows leave the batch: no wasted compute on them
        idx = torch.tensor(keep, device=device)
        batch.cache.batch_select_indices(idx)
        batch.rows = [rows[b] for b in keep]
        chosen = chosen[idx]
        batch.mask_B_T = batch.mask_B_T[idx]
        batch.next_pos_B = batch.next_pos_B[idx]
        if batch.joinable:
            _trim(batch)
    batch.mask_B_T = torch.cat([batch.mask_B_T, batch.mask_B_T.new_ones((len(batch.rows), 1))], dim=1)
    out = loaded.model(
        input_ids=chosen.unsqueeze(1),
        attention_mask=batch.mask_B_T,
        position_ids=batch.next_pos_B.unsqueeze(1),
        cache=batch.cache,
        use_cache=True,
    )
    batch.logits_B_V = out.logits[:, -1, :].float()
    batch.next_pos_B = batch.next_pos_B + 1
    return True


def _trim(batch: _Batch) -> None:
    """Drop the columns that are padding in every row left, so a long row that left the batch
    no longer widens every other row's attention (and its cache copies) for the rest of it."""
    width = batch.mask_B_T.shape[1]
    cut = int(batch.mask_B_T.any(dim=0).int().argmax())  # the first column some row uses
    if cut == 0:
        return
    batch.mask_B_T = batch.mask_B_T[:, cut:]
    layers: list[Any] = batch.cache.layers  # all _JOINABLE (models/prefix.py), checked by the caller
    for layer in layers:
        # A sliding-window layer may hold fewer than `width` positions: its last ones.
        keep = min(layer.keys.shape[-2], width - cut)
        layer.keys = layer.keys[..., -keep:, :]
        layer.values = layer.values[..., -keep:, :]
        if isinstance(layer, DynamicSlidingWindowLayer):
            layer.cumulative_length = width - cut


def _prefill(
    model: Any, pad_id: int, jobs: list[_Job], device: torch.device
) -> tuple[DynamicCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prefill whole prompts, left-padded into one batch: the cache, the mask [B, T], each row's
    next position [B] and its last logits [B, V]."""
    width = max(len(j.prompt_ids) for j in jobs)
    input_ids_B_T = torch.full((len(jobs), width), pad_id, dtype=torch.long)
    mask_B_T = torch.zeros((len(jobs), width), dtype=torch.long)
    for b, j in enumerate(jobs):
        input_ids_B_T[b, width - len(j.prompt_ids) :] = torch.tensor(j.prompt_ids)
        mask_B_T[b, width - len(j.prompt_ids) :] = 1
    input_ids_B_T, mask_B_T = input_ids_B_T.to(device), mask_B_T.to(device)
    positions_B_T = (mask_B_T.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache(config=model.config)
    out = model(
        input_ids=input_ids_B_T,
        attention_mask=mask_B_T,
        position_ids=positions_B_T,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,  # only the last position is sampled: no [B, T, V] logits for the prompt
    )
    return cache, mask_B_T, positions_B_T[:, -1] + 1, out.logits[:, -1, :].float()


def _generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return gen


def _choose(rows: list[_Row], logits_B_V: torch.Tensor) -> torch.Tensor:
    chosen = logits_B_V.argmax(dim=-1)
    for b, row in enumerate(rows):
        p = row.job.params
        if row.generator is None:
            continue
        probs_V = torch.softmax(logits_B_V[b] / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_p, sorted_i = probs_V.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < p.top_p  # always keeps the most likely token
            probs_V = torch.zeros_like(probs_V).scatter_(0, sorted_i[keep], sorted_p[keep])
        chosen[b] = torch.multinomial(probs_V, 1, generator=row.generator)[0]
    return chosen


def _advance(row: _Row, tid: int, lp: float, top: tuple[TopLogprob, ...], loaded: LoadedModel, now: float) -> None:
    """Append one token to a row, emit whatever text is now final, and finish it if due."""
    job, tok = row.job, loaded.tokenizer
    if job.cancelled.is_set():
        row.done = True
        return
    if now > job.deadline:
        row.done = True
        job.emit(BackendTimeout("generation exceeded its deadline"))
        return
    finish: str | None = None
    if tid in loaded.eos_ids:
        finish = "stop"
    else:
        row.ids.append(tid)
        row.pending_ids.append(tid)
        row.pending_lp.append(TokenLogprob(tok.decode([tid]), lp, tid, top))
        row.text = tok.decode(row.ids, skip_special_tokens=True)
        if job.lstrip:
            row.text = row.text.lstrip()
        for s in job.stops:
            cut = row.text.find(s, max(0, row.sent - len(s)))
            if cut != -1:
                row.text = row.text[:cut]
                finish = "stop"
        if finish is None and len(row.ids) >= job.params.max_tokens:
            finish = "length"
    if finish is None:
        # Hold back a possible stop-string prefix and half-decoded UTF-8 until it is final.
        hold = max((len(s) - 1 for s in job.stops), default=0)
        upto = len(row.text) - hold
        if row.text.endswith("\ufffd"):
            upto = min(upto, len(row.text) - 1)
        if upto > row.sent:
            _flush(row, upto, None)
        return
    row.done = True
    _flush(row, len(row.text), finish, Usage(len(job.prompt_ids), len(row.ids)), loaded.version)


def _flush(row: _Row, upto: int, finish: str | None, usage: Usage | None = None, version: str | None = None) -> None:
    delta = GenerationDelta(
        text=row.text[row.sent : upto] if upto > row.sent else "",
        logprobs=tuple(row.pending_lp),
        token_ids=tuple(row.pending_ids),
        finish_reason=finish,  # type: ignore[arg-type]
        usage=usage,
        version=version,
    )
    row.sent = max(row.sent, upto)
    row.pending_lp, row.pending_ids = [], []
    row.job.emit(delta)
