"""The distillation loop on a tiny model: train, gate, register, hot-swap, reject, roll back."""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from distill_loop import (
    BASE,
    DistillConfig,
    LossSettings,
    Registry,
    SignalConfig,
    SignalStore,
    UnknownVersion,
    VersionMeta,
)
from distill_loop.buffer import Example, build_run_data, is_heldout
from distill_loop.loop import DistillLoop
from distill_loop.loss import LossWeights
from distill_loop.publish import LocalPublisher
from distill_loop.trainer import StudentTrainer
from models import BackendConfig, ChatMessage, Generation, SamplingParams, TokenLogprob, TopLogprob, Usage
from models.local import LocalBackend
from router import DEFAULT_TENANT, FixedThreshold, JudgeSource, PolicyBook, RouterConfig
from tests.fakes import intent_samples

PROMPT = (ChatMessage("user", "please help with refund"),)


def loop_config(tmp_path: Path, **kw: object) -> DistillConfig:
    base: dict[str, object] = {
        "registry_dir": tmp_path / "registry",
        "trigger_records": 4,
        "holdout_fraction": 0.25,
        "losses": {"error_correction": False},
        "lora": {"r": 8, "alpha": 16, "lr": 2e-2, "epochs": 50, "batch_size": 8, "max_steps": 200},
        # A tiny task: few held-out prompts, and agreement moves on few of them, so no sign test
        # (test_gate.py tests it).
        "gate": {"max_new_tokens": 12, "min_heldout": 4, "max_p_value": 1.0},
        # Held against the serving student, not a quality target (test_quality_floor.py tests that).
        "quality_target": 0.0,
    }
    return DistillConfig(**{**base, **kw})  # type: ignore[arg-type]


def write(db: Path, samples: Sequence[object]) -> None:
    store = SignalStore(SignalConfig(path=db))
    store.open()
    for s in samples:
        store.submit(s)  # type: ignore[arg-type]
    store.close()


def student_cfg(model_dir: Path) -> BackendConfig:
    return BackendConfig(kind="local", model=str(model_dir), device="cpu", dtype="float32")


def wrong_answers(examples: Sequence[Example]) -> list[Example]:
    """Every example taught another intent's answer. (Shuffled answers left about a quarter of
    them right, by chance, and a candidate trained on those passed the gate on some CPUs.)"""
    answers = sorted({e.target for e in examples})
    assert len(answers) > 1
    return [dataclasses.replace(e, target=answers[(answers.index(e.target) + 1) % len(answers)]) for e in examples]


