"""The signal store on SQLite and on a real PostgreSQL server: migration, batched writes,
durability on close, dead letters, acknowledged commits, export. Tests that take `backend` run
on both; the rest are about SQLite's own file (WAL, old schema versions, a locked file)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from distill_loop import (
    SCHEMA_VERSION,
    DistillConfig,
    Sample,
    SignalConfig,
    SignalStore,
    StoreClosed,
    export_jsonl,
    read_samples,
    signal_db,
    teacher_usage_since,
)
from distill_loop.buffer import build_run_data
from distill_loop.loop import DistillLoop
from distill_loop.sample import cap_texts
from models import BackendConfig, ChatMessage, Generation, TokenLogprob, TopLogprob, Usage


def sample(i: int, kind: str = "escalation", sampling_weight: float | None = None) -> Sample:
    draft = Generation("draft", "stop", Usage(5, 1), "student", (7,), (TokenLogprob("draft", -2.5, 7),), "v1")
    answer = Generation(
        "teacher answer",
        "stop",
        Usage(5, 2),
        "teacher",
        (),
        (TokenLogprob("teacher", -0.1, None, (TopLogprob("teacher", -0.1), TopLogprob("Teacher", -2.0))),),
        "t",
    )
    return Sample(
        id=f"r{i}",
        created_at=1000.0 + i,
        tenant="key-abc",
        kind=kind,  # type: ignore[arg-type]
        reason="low_confidence",
        messages=(ChatMessage("user", f"question {i}"),),
        student=draft,
        confidence=0.2,
        features={"mean_logprob": -2.5},
        teacher=answer,
        threshold=0.35,
        metadata={"queue": "billing"},
        sampling_weight=sampling_weight,
    )


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str | None:
    """None for SQLite; the URL of a fresh database on the session's PostgreSQL server."""
    if request.param == "sqlite":
        return None
    url: str = request.getfixturevalue("postgres_url")
    return url


def open_store(
    tmp_path: Path, events: list[tuple[str, int]] | None = None, url: str | None = None, **kw: object
) -> SignalStore:
    cfg = SignalConfig(path=tmp_path / "db" / "signal.db", url=url, **kw)  # type: ignore[arg-type]
    store = SignalStore(cfg, listener=(lambda e, n: events.append((e, n))) if events is not None else None)
    store.open()
    return store


@contextlib.contextmanager
def database_locked(store: SignalStore) -> Iterator[None]:
    """Another writer holds the database (SQLite: a write transaction; PostgreSQL: the table)."""
    if store.config.url is None:
        blocker = sqlite3.connect(store.config.path, timeout=30)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        return
    with psycopg.connect(store.config.url) as conn:
        conn.execute("LOCK TABLE signal IN EXCLUSIVE MODE")
        try:
            yield
        finally:
            conn.rollback()


def dead_letters(store: SignalStore) -> list[str]:
    query = "SELECT record_id FROM dead_letter ORDER BY seq"
    if store.config.url is None:
        return [r[0] for r in sqlite3.connect(store.config.path).execute(query)]
    with psycopg.connect(store.config.url) as conn:
        return [r[0] for r in conn.execute(query)]


def test_records_round_trip_with_all_fields(tmp_path: Path, backend: str | None) -> None:
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, backend)
    for i in range(3):
        assert store.submit(sample(i, sampling_weight=1.0))
    assert store.submit(sample(3, kind="audit", sampling_weight=20.0))
    store.close()
    got = list(read_samples(store.db))
    assert [s.id for s in got] == ["r0", "r1", "r2", "r3"]
    assert got[0] == sample(0, sampling_weight=1.0) and got[3] == sample(3, kind="audit", sampling_weight=20.0)
    assert sum(n for e, n in events if e == "written") == 4


