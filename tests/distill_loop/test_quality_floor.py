"""Quality held against the teacher: the quality-target floor, in the gate and on live audits.

A student that became confidently wrong scores high confidence on wrong answers. Held only
against its parent it can take over traffic; held to a served-quality target, its floor rises
above those confidences (or to 1: it answers nothing alone), and live audits raise the floor
or roll the version back when the gate's estimate turns out wrong.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import pytest

from distill_loop import BASE, DistillConfig, RoutingState, Sample, SignalConfig, SignalStore, VersionMeta
from distill_loop.gate import Measured, decide, sign_test
from distill_loop.loop import DistillLoop
from distill_loop.trainer import EvalResult
from models import BackendConfig, ChatMessage, Generation, TokenLogprob, Usage
from router import (
    JudgeSource,
    PolicyBook,
    RouterConfig,
    quality_floor,
    route_at,
    served_bound,
    served_ranks,
    z_for,
)

Z = z_for(0.8)


def test_the_bound_charges_only_the_items_the_student_keeps() -> None:
    conf = [0.1, 0.2, 0.9, 0.95]
    agree = [False, False, True, True]
    at = served_bound(0.5, conf, agree, Z)
    assert (at.quality, at.escalation_rate, at.n) == (1.0, 0.5, 4)
    assert 0.5 < at.quality_lower < 1.0  # two escalations are certain; two kept answers are not
    everything = served_bound(1.0, conf, agree, Z)
    assert (everything.quality, everything.quality_lower, everything.escalation_rate) == (1.0, 1.0, 1.0)


def test_a_confidently_wrong_student_is_held_back_by_its_floor() -> None:
    # Right answers at 0.95+, wrong ones at 0.6-0.8: an AUC-high student the gate used to let
    # answer everything at the configured threshold.
    right = [0.95 + i * 0.001 for i in range(30)]
    wrong = [0.6 + i * 0.02 for i in range(10)]
    conf, agree = right + wrong, [True] * 30 + [False] * 10
    floor = quality_floor(conf, agree, 0.95, Z)
    assert max(wrong) < floor.threshold <= min(right)  # every wrong answer escalates
    assert floor.quality_lower >= 0.95 and floor.escalation_rate == pytest.approx(0.25)
    assert route_at(0.32, conf, [float(a) for a in agree]).served_quality == pytest.approx(0.75)  # the old floor
    # Confidently wrong everywhere: no threshold below 1 meets the target.
    assert quality_floor([0.99] * 20, [False] * 20, 0.95, Z).threshold == 1.0
    # No evidence: nothing to rest on.
    assert quality_floor([], [], 0.95, Z).threshold == 1.0


def test_thin_evidence_raises_the_floor_and_more_evidence_lowers_it() -> None:
    few = quality_floor([0.9] * 5 + [0.1] * 5, [True] * 5 + [False] * 5, 0.95, Z)
    many = quality_floor([0.9] * 50 + [0.1] * 50, [True] * 50 + [False] * 50, 0.95, Z)
    assert few.threshold == 1.0  # five right answers do not establish 95 %
    assert many.threshold == pytest.approx(0.1 + 1e-12, abs=0.9) and many.threshold <= 0.9
    assert many.escalation_rate == 0.5


def test_the_gate_compares_both_students_at_their_floors_on_the_same_items() -> None:
    cfg = DistillConfig().gate.model_copy(update={"min_heldout": 4, "max_p_value": 1.0})
    serving_conf, cand_conf = [0.2] * 20, [0.99] * 20
    serving_ok, wrong = [False] * 20, [False] * 20
    fs = quality_floor(serving_conf, serving_ok, 0.95, Z)
    fc = quality_floor(cand_conf, wrong, 0.95, Z)
    assert fs.threshold == fc.threshold == 1.0  # neither may answer alone
    rs = route_at(max(0.3, fs.threshold), serving_conf, [0.0] * 20)
    rc = route_at(max(0.3, fc.threshold), cand_conf, [0.0] * 20)
    assert rc.escalation_rate == 1.0  # the confident, wrong candidate is held back entirely
    heldout = (Measured(2.0, 0.0), Measured(1.5, 0.1))
    anchor = (Measured(1.0, 0.5), Measured(1.0, 0.5))
    paired = sign_test([0.0] * 20, [0.1] * 20)
    passed = decide(
        cfg, heldout, anchor, 20, 8, (rs, rc), fc.threshold, 0.3, paired, floors=(fs, fc), quality_target=0.95
    )
    assert passed.passed  # it learned, and routing is unchanged: everything still escalates
    assert passed.to_json()["floor_candidate"]["threshold"] == 1.0
    # A candidate whose floor escalates more than the serving student's does not pass.
    good = quality_floor([0.9] * 20, [True] * 20, 0.95, Z)
    rs_good = route_at(max(0.3, good.threshold), [0.9] * 20, [1.0] * 20)
    refused = decide(
        cfg, heldout, anchor, 20, 8, (rs_good, rc), fc.threshold, 0.3, paired, floors=(good, fc), quality_target=0.95
    )
    assert (refused.passed, refused.reason) == (False, "escalation_would_rise")


def test_served_ranks_put_quality_before_cost() -> None:
    conf, agree = [0.9, 0.9, 0.1, 0.1], [True, False, True, False]
    assert served_ranks(0.5, conf, agree) == [2, 0, 1, 1]  # kept right, kept wrong, escalated twice
    assert served_ranks(1.0, conf, agree) == [1, 1, 1, 1]  # a floor of 1 serves the teacher only


def test_a_cascade_that_serves_better_passes_though_the_answers_alone_are_not_significant() -> None:
    # The stream benchmark refused such a candidate: 7 answers better and 3 worse (p 0.17),
    # while at the target its cascade kept right answers the serving one escalated.
    cfg = DistillConfig().gate.model_copy(update={"min_heldout": 4})
    heldout = (Measured(2.0, 0.4), Measured(1.5, 0.6))
    anchor = (Measured(1.0, 0.5), Measured(1.0, 0.5))
    answers = sign_test([0.0] * 7 + [1.0] * 3, [1.0] * 7 + [0.0] * 3)
    assert answers.p_value > cfg.max_p_value
    s_conf, s_agree = [0.2] * 10 + [0.99] * 10, [True] * 10 + [False] * 10
    c_conf, c_agree = [0.99] * 10 + [0.2] * 10, [True] * 10 + [False] * 10
    fs, fc = quality_floor(s_conf, s_agree, 0.8, Z), quality_floor(c_conf, c_agree, 0.8, Z)
    at_s, at_c = max(0.3, fs.threshold), max(0.3, fc.threshold)
    served = sign_test(served_ranks(at_s, s_conf, s_agree), served_ranks(at_c, c_conf, c_agree))
    assert served.p_value <= cfg.max_p_value and served.losses == 0
    routed = (route_at(at_s, s_conf, [float(a) for a in s_agree]), route_at(at_c, c_conf, [float(a) for a in c_agree]))

    def gate(served: object, floors: object) -> tuple[bool, str]:
        r = decide(cfg, heldout, anchor, 20, 8, routed, at_c, 0.3, answers, floors=floors, served=served)  # type: ignore[arg-type]
        return r.passed, r.reason

    assert gate(served, (fs, fc)) == (True, "passed")
    # Without a quality target there are no floors, and the answers' own test decides.
    assert gate(served, None) == (False, "improvement_not_significant")
    # A cascade no better either way: refused.
    same = sign_test(served_ranks(at_s, s_conf, s_agree), served_ranks(at_s, s_conf, s_agree))
    assert gate(same, (fs, fc)) == (False, "improvement_not_significant")


def _sample(i: int, kind: str, version: str, confidence: float, right: bool) -> Sample:
    answer = "Returns within 41 days at Tacoma."
    draft = answer if right else "You can return it any time at any store."
    return Sample(
        id=f"{kind}-{i}",
        created_at=time.time(),
        tenant="t",
        kind=kind,  # type: ignore[arg-type]
        reason="audit" if kind == "audit" else "low_confidence",
        messages=(ChatMessage("user", f"return question {i}"),),
        student=Generation(draft, "stop", Usage(5, 8), "s", (), (TokenLogprob("x", -0.01),), version),
        confidence=confidence,
        features={},
        teacher=Generation(answer, "stop", Usage(5, 8), "t", (), (), "t"),
        threshold=0.3,
        sampling_weight=20.0 if kind == "audit" else 1.0,
    )


def _loop(tmp_path: Path, samples: list[Sample]) -> DistillLoop:
    """A loop whose registry serves v0001 (floor 0.3), and `samples` written after it began serving."""
    db = tmp_path / "signal.db"
    config = DistillConfig(registry_dir=tmp_path / "registry", rollback_min_samples=20)
    judging = JudgeSource(RouterConfig(threshold=0.3), tmp_path / "policies.db", calibrated=False)
    loop = DistillLoop(config, db, BackendConfig(kind="local", model="unused"), judging=judging)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    loop.registry.add("v0001", adapter, VersionMeta("v0001", BASE, time.time()))
    loop.registry.save_routing_state("v0001", RoutingState(floor=0.3))
    loop.registry.set_current("v0001", "promoted")
    store = SignalStore(SignalConfig(path=db))
    store.open()
    for s in samples:
        store.submit(dataclasses.replace(s, created_at=time.time()))
    store.close()
    return loop


def test_live_audits_raise_the_floor_of_a_version_wrong_where_it_is_unsure(tmp_path: Path) -> None:
    # Confident and right at 0.9+, wrong at 0.5-0.7: audits find the served agreement below
    # target, and a floor between the two meets it.
    audits = [_sample(i, "audit", "v0001", 0.9 + i * 0.002, True) for i in range(30)]
    audits += [_sample(100 + i, "audit", "v0001", 0.5 + i * 0.02, False) for i in range(10)]
    loop = _loop(tmp_path, audits)
    assert loop.check_quality() == "floor_raised"
    floor = loop.registry.routing_state("v0001").floor
    assert floor is not None and 0.68 < floor <= 0.9
    assert loop.registry.current() == "v0001"
    assert loop.check_quality() is None  # at the new floor the target holds
    # The gateway routes the version at that floor (applied through the policy book).
    book = PolicyBook(tmp_path / "p.db", 0.3)
    book.floors = {"v0001": floor}
    assert book.effective_threshold("*", "v0001") == floor


def test_live_audits_roll_back_a_version_confidently_wrong_everywhere(tmp_path: Path) -> None:
    audits = [_sample(i, "audit", "v0001", 0.97, False) for i in range(25)]
    loop = _loop(tmp_path, audits)
    assert loop.check_quality() == "rolled_back"
    assert loop.registry.current() == BASE
    assert "target" in loop.registry.history()[-1]["reason"]


def test_too_few_audits_change_nothing(tmp_path: Path) -> None:
    loop = _loop(tmp_path, [_sample(i, "audit", "v0001", 0.97, False) for i in range(5)])
    assert loop.check_quality() is None and loop.registry.current() == "v0001"
    assert not math.isnan(loop.registry.routing_state("v0001").floor or 0.0)


def _drafts(n: int, right: bool) -> EvalResult:
    """`n` held-out drafts the router is sure of (token logprob -0.01), right or all wrong."""
    gen = Generation("x", "stop", Usage(5, 1), "s", (), (TokenLogprob("x", -0.01),), BASE)
    score = 1.0 if right else 0.0
    return EvalResult(1.0, score, ("x",) * n, (gen,) * n, (score,) * n)


def test_the_base_model_gets_its_floor_from_the_first_gated_run(tmp_path: Path) -> None:
    """Before its first promotion the base model has no gate report, so no floor: it would serve
    its confident wrong answers at the configured threshold. The first gated run's held-out
    drafts of the serving student are its measurement."""
    config = DistillConfig(registry_dir=tmp_path / "registry", quality_target=0.95)
    judging = JudgeSource(RouterConfig(threshold=0.3), tmp_path / "policies.db", calibrated=False)
    loop = DistillLoop(config, tmp_path / "s.db", BackendConfig(kind="local", model="unused"), judging=judging)
    assert loop.registry.routing_state(BASE).floor is None
    loop._floor_unmeasured(BASE, _drafts(20, right=False))
    state = loop.registry.routing_state(BASE)
    assert state.floor == 1.0 and len(state.evidence) == 20  # sure of itself, and always wrong
    # Measured once: later runs' evidence does not move it (the live audits do).
    loop._floor_unmeasured(BASE, _drafts(20, right=True))
    assert loop.registry.routing_state(BASE) == state


def test_a_base_model_right_where_it_is_sure_keeps_serving(tmp_path: Path) -> None:
    config = DistillConfig(registry_dir=tmp_path / "registry", quality_target=0.95)
    judging = JudgeSource(RouterConfig(threshold=0.3), tmp_path / "policies.db", calibrated=False)
    loop = DistillLoop(config, tmp_path / "s.db", BackendConfig(kind="local", model="unused"), judging=judging)
    loop._floor_unmeasured(BASE, _drafts(20, right=True))
    floor = loop.registry.routing_state(BASE).floor
    assert floor is not None and floor < 0.3  # the configured threshold still governs
    # Without a quality target nothing is measured.
    off = DistillLoop(
        DistillConfig(registry_dir=tmp_path / "r2", quality_target=0.0),
        tmp_path / "s.db",
        BackendConfig(kind="local", model="unused"),
        judging=judging,
    )
    off._floor_unmeasured(BASE, _drafts(20, right=False))
    assert off.registry.routing_state(BASE).floor is None
