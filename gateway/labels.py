"""Active teacher labels: within a budget, ask the teacher about served prompts where routing mattered.

The service offers each confident, un-audited tiered answer and notes every prompt a record is
written for. Once a second a background task clusters those prompts (leader clustering on
content words, pure Python) and spends a token bucket filled at `label_budget_per_hour`: each
token buys one label, for a prompt cluster no record covers yet first, otherwise for the answer
whose confidence sat closest above its threshold (margin sampling). Until the loop's gate has
`min_heldout` held-out prompts on record (`HeldoutNeed`: prompts the loop's hash split keeps
out of training), candidates from that split go first, since a run with fewer is skipped:
the stream benchmark's first gated run waited until about request 300 of 480 for them. The
labeler never calls a backend nor writes a record: the service's `label` does both, on the
path its audits take. It counts only the records written while it runs, not those already
in the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Literal

from distill_loop import is_heldout, prompt_key
from gateway.service import ChatCall, Route
from models import ChatMessage, Generation

log = logging.getLogger(__name__)

LabelReason = Literal["margin", "uncovered"]
# The service's `label`: starts one background teacher call and record; returns at once.
Label = Callable[[ChatCall, Route, Generation, LabelReason], None]

_WORD = re.compile(r"[^\W_]+")
# Enough of a prompt to say what it is about; more would only slow clustering.
_MAX_CHARS = 1000
_MAX_WORDS = 24
# Prompts clustered between yields to the event loop (up to ~100 µs each with 4096 clusters).
_CHUNK = 32
# fmt: off
_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "can", "could", "did", "do", "does", "for", "from",
    "had", "has", "have", "how", "i", "if", "in", "is", "it", "its", "me", "my", "of", "on", "or", "our",
    "please", "so", "than", "that", "the", "their", "them", "then", "there", "these", "they", "this", "to",
    "us", "was", "we", "were", "what", "when", "where", "which", "who", "why", "will", "with", "would", "you",
    "your",
))
# fmt: on
# Stands in for the words of a prompt that has none, so such prompts share one cluster.
_NO_WORDS = frozenset({""})


def content_words(messages: Sequence[ChatMessage]) -> frozenset[str]:
    """Lowercased word tokens of the user turns, less stopwords: what a prompt cluster is made
    of. The first `_MAX_WORDS` distinct ones, so a long prompt costs no more than a short one."""
    text = " ".join(m.content for m in messages if m.role == "user")[:_MAX_CHARS].lower()
    words = dict.fromkeys(w for w in _WORD.findall(text) if w not in _STOPWORDS)
    return frozenset(islice(words, _MAX_WORDS)) or _NO_WORDS


class PromptClusters:
    """Leader clustering: a prompt joins the most similar leader when their content-word sets
    have Jaccard similarity >= `join`, else leads a new cluster. At most `max_leaders` are kept,
    the least recently joined dropped first.

    An inverted index finds the leaders a prompt shares words with. For each word only the
    `scan` most recently joined leaders holding it are counted, so a word common to many
    clusters costs no more than a rare one; a cluster that shares only such words with a prompt
    and has not been joined for a while may be missed, and the prompt then leads a new one.
    """

    def __init__(self, max_leaders: int = 4096, join: float = 0.5, scan: int = 32) -> None:
        self.max_leaders = max_leaders
        self.join = join
        self.scan = scan
        self._leaders: OrderedDict[int, frozenset[str]] = OrderedDict()
        # word -> the leaders holding it, least recently joined first (a dict keeps order).
        self._index: dict[str, dict[int, None]] = {}
        self._covered: set[int] = set()
        self._next = 0

    def __len__(self) -> int:
        return len(self._leaders)

    def __contains__(self, cluster: int) -> bool:
        return cluster in self._leaders

    def assign(self, words: frozenset[str]) -> int:
        index, scan = self._index, self.scan
        shared = Counter(chain.from_iterable(islice(reversed(index[w]), scan) for w in words if w in index))
        # Jaccard >= join needs at least join * len(words) shared words: most shared first, stop below.
        least = self.join * len(words)
        best, best_sim = -1, self.join
        for leader, n in shared.most_common():
            if n < least:
                break
            sim = n / (len(words) + len(self._leaders[leader]) - n)
            if sim > best_sim or (sim == best_sim and (best < 0 or leader < best)):
                best, best_sim = leader, sim
        if best >= 0:
            self._leaders.move_to_end(best)
            for word in self._leaders[best]:
                holders = self._index[word]
                del holders[best]
                holders[best] = None
            return best
        cluster, self._next = self._next, self._next + 1
        self._leaders[cluster] = words
        for word in words:
            self._index.setdefault(word, {})[cluster] = None
        if len(self._leaders) > self.max_leaders:
            self._drop(next(iter(self._leaders)))
        return cluster

    def cover(self, cluster: int) -> None:
        if cluster in self._leaders:
            self._covered.add(cluster)

    def covered(self, cluster: int) -> bool:
        return cluster in self._covered

    def _drop(self, cluster: int) -> None:
        for word in self._leaders.pop(cluster):
            holders = self._index[word]
            del holders[cluster]
            if not holders:
                del self._index[word]
        self._covered.discard(cluster)


class HeldoutNeed:
    """The loop's held-out split (`distill.holdout_fraction`, by prompt hash, as
    `distill_loop.buffer` splits) and how many of its prompts the gate needs on record."""

    def __init__(self, fraction: float, needed: int) -> None:
        self.fraction = fraction
        self.needed = needed
        self._seen: set[str] = set()

    def heldout(self, messages: Sequence[ChatMessage]) -> bool:
        return is_heldout(messages, self.fraction)

    def recorded(self, messages: Sequence[ChatMessage]) -> None:
        if len(self._seen) < self.needed and self.heldout(messages):
            self._seen.add(prompt_key(messages))

    @property
    def short(self) -> bool:
        return len(self._seen) < self.needed


@dataclass(frozen=True, slots=True)
class Candidate:
    call: ChatCall
    route: Route
    draft: Generation
    margin: float  # confidence - threshold, >= 0 for a confident answer
    heldout: bool = False  # in the loop's held-out split (checked only while the gate is short)

    def rank(self, short: bool, covered: bool = False) -> tuple[bool, bool, float]:
        """Lower first: while the gate is short, held-out prompts; then uncovered clusters; then
        the smallest margin. Within one cluster coverage is the same for all, so it is left out."""
        return (short and not self.heldout, covered, self.margin)


@dataclass(frozen=True, slots=True)
class Pick:
    candidate: Candidate
    reason: LabelReason


class ActiveLabeler:
    """See the module docstring. `offer` and `covered` are called on the event loop, per request;
    `ingest` and `select` run once a tick, on the event loop too (so no locks).

    `clock` is in the units of `ChatCall.started` (time.perf_counter) and only injectable for tests.
    """

    def __init__(
        self,
        budget_per_hour: float,
        *,
        clock: Callable[[], float] = time.perf_counter,
        ttl_s: float = 300.0,
        offers: int = 128,
        inbox: int = 512,
        max_clusters: int = 4096,
        join: float = 0.5,
        tick_s: float = 1.0,
        need: HeldoutNeed | None = None,
    ) -> None:
        if budget_per_hour <= 0:
            raise ValueError("an active labeler needs a positive budget; with 0, build none")
        self.budget_per_hour = budget_per_hour
        self.rate_per_s = budget_per_hour / 3600
        self.capacity = max(1.0, budget_per_hour / 60)  # one minute's worth
        self.ttl_s = ttl_s
        self.tick_s = tick_s
        self._clock = clock
        self._tokens = 1.0
        self._refilled = clock()
        # Both inboxes drop their oldest entries under load: a label is a sample, not a duty.
        # Offers are clustered once a tick, up to `offers` of them (the latest): clustering
        # each confident answer at 2,000 req/s cost ~4% of the gateway's CPU, to spend a
        # budget of a few labels an hour. Records' prompts mark clusters covered: `inbox` a tick.
        self._offers: deque[tuple[ChatCall, Route, Generation]] = deque(maxlen=offers)
        self._covered: deque[tuple[ChatMessage, ...]] = deque(maxlen=inbox)
        self._clusters = PromptClusters(max_clusters, join)
        self._pool: dict[int, Candidate] = {}  # the best candidate per prompt cluster
        self.need = need
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # -- the hot path: O(1), no tokenizing ---------------------------------------------------
    def offer(self, call: ChatCall, route: Route, draft: Generation) -> None:
        """A confident tiered answer that was not drawn for audit."""
        self._offers.append((call, route, draft))

    def covered(self, messages: tuple[ChatMessage, ...]) -> None:
        """A record (escalation, audit or label) is being written for this prompt."""
        self._covered.append(messages)

    # -- once a tick ---------------------------------------------------------------------------
    def ingest(self, limit: int | None = None) -> int:
        """Cluster up to `limit` prompts from the inboxes (all there now if None), records'
        prompts first; keep each cluster's closest call. Returns how many were taken."""
        now = self._clock()
        clusters, taken = self._clusters, 0
        limit = len(self._covered) + len(self._offers) if limit is None else limit
        need = self.need
        while self._covered and taken < limit:
            messages = self._covered.popleft()
            clusters.cover(clusters.assign(content_words(messages)))
            if need is not None:
                need.recorded(messages)
            taken += 1
        short = need is not None and need.short
        while self._offers and taken < limit:
            call, route, draft = self._offers.popleft()
            taken += 1
            if route.decision is None or now - call.started > self.ttl_s:
                continue
            margin = route.decision.confidence - route.decision.threshold
            heldout = short and need is not None and need.heldout(call.messages)
            new = Candidate(call, route, draft, margin, heldout)
            cluster = clusters.assign(content_words(call.messages))
            held = self._pool.get(cluster)
            if held is None or new.rank(short) <= held.rank(short) or now - held.call.started > self.ttl_s:
                self._pool[cluster] = new
        return taken

    def select(self) -> list[Pick]:
        """Refill the bucket; spend each whole token on one candidate: while the gate is short
        of held-out prompts, those first; then uncovered clusters, then the smallest margin.
        Drops expired candidates and forgotten clusters."""
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._refilled) * self.rate_per_s)
        self._refilled = now
        clusters = self._clusters
        self._pool = {
            cluster: c
            for cluster, c in self._pool.items()
            if cluster in clusters and now - c.call.started <= self.ttl_s
        }
        picks: list[Pick] = []
        if self._tokens < 1 or not self._pool:
            return picks
        # Clusters are distinct, so covering one pick's cluster leaves the others' order as is.
        short = self.need is not None and self.need.short
        ranked = sorted(self._pool, key=lambda k: self._pool[k].rank(short, clusters.covered(k)))
        for cluster in ranked[: int(self._tokens)]:
            reason: LabelReason = "margin" if clusters.covered(cluster) else "uncovered"
            picks.append(Pick(self._pool.pop(cluster), reason))
            clusters.cover(cluster)  # now, not when the record lands: one label per uncovered cluster
            self._tokens -= 1
        return picks

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, label: Label) -> None:
        """Tick in the background, handing each pick to `label` (the service's)."""
        self._task = asyncio.create_task(self._run(label), name="active-labels")

    async def stop(self) -> None:
        """Stop ticking. Labels already handed over are the service's to drain."""
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self, label: Label) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.tick_s)
            if self._stop.is_set():
                return
            try:
                # What arrived by now, in chunks, yielding in between: a busy second's prompts
                # never hold the event loop for long. Later arrivals wait for the next tick.
                todo = len(self._covered) + len(self._offers)
                while todo > 0 and (taken := self.ingest(min(todo, _CHUNK))):
                    todo -= taken
                    await asyncio.sleep(0)
                for pick in self.select():
                    c = pick.candidate
                    label(c.call, c.route, c.draft, pick.reason)
            except Exception:  # noqa: BLE001 - a bug in one tick must not end labelling or serving
                log.exception("active labels: tick failed")