def test_wal_mode_and_schema_version(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.close()
    conn = sqlite3.connect(store.config.path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    # Re-opening an up-to-date database migrates nothing and keeps the rows.
    open_store(tmp_path).close()


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "db" / "signal.db"
    path.parent.mkdir(parents=True)
    sqlite3.connect(path).execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    with pytest.raises(Exception, match="newer than this code"):
        open_store(tmp_path)


def test_close_flushes_every_queued_record(tmp_path: Path, backend: str | None) -> None:
    store = open_store(tmp_path, url=backend, batch_size=7)
    for i in range(500):
        store.submit(sample(i))
    store.close()  # graceful shutdown: nothing queued may be lost
    assert store.count() == 500
    with pytest.raises(StoreClosed):
        store.submit(sample(999))


def test_full_queue_drops_and_counts(tmp_path: Path) -> None:
    events: list[tuple[str, int]] = []
    store = SignalStore(SignalConfig(path=tmp_path / "s.db", queue_size=2), listener=lambda e, n: events.append((e, n)))
    # Not opened: nothing drains the queue, so the third record must be dropped, and counted.
    assert store.submit(sample(1)) and store.submit(sample(2))
    assert store.submit(sample(3)) is False
    assert ("dropped", 1) in events


def test_duplicate_goes_to_dead_letter_and_the_rest_commit(tmp_path: Path, backend: str | None) -> None:
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, backend)
    store.submit(sample(1))
    store.close()
    store = open_store(tmp_path, events, backend)
    for s in (sample(1), sample(2), sample(3)):  # r1 already exists: a constraint violation
        store.submit(s)
    store.close()
    assert store.count() == 3
    assert dead_letters(store) == ["r1"]
    assert ("failed", 1) in events


def test_unwritable_database_spills_at_shutdown_and_replays(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    # Waits out the writer thread's brief lock while it connects, then locks writers out.
    blocker = sqlite3.connect(store.config.path, timeout=30)
    blocker.execute("BEGIN EXCLUSIVE")
    store._retry_s = 0.01
    for i in range(5):
        store.submit(sample(i))
    time.sleep(0.3)
    store.close(timeout=60)
    blocker.execute("ROLLBACK")
    blocker.close()
    assert store.spill_path.exists()
    reopened = open_store(tmp_path)  # replays the spill file
    reopened.close()
    assert reopened.count() == 5
    assert not store.spill_path.exists()


def test_export_writes_chat_jsonl(tmp_path: Path, backend: str | None) -> None:
    store = open_store(tmp_path, url=backend)
    store.submit(sample(1))
    store.submit(sample(2, kind="audit"))
    store.close()
    out = tmp_path / "out.jsonl"
    assert export_jsonl(store.db, out) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["messages"] == [
        {"role": "user", "content": "question 1"},
        {"role": "assistant", "content": "teacher answer"},
    ]
    assert rows[0]["metadata"]["student_draft"] == "draft"
    assert rows[0]["metadata"]["queue"] == "billing"
    assert export_jsonl(store.db, out, kind="audit") == 1


def test_v1_database_migrates_and_keeps_its_rows(tmp_path: Path) -> None:
    from distill_loop.db import MIGRATIONS

    path = tmp_path / "db" / "signal.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(MIGRATIONS[0] + "; PRAGMA user_version=1;")
    from distill_loop.store import _row

    conn.execute("INSERT INTO signal VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", _row(sample(7))[:12])
    conn.commit()
    conn.close()
    store = open_store(tmp_path)
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    (got,) = list(read_samples(path))
    assert got == sample(7) and got.critique is None and got.sampling_weight is None


def test_v3_database_migrates_and_its_rows_read_back_with_an_unknown_sampling_weight(tmp_path: Path) -> None:
    from distill_loop.db import MIGRATIONS
    from distill_loop.store import _row

    path = tmp_path / "db" / "signal.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(";\n".join(MIGRATIONS[:3]) + ";\nPRAGMA user_version=3;")
    old = sample(7, kind="audit", sampling_weight=20.0)
    conn.execute(f"INSERT INTO signal VALUES ({', '.join('?' * 14)})", _row(old)[:14])  # no weight column yet
    conn.commit()
    conn.close()
    store = open_store(tmp_path)
    store.submit(sample(8, kind="audit", sampling_weight=5.0))
    store.close()
    assert sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    got = {s.id: s for s in read_samples(path)}
    # The fraction the old audit was drawn with was never stored: unknown, not guessed.
    assert got["r7"] == dataclasses.replace(old, sampling_weight=None)
    assert got["r8"].sampling_weight == 5.0


def test_spill_lines_from_before_the_weight_column_still_replay(tmp_path: Path) -> None:
    from distill_loop.store import _row

    spill = tmp_path / "db" / "signal.spill.jsonl"
    spill.parent.mkdir()
    spill.write_text(json.dumps(list(_row(sample(1)))[:14]) + "\n")  # a v3 gateway's spill
    open_store(tmp_path).close()
    (got,) = list(read_samples(tmp_path / "db" / "signal.db"))
    assert got == sample(1) and got.sampling_weight is None


def test_v4_database_migrates_keeps_its_rows_and_then_takes_labels(tmp_path: Path) -> None:
    """v5 rebuilds the table (SQLite cannot alter a CHECK): rows, columns, index all survive."""
    from distill_loop.db import MIGRATIONS
    from distill_loop.store import _row

    path = tmp_path / "db" / "signal.db"
    path.parent.mkdir()
    conn = sqlite3.connect(path)
    conn.executescript(";\n".join(MIGRATIONS[:4]) + ";\nPRAGMA user_version=4;")
    old = [sample(1, sampling_weight=1.0), sample(2, kind="audit", sampling_weight=20.0)]
    v4_row = f"INSERT INTO signal VALUES ({', '.join('?' * 15)})"  # v4's 15 columns
    conn.executemany(v4_row, [_row(s)[:15] for s in old])
    with pytest.raises(sqlite3.IntegrityError):  # what v5 is for
        conn.execute(v4_row, _row(sample(3, kind="label"))[:15])
    conn.commit()
    conn.close()
    store = open_store(tmp_path)
    label = dataclasses.replace(sample(3, kind="label", sampling_weight=1.0), reason="margin")
    assert store.submit(label)
    store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='signal'")}
    assert indexes == {"sqlite_autoindex_signal_1", "signal_created_at"}
    with pytest.raises(sqlite3.IntegrityError):
        conn.execute(f"INSERT INTO signal VALUES ({', '.join('?' * 17)})", _row(sample(4, kind="other")))
    assert list(read_samples(path)) == [*old, label]
    assert [s.id for s in read_samples(path, kind="label")] == ["r3"]


def test_a_v6_database_migrates_and_then_takes_cache_hits(tmp_path: Path, backend: str | None) -> None:
    """v7 lets a record be an escalation answered from the teacher cache; v6 rows survive, on
    SQLite (the table rebuilt again) and PostgreSQL (the CHECK replaced)."""
    from distill_loop.db import MIGRATIONS, PG_SCHEMA
    from distill_loop.store import _row

    old = [sample(1, sampling_weight=1.0), sample(2, kind="label", sampling_weight=1.0)]
    if backend is None:
        path = tmp_path / "db" / "signal.db"
        path.parent.mkdir()
        conn = sqlite3.connect(path)
        conn.executescript(";\n".join(MIGRATIONS[:6]) + ";\nPRAGMA user_version=6;")
        conn.executemany(f"INSERT INTO signal VALUES ({', '.join('?' * 17)})", [_row(s) for s in old])
        conn.commit()
        conn.close()
    else:
        with psycopg.connect(backend, autocommit=True) as pg:
            pg.execute(PG_SCHEMA)
            pg.execute("CREATE TABLE tiergate_schema (version INTEGER NOT NULL)")
            pg.execute("INSERT INTO tiergate_schema VALUES (6)")
            for row in map(_row, old):
                pg.execute(f"INSERT INTO signal VALUES ({', '.join(['%s'] * 17)})", row)
            with pytest.raises(psycopg.errors.CheckViolation):  # what v7 is for
                pg.execute(f"INSERT INTO signal VALUES ({', '.join(['%s'] * 17)})", _row(sample(9, kind="cache_hit")))
    store = open_store(tmp_path, url=backend)
    hit = dataclasses.replace(sample(3, kind="cache_hit", sampling_weight=1.0), reason="low_confidence")
    assert store.submit(hit)
    store.close()
    assert list(read_samples(store.db)) == [*old, hit]
    assert [s.id for s in read_samples(store.db, kind="cache_hit")] == ["r3"]
    # A cache hit's answer was paid for once, by the record it was first asked for.
    assert teacher_usage_since(store.db, 0.0) == {"key-abc": (10, 4)}


def test_a_label_record_round_trips(tmp_path: Path, backend: str | None) -> None:
    store = open_store(tmp_path, url=backend)
    label = dataclasses.replace(sample(5, kind="label", sampling_weight=1.0), id="r5-label", reason="uncovered")
    assert store.submit(label)
    store.close()
    assert list(read_samples(store.db)) == [label]


def test_an_oversized_record_is_cut_flagged_counted_and_kept_out_of_training(
    tmp_path: Path, backend: str | None
) -> None:
    """A fault probe stored five 3.9 MB escalated prompts whole (31 MB of database)."""
    huge = "é" + "lost parcel " * 330_000  # about 3.9 MB, with a two-byte character first
    big = dataclasses.replace(
        sample(1), messages=(ChatMessage("system", "Be brief."), ChatMessage("user", huge)), client_request_id="c-1"
    )
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, backend, max_record_bytes=64 * 1024)
    assert store.submit(big) and store.submit(sample(2))
    store.close()
    got = {s.id: s for s in read_samples(store.db)}
    cut, whole = got["r1"], got["r2"]
    texts = [m.content for m in cut.messages] + [cut.teacher.text, cut.student.text if cut.student else ""]
    assert sum(len(t.encode()) for t in texts) <= 64 * 1024
    assert cut.truncated_from == sum(len(t.encode()) for t in ("Be brief.", huge, "teacher answer", "draft"))
    # The short texts stay whole; the long one keeps its start and says it was cut.
    assert cut.messages[0].content == "Be brief." and cut.teacher.text == "teacher answer"
    assert cut.messages[1].content.startswith("élost parcel") and cut.messages[1].content.endswith("[truncated]")
    assert cut.client_request_id == "c-1" and whole.truncated_from is None and whole.client_request_id is None
    assert ("truncated", 1) in events and sum(n for e, n in events if e == "written") == 2
    if backend is None:
        assert store.config.path.stat().st_size < 1024 * 1024
    # Its prompt is not what the teacher answered: training never sees it.
    data = build_run_data(store.db, DistillConfig(holdout_fraction=0.01), since=0.0, until=time.time() + 1)
    prompts = [m.content for e in data.train if e.kind != "anchor" for m in e.messages]
    assert prompts and not any("lost parcel" in p for p in prompts)


@pytest.mark.parametrize("limit", [1024, 1500, 4096])
def test_cap_texts_fits_every_limit_on_a_character_boundary(limit: int) -> None:
    s = dataclasses.replace(sample(1), messages=(ChatMessage("user", "ü" * 5000), ChatMessage("user", "x" * 9000)))
    cut = cap_texts(s, limit)
    texts = [m.content for m in cut.messages] + [cut.teacher.text, cut.student.text if cut.student else ""]
    assert sum(len(t.encode()) for t in texts) <= limit
    assert all("\ufffd" not in t for t in texts)
    assert cap_texts(sample(1), limit) == sample(1)  # small records are untouched


def test_an_acknowledged_record_resolves_only_once_committed_and_waiters_share_commits(
    tmp_path: Path, backend: str | None
) -> None:
    """`submit_acked` is what an escalated response waits on: it must not resolve before the
    commit, and the records queued meanwhile share the next one (group commit)."""
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, backend, linger_s=1.0)
    with database_locked(store):
        futures = [store.submit_acked(sample(i)) for i in range(40)]
        time.sleep(0.3)
        assert not any(f.done() for f in futures)  # nothing is acknowledged before it is on disk
    assert all(f.result(timeout=10) for f in futures)
    assert store.count() == 40  # readable from another connection
    written = [n for e, n in events if e == "written"]
    assert sum(written) == 40 and len(written) <= 2  # the 40 waiters shared one or two commits
    # An acknowledged batch does not linger: with linger_s 1, a lone record resolves at once.
    t0 = time.monotonic()
    assert store.submit_acked(sample(99)).result(timeout=10)
    assert time.monotonic() - t0 < 0.9
    store.close()


