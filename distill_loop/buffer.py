"""Data for one distillation run: new records, a replay reservoir, the anchor set, and the split.

Records are de-duplicated on (prompt, teacher answer), near-duplicates collapse to the newest
(`neardup`), then they are split by a hash of the prompt, so a held-out prompt (and its
near-copies) never reaches training. No tenant holds more than `max_tenant_share` of the
training examples or of the held-out items (`tenants`). Each kept record becomes
`Example`s: the teacher's answer (a), its reasoning chain (b) and top-k logprobs (c) where
present, and a correction example (d) when the student's draft disagreed. The anchor set joins
the training examples (as kind "anchor", trained at a lower weight) and is also the gate's
forgetting check. No training here.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Literal

from distill_loop.config import DistillConfig
from distill_loop.db import SignalDB
from distill_loop.metrics import normalise
from distill_loop.sample import Sample
from distill_loop.store import read_samples
from distill_loop.tenants import cap_share
from models import ChatMessage, TokenLogprob

Kind = Literal["answer", "correction", "anchor"]
CORRECTION_PROMPT = "That answer may be wrong. Explain what was wrong, then give the correct answer."


@dataclass(frozen=True, slots=True)
class Example:
    record_id: str
    kind: Kind
    messages: tuple[ChatMessage, ...]  # the prompt the student sees
    target: str  # what the student learns to say
    reference: str  # the teacher's answer, for agreement
    # Teacher token ids and top-k logprobs over `target`, when the teacher logged them.
    teacher_ids: tuple[int, ...] = ()
    teacher_logprobs: tuple[TokenLogprob, ...] = ()
    # The record's kind (escalation, audit, label) or "anchor": the gate reports its items by source.
    source: str = "anchor"


@dataclass(frozen=True, slots=True)
class RunData:
    train: tuple[Example, ...]
    heldout: tuple[Example, ...]
    anchor: tuple[Example, ...]
    window: dict[str, float | int] = field(default_factory=dict)


def prompt_key(messages: Sequence[ChatMessage]) -> str:
    return " ".join(" ".join(normalise(m.content)) for m in messages if m.role != "system")


def is_heldout(messages: Sequence[ChatMessage], fraction: float) -> bool:
    digest = hashlib.sha256(prompt_key(messages).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def dedupe(samples: Iterable[Sample]) -> list[Sample]:
    """Keep the newest record per (prompt, teacher answer)."""
    latest: dict[tuple[str, str], Sample] = {}
    for s in samples:
        key = (prompt_key(s.messages), " ".join(normalise(s.teacher.text)))
        if key not in latest or s.created_at >= latest[key].created_at:
            latest[key] = s
    return sorted(latest.values(), key=lambda s: (s.created_at, s.id))


def examples_for(sample: Sample, config: DistillConfig) -> list[Example]:
    teacher = sample.teacher
    ids = teacher.token_ids or tuple(lp.token_id for lp in teacher.logprobs if lp.token_id is not None)
    out = [
        Example(
            record_id=sample.id,
            kind="answer",
            messages=sample.messages,
            target=teacher.text,
            reference=teacher.text,
            teacher_ids=ids if len(ids) == len(teacher.logprobs) else (),
            teacher_logprobs=teacher.logprobs,
            source=sample.kind,
        )
    ]
    draft = sample.student
    if (
        config.losses.error_correction
        and draft is not None
        and draft.text.strip()
        and sample.features.get("full_draft", 1.0)  # an early decision cut this draft short: not a whole mistake
        and not config.gate.agrees(draft.text, teacher.text)
    ):
        critique = f"{sample.critique.strip()}\n" if sample.critique else ""
        out.append(
            Example(
                record_id=sample.id,
                kind="correction",
                messages=(
                    *sample.messages,
                    ChatMessage("assistant", draft.text),
                    ChatMessage("user", CORRECTION_PROMPT),
                ),
                target=f"{critique}{teacher.text}",
                reference=teacher.text,
                source=sample.kind,
            )
        )
    return out


def load_anchor(path: Path | None) -> list[Example]:
    """The fixed anchor set: {"messages": [...], "answer": "..."} per line."""
    text = path.read_text() if path else resources.files("distill_loop").joinpath("anchor.jsonl").read_text()
    out = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        messages = tuple(ChatMessage(m["role"], m["content"]) for m in row["messages"])
        out.append(Example(f"anchor-{i}", "anchor", messages, row["answer"], row["answer"]))
    return out


def collapse_near_duplicates(samples: Sequence[Sample], similarity: float | None) -> tuple[list[Sample], int]:
    """`samples` (oldest first) less near-duplicates, and how many went. The newest of a group is
    kept, as `dedupe` keeps the newest exact copy: the teacher's latest answer is the one it
    would give now, and a group that keeps arriving keeps one current representative."""
    if similarity is None:
        return list(samples), 0
    from distill_loop.neardup import collapse  # numpy: not for a gateway that never trains

    kept, dropped = collapse(samples[::-1], _prompt_text, lambda s: s.teacher.text, similarity)
    return kept[::-1], dropped


def _prompt_text(sample: Sample) -> str:
    return "\n".join(m.content for m in sample.messages if m.role != "system")


def heldout_window(records: Sequence[Sample], n: int, cap: float, rng: random.Random) -> tuple[list[Sample], int]:
    """The held-out records (oldest first) the gate evaluates: the newest `n`, skipping a
    tenant's records once it holds its quota of the window (its share of `n`), then held to
    the share cap. Returns them and how many of the plain newest `n` the cap displaced."""
    tenants = {s.tenant for s in records}
    quota = max(1, int(max(cap, 1.0 / max(1, len(tenants))) * n))
    taken: Counter[str] = Counter()
    window: list[Sample] = []
    for s in reversed(records):
        if len(window) == n:
            break
        if taken[s.tenant] < quota:
            taken[s.tenant] += 1
            window.append(s)
    window, _ = cap_share(window[::-1], lambda s: s.tenant, lambda _s: 1, cap, rng)
    return window, min(n, len(records)) - len(window)


def build_run_data(
    signal: SignalDB | Path, config: DistillConfig, since: float, until: float, seed: int = 0
) -> RunData:
    """Assemble train/held-out/anchor examples from records up to `until`; new means after `since`."""
    # A record cut to max_record_bytes holds a prompt the teacher never saw: not trained on.
    exact = dedupe(s for s in read_samples(signal) if s.created_at <= until and s.truncated_from is None)
    # Before the split: a near-copy of a held-out prompt in training would flatter the candidate.
    everything, near = collapse_near_duplicates(exact, config.near_duplicate_similarity)
    new = [s for s in everything if s.created_at > since]
    old = [s for s in everything if s.created_at <= since]
    holdout = [s for s in everything if is_heldout(s.messages, config.holdout_fraction)]
    new_train = [s for s in new if not is_heldout(s.messages, config.holdout_fraction)]
    old_train = [s for s in old if not is_heldout(s.messages, config.holdout_fraction)]
    rng = random.Random(seed)
    replay = reservoir(old_train, config.replay_size, rng)
    per_record = [(s, examples_for(s, config)) for s in new_train + replay]
    cap = config.max_tenant_share
    capped, capped_train = cap_share(per_record, lambda r: r[0].tenant, lambda r: len(r[1]), cap, rng)
    anchor = load_anchor(config.anchor_path)
    # The anchor set is trained on (at a lower weight) as well as gated on: rehearsal is what
    # keeps the student's general behaviour while it specialises, and the gate checks it held.
    # It belongs to no tenant, so it is left out of tenant shares.
    train = [e for _, examples in capped for e in examples] + anchor
    window, capped_heldout = heldout_window(holdout, config.gate.max_items, cap, rng)
    heldout = [e for s in window for e in examples_for(s, config) if e.kind == "answer"]
    return RunData(
        train=tuple(train),
        heldout=tuple(heldout),
        anchor=tuple(anchor),
        window={
            "since": since,
            "until": until,
            "new_records": len(new),
            "replayed": len(replay),
            "train_examples": len(train),
            "heldout_examples": len(holdout),  # the gate evaluates at most gate.max_items of them
            "near_duplicates": near,
            "near_duplicates_new": sum(s.created_at > since for s in exact) - len(new),
            "tenants": len({s.tenant for s in everything}),
            "tenant_capped_train": capped_train,
            "tenant_capped_heldout": capped_heldout,
        },
    )


def reservoir(items: Sequence[Sample], k: int, rng: random.Random) -> list[Sample]:
    """Vitter's algorithm R: a uniform sample of k items in one pass."""
    out: list[Sample] = []
    for i, item in enumerate(items):
        if i < k:
            out.append(item)
        else:
            j = rng.randint(0, i)
            if j < k:
                out[j] = item
    return out
