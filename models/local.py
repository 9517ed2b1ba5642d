"""In-process transformers backend with dynamic batching on one owner thread per backend.

Requests from any coroutine are queued; the owner thread takes every request waiting (up to
`max_batch_size`), decodes them together in one batched KV-cached loop with per-row sampling,
stop strings and deadlines, and sends tokens back to each caller's event loop as they come.
Torch never runs on the event loop. Finished rows leave the batch at once; requests that
arrive during a batch wait for the next one (no mid-batch joins: that needs paged KV, which is
vLLM's job, see `models/remote.py`). Running out of memory is a BackendError; anything else
raised while decoding is a bug, and reaches each caller in the batch as it is. It knows
nothing about tiers or routing.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

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
from models.prefix import PrefixKV, static_prefix
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
    """A function to run on the owner thread between batches (e.g. a student hot-swap)."""

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


class LocalBackend:
    """A transformers model served from one owner thread. See the module docstring."""

    def __init__(self, config: BackendConfig, *, cache_dir: Path | None = None) -> None:
        self.config = config
        self._cache_dir = cache_dir
        self._device = pick_device(config.device)
        self._dtype = _DTYPES[config.dtype]
        self._inbox: queue.Queue[_Job | _Call | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._path: Path | None = None  # the base weights, resolved once by start()
        self._loaded: LoadedModel | None = None
        self._closed = False
        self.batches_run = 0  # observable in tests and benchmarks: proves requests were batched
        self.max_batch_seen = 0

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def info(self) -> BackendInfo:
        loaded = self._loaded
        return BackendInfo(
            name=self.config.name,
            kind="local",
            version=loaded.version if loaded else "base",
            ready=loaded is not None and not self._closed,
            detail={"device": str(self._device), "dtype": self.config.dtype},
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
        """Run `fn` on the owner thread between batches, so it never overlaps a generation."""
        if self._thread is None or self._closed:
            raise BackendUnavailable(f"{self.config.name} is not running")
        fut: Future[Any] = Future()
        self._inbox.put(_Call(fn, fut))
        return await asyncio.wrap_future(fut)

    async def swap(self, loaded: LoadedModel) -> None:
        """Serve `loaded` from the next batch on; batches already running finish on the old one."""
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
            job.cancelled.set()  # a caller that stops reading frees its batch row

    def _encode(
        self, loaded: LoadedModel, messages: tuple[ChatMessage, ...], params: SamplingParams
    ) -> tuple[list[int], Prompt]:
        prompt = build_prompt(self.config, loaded.tokenizer, messages)
        ids: list[int] = loaded.tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"]
        check_prompt_fits(self.config, len(ids), params)
        return ids, prompt

    # -- owner thread ------------------------------------------------------------------------
    def _owner(self) -> None:
        # Calls (swaps) met while a batch was filling: they run right after that batch, before
        # any later job. Put back at the end of the inbox they would wait behind every job that
        # arrived meanwhile, and under steady load a hot-swap never ran (starved for 60 s+).
        deferred: list[_Call] = []
        while True:
            for call in deferred:
                self._run_call(call)
            deferred.clear()
            item = self._inbox.get()
            if item is None:
                break
            if isinstance(item, _Call):
                self._run_call(item)
                continue
            jobs = [item]
            wait_until = time.monotonic() + self.config.batch_wait_ms / 1000
            stop = False
            while len(jobs) < self.config.max_batch_size:
                timeout = wait_until - time.monotonic()
                try:
                    nxt = self._inbox.get(timeout=timeout) if timeout > 0 else self._inbox.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                if isinstance(nxt, _Call):
                    deferred.append(nxt)  # runs after this batch
                    break
                jobs.append(nxt)
            live = [j for j in jobs if not j.cancelled.is_set()]
            if live:
                self._run_batch(live)
            if stop:
                break
        for pending in [*deferred, *self._drain_inbox()]:
            if isinstance(pending, _Job):
                pending.emit(BackendUnavailable(f"{self.config.name} is shutting down"))
            else:
                pending.future.set_exception(BackendUnavailable("backend closed"))

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

    def _run_batch(self, jobs: list[_Job]) -> None:
        loaded = self._loaded
        assert loaded is not None
        self.batches_run += 1
        self.max_batch_seen = max(self.max_batch_seen, len(jobs))
        try:
            with torch.inference_mode():
                _decode(loaded, jobs, self._device)
        except torch.OutOfMemoryError as exc:
            log.warning("batch of %d ran out of memory on %s", len(jobs), self.config.name)
            error = BackendUnavailable(f"{self.config.name}: out of memory ({len(jobs)} requests)")
            error.__cause__ = exc
            self._fail(jobs, error)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not kill the owner thread
            # Anything else is a bug, not a backend failure: each caller gets the exception
            # itself, with its traceback, and the gateway logs it and answers 500 rather than
            # escalating it as a student error.
            self._fail(jobs, exc)

    @staticmethod
    def _fail(jobs: list[_Job], error: BaseException) -> None:
        """Send `error` to every request of a batch (one that already has its answer never reads it)."""
        for job in jobs:
            job.emit(error)


def _decode(loaded: LoadedModel, jobs: list[_Job], device: torch.device) -> None:
    """Batched decode of `jobs` with left padding, a shared KV cache and per-row sampling.

    When every prompt starts with the model's cached static prefix, only the rest of each is
    prefilled (models/prefix.py)."""
    model, tok = loaded.model, loaded.tokenizer
    rows = [_Row(job=j, generator=_generator(j.params, device)) for j in jobs]
    prefix = loaded.prefix
    if prefix is not None and all(prefix.covers(j.prompt_ids) for j in jobs) and prefix.ready(model, device):
        cache, mask_B_T, next_pos_B, logits_B_V = prefix.prefill(model, [j.prompt_ids for j in jobs], device)
    else:
        cache, mask_B_T, next_pos_B, logits_B_V = _prefill(model, loaded.pad_id, jobs, device)
    max_top = max(j.params.top_logprobs for j in jobs)
    step = 0
    while True:
        logprobs_B_V = torch.log_softmax(logits_B_V, dim=-1)
        chosen = _choose(rows, logits_B_V)
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
        step += 1
        keep = [b for b, r in enumerate(rows) if not r.done]
        if not keep:
            return
        if len(keep) < len(rows):  # finished rows leave the batch: no wasted compute on them
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            rows = [rows[b] for b in keep]
            chosen = chosen[idx]
            mask_B_T = mask_B_T[idx]
            next_pos_B = next_pos_B[idx]
        mask_B_T = torch.cat([mask_B_T, mask_B_T.new_ones((len(rows), 1))], dim=1)
        out = model(
            input_ids=chosen.unsqueeze(1),
            attention_mask=mask_B_T,
            position_ids=next_pos_B.unsqueeze(1),
            cache=cache,
            use_cache=True,
        )
        logits_B_V = out.logits[:, -1, :].float()
        next_pos_B = next_pos_B + 1


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
