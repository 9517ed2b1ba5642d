"""bench.teacher_cache's plumbing: the replay counts hits and scores them on the request they
answered, and the threshold it recommends is the lowest that holds everywhere above it."""

from __future__ import annotations

import asyncio

from bench.kb import StreamItem
from bench.teacher_cache import recommend, replay


def item(question: str, intent: str, facts: tuple[str, ...]) -> StreamItem:
    return StreamItem(({"role": "user", "content": question},), None, facts, "train", intent)


def test_the_exact_replay_serves_repeats_from_the_cache() -> None:
    items = [
        item("When do you open?", "hours", ("9",)),
        item("Where is my parcel?", "parcel", ("KC-",)),
        item("When  do you open?", "hours", ("9",)),  # the same request, spaced otherwise
        item("When do you open?", "hours", ("9",)),
    ]
    # The teacher's recorded answers: right the first time, wrong on the later copies, which a
    # hit never asks for (it serves the first answer).
    answers = ["We open at 9.", "Track it with your KC- code.", "No idea.", "No idea."]
    tallies = asyncio.run(replay(items, answers, [True, True, False, True], None, None))  # type: ignore[arg-type]
    everything, escalated = tallies["all"].row(), tallies["escalated"].row()
    assert everything["exact_hits"] == 2 and everything["semantic_hits"] == 0
    assert everything["hit_recall"] == 1.0 and everything["fresh_recall_same_requests"] == 0.0
    assert everything["served_recall"] == 1.0
    # Only escalated requests reach the cache: the third never did, so the fourth is the one hit.
    assert escalated["requests"] == 3 and escalated["exact_hits"] == 1


def test_the_recommended_threshold_holds_at_and_above_it() -> None:
    def row(t: float, hit: float, fresh: float, domain: str = "a") -> dict[str, object]:
        return {"domain": domain, "threshold": t, "hit_recall": hit, "fresh_recall_same_requests": fresh}

    a = [row(0.7, 0.5, 0.8), row(0.75, 0.8, 0.8), row(0.8, 0.9, 0.8)]
    rows = [*a, row(0.75, 0.7, 0.8, "b"), row(0.8, 0.8, 0.8, "b")]
    assert recommend(rows) == 0.8
    assert recommend([row(0.7, 0.9, 0.8), row(0.8, 0.7, 0.8)]) is None