@pytest.mark.anyio
async def test_loop_trains_promotes_swaps_rejects_and_rolls_back(tiny_model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "signal.db"
    write(db, intent_samples())
    # The default tenant's persisted policy routes at 0.0 (the configured threshold is 0.5): every
    # draft is kept, so served agreement is the student's own. The judge reads the policy file,
    # as a trainer in another process would.
    policies = PolicyBook(tmp_path / "policies.db", 0.5)
    policies.open()
    await policies.set(DEFAULT_TENANT, FixedThreshold(0.0), "test")
    judging = JudgeSource(RouterConfig(threshold=0.5), policies.where, calibrated=False)
    loop = DistillLoop(loop_config(tmp_path), db, student_cfg(tiny_model_dir), judging=judging)
    assert loop.due()

    backend = LocalBackend(student_cfg(tiny_model_dir))
    await backend.start()
    publisher = LocalPublisher(loop.registry, backend)
    greedy = SamplingParams(max_tokens=8, temperature=0)
    try:
        before = await backend.generate(PROMPT, greedy)
        assert before.version == BASE

        first = await loop.arun_once()
        assert (first.result, first.version) == ("promoted", "v0001"), first
        assert first.gate is not None
        assert first.gate.heldout_candidate.nll < first.gate.heldout_serving.nll
        assert first.gate.heldout_candidate.agreement > first.gate.heldout_serving.agreement
        assert first.gate.routed_candidate is not None and first.gate.routed_serving is not None
        assert first.gate.routed_candidate.escalation_rate == 0.0  # the rule kept everything
        assert first.gate.routing_threshold == 0.0  # quality held at the policy's threshold
        assert loop.registry.routing_state("v0001").floor == 0.0 and loop.registry.routing_state(BASE).floor is None
        assert first.gate.routed_candidate.served_quality == pytest.approx(first.gate.heldout_candidate.agreement)
        assert loop.registry.current() == "v0001"
        meta = loop.registry.meta("v0001")
        assert meta.parent == BASE and meta.gate["passed"] and meta.data_window["new_records"] == 32
        assert not loop.due()  # everything was offered to that run

        assert await publisher.sync() == "v0001"
        after = await backend.generate(PROMPT, greedy)
        assert after.version == "v0001"
        assert after.logprobs != before.logprobs  # served responses come from the new version

        # A candidate trained on wrong answers must not pass the gate.
        write(db, [dataclasses.replace(s, id=s.id + "-b", created_at=time.time()) for s in intent_samples()])
        corrupt = await loop.arun_once(transform=wrong_answers)
        assert corrupt.result == "rejected" and corrupt.version is None, corrupt
        assert loop.registry.current() == "v0001" and loop.registry.versions() == ["v0001"]
        assert await publisher.sync() is None

        # Rollback restores the previous outputs exactly.
        loop.registry.set_current(BASE, "rollback by test")
        assert await publisher.sync() == BASE
        back = await backend.generate(PROMPT, greedy)
        assert back.token_ids == before.token_ids
        assert [t.logprob for t in back.logprobs] == [t.logprob for t in before.logprobs]
    finally:
        await backend.aclose()


def test_split_is_by_prompt_and_deduplicates(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    samples = intent_samples()
    write(db, samples + [dataclasses.replace(samples[0], id="dup", created_at=samples[0].created_at + 0.5)])
    data = build_run_data(db, loop_config(tmp_path), since=0.0, until=time.time())
    train_prompts = {e.messages[0].content for e in data.train}
    held_prompts = {e.messages[0].content for e in data.heldout}
    assert train_prompts and held_prompts and not train_prompts & held_prompts
    assert all(is_heldout(e.messages, 0.25) for e in data.heldout)
    assert data.window["new_records"] == len(samples)  # the duplicate collapsed
    assert len(data.anchor) >= 8


def test_trigger_by_count_and_staleness(tiny_model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write(db, intent_samples(start=time.time())[:2])
    loop = DistillLoop(loop_config(tmp_path, trigger_records=10, max_staleness_s=60), db, student_cfg(tiny_model_dir))
    assert loop.pending() == 2
    assert not loop.due(now=time.time())
    assert loop.due(now=time.time() + 3600)  # waited past max staleness


def make_version(registry: Registry, tmp_path: Path, name: str, parent: str) -> None:
    adapter = tmp_path / f"adapter-{name}"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    registry.add(name, adapter, VersionMeta(name=name, parent=parent, created_at=time.time()))


def test_pruning_removes_staging_folders_a_dead_trainer_left_but_not_one_being_written(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=2)
    versions = tmp_path / "reg" / "versions"
    dead, live = versions / ".v0007.tmp", versions / ".v0008.tmp"
    for folder in (dead, live):
        (folder / "adapter").mkdir(parents=True)
    old = time.time() - 2 * 3600
    os.utime(dead, (old, old))
    assert reg.prune() == [".v0007.tmp"]
    assert not dead.exists() and live.exists() and reg.versions() == []


def test_registry_names_pointer_history_and_pruning(tmp_path: Path) -> None:
    reg = Registry(tmp_path / "reg", keep=2)
    assert reg.current() == BASE
    names = [reg.new_name() for _ in range(4)]
    assert names == ["v0001", "v0002", "v0003", "v0004"]
    for n, parent in zip(names, [BASE, *names[:-1]], strict=True):
        make_version(reg, tmp_path, n, parent)
        reg.set_current(n, "promoted")
    assert reg.current() == "v0004" and reg.previous() == "v0003"
    assert reg.versions() == ["v0003", "v0004"]  # oldest pruned, current and previous kept
    (tmp_path / "again").mkdir()
    with pytest.raises(Exception, match="never reused"):
        make_version(reg, tmp_path / "again", "v0004", "v0003")
    with pytest.raises(LookupError):
        reg.set_current("v0001", "rollback")  # pruned
    assert Registry(tmp_path / "reg").new_name() == "v0005"  # the counter survives restarts
    assert [h["to"] for h in reg.history()] == names


def test_a_version_left_half_written_is_never_listed_or_served(tmp_path: Path) -> None:
    """A trainer killed inside `Registry.add`, after its staging folder got its meta.json and
    before the rename: the folder stays, and is no version."""
    reg = Registry(tmp_path / "reg")
    make_version(reg, tmp_path, reg.new_name(), BASE)
    staging = tmp_path / "reg" / "versions" / f".{reg.new_name()}.tmp"
    shutil.copytree(tmp_path / "reg" / "versions" / "v0001", staging)
    assert reg.versions() == ["v0001"]
    for look in (reg.meta, reg.adapter_dir, lambda name: reg.set_current(name, "rollback")):
        with pytest.raises(UnknownVersion):
            look(staging.name)
    assert reg.current() == BASE and reg.history() == []


def audit(i: int, version: str, agrees: bool) -> object:
    s = intent_samples()[i % 32]
    draft = Generation(s.teacher.text if agrees else "no idea", "stop", Usage(1, 1), "tiny", (), (), version)
    return dataclasses.replace(s, id=f"a{version}{i}", kind="audit", reason="audit", student=draft)


def test_auto_rollback_when_live_audit_agreement_drops(tiny_model_dir: Path, tmp_path: Path) -> None:
    cfg = loop_config(tmp_path, rollback_min_samples=5, rollback_margin=0.1)
    reg = Registry(cfg.registry_dir)
    for name, parent in (("v0001", BASE), ("v0002", "v0001")):
        make_version(reg, tmp_path, name, parent)
        reg.set_current(name, "promoted")
    db = tmp_path / "s.db"
    write(db, [audit(i, "v0001", True) for i in range(6)] + [audit(i, "v0002", i == 0) for i in range(4)])
    events: list[tuple[str, dict[str, object]]] = []
    loop = DistillLoop(cfg, db, student_cfg(tiny_model_dir), listener=lambda e, d: events.append((e, d)))
    assert loop.check_rollback() is None  # only 4 samples of v0002: not enough evidence yet
    write(db, [audit(i + 10, "v0002", False) for i in range(3)])
    assert loop.check_rollback() == "v0001"
    assert reg.current() == "v0001" and reg.history()[-1]["reason"].startswith("auto_rollback")
    assert ("rollback", {"from": "v0002", "to": "v0001", "trigger": "auto"}) in events


def test_token_kd_and_reasoning_segments_are_encoded(tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    answer = "Refunds take five business days."
    ids = tok(answer, add_special_tokens=False)["input_ids"]
    lps = tuple(
        TokenLogprob(tok.decode([i]), -0.1, i, (TopLogprob(tok.decode([i]), -0.1, i), TopLogprob("x", -2.5, 5)))
        for i in ids
    )
    trainer = StudentTrainer(tiny_model_dir, None, student_cfg(tiny_model_dir), loop_config(tmp_path))
    kd = trainer.encode(Example("r", "answer", PROMPT, answer, answer, tuple(ids), lps))
    assert kd.kd_ids is not None and kd.kd_ids[0] == [ids[0], 5] and kd.kd_logprobs is not None
    assert kd.ids[kd.target_start :] == [*ids, tok.eos_token_id]
    chain = trainer.encode(Example("r", "answer", PROMPT, "<think>check policy</think> Five days.", "Five days."))
    assert chain.kd_ids is None and 2 in chain.segments and 1 in chain.segments
    assert chain.segments.index(1) > chain.segments.index(2)  # chain first, then the answer
    weights = LossWeights(*LossSettings().early)
    report = trainer.train([Example("r", "answer", PROMPT, answer, answer, tuple(ids), lps)] * 4, weights)
    assert report.kd_examples == 4 and report.last_loss < report.first_loss
    assert torch.isfinite(torch.tensor(report.last_loss))


def test_a_run_without_enough_heldout_items_is_skipped_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    write(db, intent_samples())
    loop = DistillLoop(loop_config(tmp_path, gate={"min_heldout": 1000}), db, student_cfg(tiny_model_dir))
    started = time.perf_counter()
    outcome = loop.run_once()
    assert (outcome.result, outcome.reason, outcome.train) == ("skipped", "too_few_heldout", {})
    assert time.perf_counter() - started < 30  # no training run was spent on it
    assert not loop.due()  # offered once; later records trigger the next run


@pytest.mark.anyio
async def test_gate_drafts_are_what_the_gateway_would_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The gate's greedy drafts carry the tokens and logprobs the served model would give, so
    replaying the gateway's router on them routes them as live traffic would be routed."""
    cfg = loop_config(tmp_path, gate={"max_new_tokens": 8})
    trainer = StudentTrainer(tiny_model_dir, None, student_cfg(tiny_model_dir), cfg)
    example = Example("r1", "answer", PROMPT, "refund", "refund")
    draft = trainer.evaluate("serving", [example]).drafts[0]
    backend = LocalBackend(student_cfg(tiny_model_dir))
    await backend.start()
    try:
        live = await backend.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0))
    finally:
        await backend.aclose()
    assert draft.token_ids == live.token_ids and draft.text == live.text.strip()
    assert [t.logprob for t in draft.logprobs] == pytest.approx([t.logprob for t in live.logprobs], abs=1e-4)