def test_awaited_records_resolve_on_their_loop_one_wakeup_a_commit_and_a_cancelled_wait_is_harmless(
    tmp_path: Path, backend: str | None
) -> None:
    """`submit_awaited` (the gateway's): the futures belong to the caller's event loop, none
    resolves before the commit, a commit's futures are all resolved by one callback on the
    loop, and a future cancelled by its waiter (an ack timeout) leaves its record to be written."""
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, backend)

    async def scenario() -> tuple[list[bool], bool, int]:
        loop = asyncio.get_running_loop()
        wakeups = 0
        call_soon_threadsafe = loop.call_soon_threadsafe

        def counted(*args: object, **kwargs: object) -> asyncio.Handle:
            nonlocal wakeups
            wakeups += 1
            return call_soon_threadsafe(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
        with database_locked(store):
            futures = [store.submit_awaited(sample(i)) for i in range(20)]
            given_up = store.submit_awaited(sample(20))
            await asyncio.sleep(0.3)
            assert not any(f.done() for f in futures)  # nothing is acknowledged before it is on disk
            given_up.cancel()
        results = await asyncio.gather(*futures)
        return results, given_up.cancelled(), wakeups

    results, cancelled, wakeups = asyncio.run(scenario())
    assert all(results) and cancelled
    assert store.flush(10)
    assert store.count() == 21  # the cancelled wait's record is written all the same
    commits = [n for e, n in events if e == "written"]
    assert sum(commits) == 21 and wakeups == len(commits) <= 2  # one wake-up a commit, not a record
    store.close()


def test_acknowledged_records_on_their_way_share_a_commit_and_a_lone_one_never_waits(
    tmp_path: Path, backend: str | None
) -> None:
    """`expect_from`: while more acknowledged records are on their way, the writer holds an
    acknowledged batch open (up to `ack_linger_s`) so that they share its fsync; with none
    coming it commits at once, and a record that never comes costs at most `ack_linger_s`."""
    events: list[tuple[str, int]] = []
    coming = [0]
    store = open_store(tmp_path, events, backend, ack_linger_s=0.08)
    store.expect_from(lambda: coming[0])
    written = lambda: [n for e, n in events if e == "written"]  # noqa: E731

    # None coming: a lone record is committed at once, not after the linger.
    t0 = time.monotonic()
    assert store.submit_acked(sample(1)).result(timeout=10)
    assert time.monotonic() - t0 < 0.06
    assert written() == [1]

    # Two more on their way: the first waits for them, and all three share one commit.
    coming[0] = 2
    first = store.submit_acked(sample(2))
    time.sleep(0.02)
    assert not first.done()
    coming[0] = 1
    second = store.submit_acked(sample(3))
    time.sleep(0.02)
    coming[0] = 0
    third = store.submit_acked(sample(4))
    assert all(f.result(timeout=10) for f in (first, second, third))
    assert written() == [1, 3]

    # One announced that never comes (a client that left): the wait ends at ack_linger_s.
    coming[0] = 1
    t0 = time.monotonic()
    assert store.submit_acked(sample(5)).result(timeout=10)
    waited = time.monotonic() - t0
    assert 0.07 <= waited < 1.0
    assert written() == [1, 3, 1]
    store.close()


def test_an_acknowledged_record_on_a_full_queue_resolves_false_at_once(tmp_path: Path, backend: str | None) -> None:
    store = open_store(tmp_path, url=backend, queue_size=1)
    with database_locked(store):
        first = store.submit_acked(sample(1))  # taken by the writer, which now waits on the lock
        time.sleep(0.2)
        store.submit_acked(sample(2))  # fills the queue
        dropped = store.submit_acked(sample(3))
        assert dropped.done() and dropped.result() is False
    assert first.result(timeout=10)
    store.close()


def test_token_logprobs_are_stored_as_arrays_and_rows_with_the_older_objects_still_read(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    assert store.submit(sample(1))
    store.close()
    conn = sqlite3.connect(store.config.path)
    (teacher,) = conn.execute("SELECT teacher FROM signal").fetchone()
    assert json.loads(teacher)["logprobs"] == [
        ["teacher", -0.1, None, [["teacher", -0.1, None], ["Teacher", -2.0, None]]]
    ]
    # Rows written before the array form kept a dict a token: they read back the same.
    older = {"token": "teacher", "logprob": -0.1, "id": None, "top": [["teacher", -0.1, None], ["Teacher", -2.0, None]]}
    conn.execute("UPDATE signal SET teacher = json_set(teacher, '$.logprobs', json(?))", (json.dumps([older]),))
    conn.commit()
    conn.close()
    (got,) = list(read_samples(store.config.path))
    assert got == sample(1)


def test_a_trainer_started_before_any_store_finds_nothing_pending(tmp_path: Path, backend: str | None) -> None:
    """A trainer may start before the gateways: until a store has made the database there is
    nothing to read, rather than a failed run at every tick."""
    db = signal_db(SignalConfig(path=tmp_path / "db" / "signal.db", url=backend))
    loop = DistillLoop(DistillConfig(registry_dir=tmp_path / "registry"), db, BackendConfig(kind="local", model="x"))
    assert not db.exists()
    assert (loop.pending(), loop.due(), loop.check_rollback(), loop.check_quality()) == (0, False, None, None)
    store = open_store(tmp_path, url=backend)
    store.submit(sample(1))
    store.close()
    assert db.exists() and loop.pending() == 1


def test_postgres_stores_opened_together_migrate_once(tmp_path: Path, postgres_url: str) -> None:
    """Replicas start at the same time: the advisory lock lets one create the schema."""
    stores = [SignalStore(SignalConfig(path=tmp_path / f"s{i}.db", url=postgres_url)) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda s: s.open(), stores))
    for i, store in enumerate(stores):
        assert store.submit(sample(i))
    for store in stores:
        store.close()
    assert stores[0].count() == 4
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT version FROM tiergate_schema").fetchall() == [(SCHEMA_VERSION,)]


def test_postgres_writer_rides_out_dropped_connections_and_spills_when_the_server_stays_away(
    tmp_path: Path, postgres_url: str
) -> None:
    """Connections cut under it (a failover, a restart): records wait and are written once the
    server answers. A server still away at shutdown: the spill file, replayed at the next open."""
    events: list[tuple[str, int]] = []
    store = open_store(tmp_path, events, postgres_url)
    store._retry_s = 0.01
    dbname = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.rsplit("/", 1)[0] + "/postgres"

    def cut(allow: bool) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f"ALTER DATABASE {dbname} ALLOW_CONNECTIONS {str(allow).lower()}")  # type: ignore[arg-type]
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (dbname,))

    assert store.submit(sample(0)) and store.flush()
    cut(allow=False)
    acked = [store.submit_acked(sample(i)) for i in range(1, 6)]
    time.sleep(0.5)
    assert not any(f.done() for f in acked)  # not acknowledged while the database is away
    cut(allow=True)
    assert all(f.result(timeout=20) for f in acked)
    cut(allow=False)
    for i in range(6, 9):
        store.submit(sample(i))
    time.sleep(0.3)
    store.close(timeout=60)
    assert store.spill_path.exists()
    cut(allow=True)
    reopened = open_store(tmp_path, url=postgres_url)  # replays the spill file
    reopened.close()
    assert sorted(s.id for s in read_samples(reopened.db)) == sorted(f"r{i}" for i in range(9))
    assert not store.spill_path.exists()
