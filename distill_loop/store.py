"""Durable store for distillation signal: one writer thread, batched commits, versioned schema.

The database is a SQLite file in WAL mode with synchronous=FULL (the default) or PostgreSQL
(`signal.url`), both behind `db.py`. `submit()` never blocks the event loop: it puts the record
on a bounded queue (full queue → the record is dropped and counted). The writer thread commits batches.
`submit_acked()` does the same and returns a future that resolves once the record is committed
(`submit_awaited()`: an event loop's future, a commit's all resolved in one callback): the
gateway sends an escalated response only then (`signal.durability: acknowledged`). A batch
holding such a record does not wait out `linger_s`: it takes what is queued and commits, and
whatever arrives during that fsync is the next group (group commit). Told how many
acknowledged records are on their way (`expect_from`: the gateway passes its teacher calls in
flight that a client waits on), the writer holds such a batch open while more are coming, up to `ack_linger_s`:
PostgreSQL's commit_delay with commit_siblings, made exact. A lone request never waits, and
under load several escalations share each fsync instead of two or three.
If the database fails (disk full, locked), batches are kept and retried with back-off; a row
the database rejects on its own (a constraint) goes to the dead-letter table. `close()`
drains the queue, and whatever still cannot be written is spilled to a JSONL file that the
next `open()` replays, so a graceful shutdown loses nothing. With `signal.redact` (the
default) the writer thread replaces personal identifiers (`redact.py`) before a record
reaches the database, the dead-letter table or the spill file; the event loop never pays for
it. Training reads happen elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from distill_loop.config import SignalConfig
from distill_loop.db import DBWriter, Row, SignalDB, signal_db
from distill_loop.errors import RecordRejected, SignalDBError, StoreClosed
from distill_loop.redact import Redactor
from distill_loop.sample import (
    Sample,
    cap_texts,
    generation_from_json,
    generation_to_json,
    logprobs_from_json,
    logprobs_to_json,
    messages_from_json,
    messages_to_json,
    to_chat_jsonl,
    to_json,
)

log = logging.getLogger(__name__)

# (event, count): written | failed | dropped | dead_letter | truncated | redacted
Listener = Callable[[str, int], None]
# What an acknowledged record's commit resolves: a thread's future (`submit_acked`) or an
# event loop's (`submit_awaited`).
Ack = Future[bool] | asyncio.Future[bool]


def _json(value: Any) -> str:
    """Compact JSON text (`to_json`: non-finite floats as null, read back as -inf)."""
    return to_json(value).decode()


def _row(s: Sample) -> Row:
    return (
        s.id,
        s.created_at,
        s.tenant,
        s.kind,
        s.reason,
        messages_to_json(s.messages),
        _json(generation_to_json(s.student)) if s.student else None,
        s.confidence,
        _json(dict(s.features)),
        _json(generation_to_json(s.teacher)),
        s.threshold,
        _json(dict(s.metadata)),
        s.critique,
        _json(logprobs_to_json(s.draft_scores)) if s.draft_scores else None,
        s.sampling_weight,
        s.client_request_id,
        s.truncated_from,
    )


def _sample(r: Row) -> Sample:
    return Sample(
        id=r[0],
        created_at=r[1],
        tenant=r[2],
        kind=r[3],
        reason=r[4],
        messages=messages_from_json(r[5]),
        student=generation_from_json(json.loads(r[6])) if r[6] else None,
        confidence=r[7],
        features=json.loads(r[8]),
        teacher=generation_from_json(json.loads(r[9])),
        threshold=r[10],
        metadata=json.loads(r[11]),
        critique=r[12] if len(r) > 12 else None,
        draft_scores=logprobs_from_json(json.loads(r[13])) if len(r) > 13 and r[13] else (),
        sampling_weight=r[14] if len(r) > 14 else None,  # spill lines written before v4 are shorter
        client_request_id=r[15] if len(r) > 15 else None,
        truncated_from=r[16] if len(r) > 16 else None,
    )


class SignalStore:
    """See the module docstring. Thread-safe `submit`; one writer thread owns the connection."""

    def __init__(self, config: SignalConfig, listener: Listener | None = None) -> None:
        self.config = config
        self._listener = listener or (lambda _e, _n: None)
        # A record and, for an acknowledged one, the future its commit resolves; None stops the writer.
        self._queue: queue.Queue[tuple[Sample, Ack | None] | None] = queue.Queue(maxsize=config.queue_size)
        self._thread: threading.Thread | None = None
        self._closing = threading.Event()
        self._closed = False
        self._retry_s = 0.05
        # The database failed after close(): later batches go straight to the spill file, not
        # each through another busy_timeout (10 s) wait that could outlast the close timeout.
        self._failed_closing = False
        self.db = signal_db(config)
        self.spill_path = config.spill_path or config.path.with_suffix(".spill.jsonl")
        self._redactor = Redactor() if config.redact else None
        self._coming: Callable[[], int] = lambda: 0

    def expect_from(self, coming: Callable[[], int]) -> None:
        """`coming()`: how many acknowledged records are on their way now (read on the writer
        thread, so it must be a cheap read of a counter, never a lock the event loop holds)."""
        self._coming = coming

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> None:
        self.db.migrate()
        self._thread = threading.Thread(target=self._writer, name="tiergate-signal-writer", daemon=True)
        self._thread.start()
        self._replay_spill()

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop. Records that still fail are spilled to JSONL."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def flush(self, timeout: float = 30.0) -> bool:
        """Block until every record submitted so far is committed (or failed); False on timeout."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    # -- writing -----------------------------------------------------------------------------
    def submit(self, sample: Sample) -> bool:
        """Queue a record for writing, its texts cut to `max_record_bytes` (counted as
        `truncated`). Returns False (and counts a drop) if the queue is full."""
        return self._enqueue(sample, None)

    def submit_acked(self, sample: Sample) -> Future[bool]:
        """Queue a record as `submit` does; the future resolves True once it is committed (or,
        at shutdown with the database failing, spilled and synced to disk), and False at once
        if the queue was full and it was dropped."""
        done: Future[bool] = Future()
        if not self._enqueue(sample, done):
            done.set_result(False)
        return done

    def submit_awaited(self, sample: Sample) -> asyncio.Future[bool]:
        """`submit_acked` for a caller on an event loop (the gateway): the future is the loop's
        own, and the writer resolves all of a commit's futures in one callback, so a group
        commit wakes the loop once, not once a record. Cancelling it (a wait that timed out)
        is harmless: the record stays queued and is written."""
        done = asyncio.get_running_loop().create_future()
        if not self._enqueue(sample, done):
            done.set_result(False)
        return done

    def _enqueue(self, sample: Sample, done: Ack | None) -> bool:
        if self._closed:
            raise StoreClosed("signal store is closed")
        # Cut here (cheap), so the writer never redacts megabytes; never through an identifier.
        safe_cut = self._redactor.safe_cut if self._redactor is not None else None
        capped = cap_texts(sample, self.config.max_record_bytes, safe_cut)
        if capped is not sample:
            self._listener("truncated", 1)
            log.warning(
                "signal record %s cut from %d to %d bytes of text",
                sample.id, capped.truncated_from, self.config.max_record_bytes,
            )  # fmt: skip
            sample = capped
        try:
            self._queue.put_nowait((sample, done))
        except queue.Full:
            self._listener("dropped", 1)
            log.error("signal queue full (%d); dropped record %s", self.config.queue_size, sample.id)
            return False
        return True

    def _writer(self) -> None:
        conn = self.db.writer()
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                taken = 1
                batch: list[tuple[Sample, Ack | None]] = []
                if first is None:
                    stop = True
                else:
                    batch.append(first)
                # A client waits on an acknowledged record: take what is queued, and wait for
                # more only while more are on their way (`expect_from`), up to `ack_linger_s`.
                acked = first is not None and first[1] is not None
                linger_until = time.monotonic() + (self.config.ack_linger_s if acked else self.config.linger_s)
                while len(batch) < self.config.batch_size and not stop:
                    try:
                        wait = linger_until - time.monotonic()
                        if acked and self._coming() <= 0:
                            wait = 0.0
                        nxt = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
                    except queue.Empty:
                        break
                    taken += 1
                    if nxt is None:
                        stop = True
                        break
                    batch.append(nxt)
                    if not acked and nxt[1] is not None:  # from here, a client waits
                        acked = True
                        linger_until = min(linger_until, time.monotonic() + self.config.ack_linger_s)
                if batch:
                    self._write_and_ack(conn, batch)
                for _ in range(taken):
                    self._queue.task_done()
            # Anything submitted between close() and the sentinel is still written.
            rest: list[tuple[Sample, Ack | None]] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    rest.append(item)
                self._queue.task_done()
            if rest:
                self._write_and_ack(conn, rest)
        finally:
            conn.close()

    def _write_and_ack(self, conn: DBWriter, batch: list[tuple[Sample, Ack | None]]) -> None:
        """Write a batch, then resolve its acknowledged records' futures: once `_write` returns,
        each record is committed, quarantined in the dead-letter table, or spilled and synced.
        Records are redacted first; one the redactor fails on is dropped, never stored raw."""
        if self._redactor is not None:
            batch = self._redact(batch, self._redactor)
        stored = self._write(conn, [s for s, _ in batch]) if batch else True
        _settle([(done, stored) for _, done in batch if done is not None])

    def _redact(self, batch: list[tuple[Sample, Ack | None]], redactor: Redactor) -> list[tuple[Sample, Ack | None]]:
        out: list[tuple[Sample, Ack | None]] = []
        redacted = 0
        for sample, done in batch:
            try:
                clean, found = redactor.sample(sample)
            except Exception as exc:  # noqa: BLE001 - any failure: the raw record must not be stored
                self._listener("failed", 1)
                log.error("signal record %s dropped: redaction failed (%s)", sample.id, type(exc).__name__)
                if done is not None:
                    _settle([(done, False)])
                continue
            redacted += found > 0
            out.append((clean, done))
        if redacted:
            self._listener("redacted", redacted)
        return out

    def _write(self, conn: DBWriter, batch: list[Sample]) -> bool:
        """Commit a batch, retrying while the database fails; False only if it is lost."""
        delay = self._retry_s
        while True:
            if self._failed_closing:  # each try waits out busy_timeout: spill the rest at once
                return self._spill(batch, "database still failing at shutdown")
            try:
                conn.insert([_row(s) for s in batch])
                self._listener("written", len(batch))
                return True
            except RecordRejected:
                self._insert_one_by_one(conn, batch)
                return True
            except SignalDBError as exc:
                # The database itself is failing (disk full, locked, down): keep the batch.
                log.warning("signal store write failed (%s); retrying %d records", exc, len(batch))
                if self._closing.is_set():
                    self._failed_closing = True
                    return self._spill(batch, str(exc))
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _insert_one_by_one(self, conn: DBWriter, batch: list[Sample]) -> None:
        for s in batch:
            row = _row(s)
            try:
                conn.insert([row])
                self._listener("written", 1)
            except RecordRejected as exc:
                conn.dead_letter(s.id, time.time(), str(exc), json.dumps(row, ensure_ascii=False))
                self._listener("failed", 1)
                log.error("signal record %s quarantined: %s", s.id, exc)

    def _spill(self, batch: list[Sample], error: str) -> bool:
        try:
            self.spill_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.spill_path, "a", encoding="utf-8") as fh:
                for s in batch:
                    fh.write(json.dumps(_row(s), ensure_ascii=False) + "\n")
                fh.flush()
                os.fsync(fh.fileno())  # acknowledged records count on it
            log.error(
                "signal store unavailable at shutdown (%s); spilled %d records to %s",
                error,
                len(batch),
                self.spill_path,
            )
            return True
        except OSError as exc:
            self._listener("failed", len(batch))
            log.critical("could not spill %d signal records: %s", len(batch), exc)
            return False

    def _replay_spill(self) -> None:
        if not self.spill_path.exists():
            return
        replay = self.spill_path.with_suffix(".replaying")
        self.spill_path.replace(replay)
        with open(replay, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    self._queue.put((_sample(json.loads(line)), None))
        replay.unlink()

    # -- reading -----------------------------------------------------------------------------
    def count(self) -> int:
        return self.db.count()


def read_samples(where: SignalDB | Path, since: float = 0.0, kind: str | None = None) -> Iterator[Sample]:
    """Records created at or after `since`, oldest first. `where`: a database (`signal_db`), or
    a SQLite file's path."""
    for r in signal_db(where).rows(since, kind):
        yield _sample(r)


def teacher_usage_since(where: SignalDB | Path, since: float) -> dict[str, tuple[int, int]]:
    """Prompt and completion tokens of the teacher answers recorded since `since`, per tenant:
    what a restarted gateway has already spent today (every answered teacher call is recorded)."""
    return signal_db(where).teacher_usage_since(since)


def pending_since(where: SignalDB | Path, since: float) -> tuple[int, float | None]:
    """How many records were created after `since`, and when the oldest of them was (the loop's triggers)."""
    return signal_db(where).pending_since(since)


def set_critique(where: SignalDB | Path, record_id: str, critique: str) -> None:
    signal_db(where).set_critique(record_id, critique)


def export_jsonl(
    where: SignalDB | Path, out: Path, since: float = 0.0, kind: str | None = None, redact: bool = True
) -> int:
    """Write records as chat-format JSONL (see `to_chat_jsonl`); returns how many. Redacted
    again on the way out, so records stored before `signal.redact` was on leave clean too."""
    redactor = Redactor() if redact else None
    n = 0
    with open(out, "w", encoding="utf-8") as fh:
        for s in read_samples(where, since=since, kind=kind):
            if redactor is not None:
                s = redactor.sample(s)[0]
            fh.write(json.dumps(to_chat_jsonl(s), ensure_ascii=False) + "\n")
            n += 1
    return n


def _settle(acks: list[tuple[Ack, bool]]) -> None:
    """Resolve acknowledged records' futures from the writer thread: a thread's future at once;
    an event loop's in one callback a loop (a closed loop has no one left waiting)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[bool], bool]]] = {}
    for done, ok in acks:
        if isinstance(done, Future):
            if not done.done():
                done.set_result(ok)
        else:
            by_loop.setdefault(done.get_loop(), []).append((done, ok))
    for loop, futures in by_loop.items():
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_set_results, futures)


def _set_results(futures: list[tuple[asyncio.Future[bool], bool]]) -> None:
    for done, ok in futures:
        if not done.done():  # cancelled: its wait timed out
            done.set_result(ok)
