"""The early-routing benchmark's bookkeeping, without models: which settings its gateway changes,
how requests are ordered, and how rows become the issue's four goals (a goal must read "missed"
when the numbers miss it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.early_routing import (
    MODES,
    Row,
    bootstrap_ci,
    choose_prompts,
    gateway_env,
    goals,
    order_for,
    overrides,
    parse_args,
    prefix_state,
    quantile,
    summarize,
    wilson,
)
from bench.kb import StreamItem


def row(
    prompt: int,
    mode: str,
    *,
    tier: str = "student",
    ttft: float | None = 0.2,
    total: float = 1.0,
    recall: float | None = 1.0,
    hedge_tokens: dict[str, float] | None = None,
) -> Row:
    return Row(
        prompt=prompt,
        split="heldout",
        intent="x",
        mode=mode,  # type: ignore[arg-type]
        tier=tier,
        reason="",
        decided_by="prefix" if mode == "early" else None,
        confidence=0.5,
        ttft_s=ttft,
        total_s=total,
        text="",
        recall=recall,
        teacher_tokens=10.0 if tier == "teacher" else 0.0,
        hedges={},
        hedge_tokens=hedge_tokens or {},
    )


def prompt_rows(p: int, *, early: str, full: str, early_total: float = 3.0, recall_early: float = 1.0) -> list[Row]:
    return [
        row(p, "early", tier=early, ttft=0.3 if early == "student" else 2.5, total=early_total, recall=recall_early),
        row(p, "full", tier=full, ttft=1.5, total=3.0),
        row(p, "student", ttft=0.2, total=1.2, recall=0.0),
        row(p, "teacher", tier="teacher", ttft=2.0, total=2.5),
    ]


def test_statistics() -> None:
    assert quantile([], 0.5) is None
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.9) == pytest.approx(3.7)
    assert wilson(0, 0) is None
    lo, hi = wilson(38, 40) or (0, 0)
    assert 0.82 < lo < 0.84 and 0.98 < hi < 0.99  # 38/40: [0.835, 0.986]
    assert wilson(10, 10) == (pytest.approx(0.722, abs=1e-3), 1.0)
    assert bootstrap_ci([]) is None
    assert bootstrap_ci([0.5] * 10) == (0.5, 0.5)
    lo, hi = bootstrap_ci([0.0, 1.0] * 20) or (0, 0)
    assert lo < 0.5 < hi and hi - lo < 0.4
    assert bootstrap_ci([0.0, 1.0] * 20) == bootstrap_ci([0.0, 1.0] * 20)  # seeded


def test_every_mode_goes_first_equally_often() -> None:
    firsts = [order_for(i)[0] for i in range(8)]
    assert sorted(firsts) == sorted(MODES * 2)
    assert all(sorted(order_for(i)) == sorted(MODES) for i in range(4))


def test_prompts_are_distinct_and_held_out_first() -> None:
    def item(q: str, split: str) -> StreamItem:
        return StreamItem(({"role": "user", "content": q},), split=split)  # type: ignore[arg-type]

    items = [item("a", "train"), item("b", "heldout"), item("a", "train"), item("c", "heldout"), item("b", "heldout")]
    assert [i.messages[0]["content"] for i in choose_prompts(items, 10)] == ["b", "c", "a"]
    assert len(choose_prompts(items, 2)) == 2


def test_goals_met() -> None:
    rows = [r for p in range(10) for r in prompt_rows(p, early="student", full="student")]
    rows += [r for p in range(10, 20) for r in prompt_rows(p, early="teacher", full="teacher")]
    s = summarize(rows)
    assert s["prompts"] == 20
    assert s["agreement"]["rate"] == 1.0 and s["agreement"]["table"]["teacher/teacher"] == 10
    assert s["ttft"]["student_p50_s"] == pytest.approx(0.2)
    assert s["escalated"]["early_requests"] == 10
    assert s["escalated"]["early_vs_teacher"] == pytest.approx(3.0 / 2.5)
    assert s["recall"]["diff_early_minus_full"] == 0.0 and s["recall"]["diff_ci95"] == (0.0, 0.0)
    assert s["hedging"]["early_teacher_tokens"] == 100.0
    met = {g.name: g.met for g in goals(s)}
    # early TTFT p50: half at 0.3, half at 2.5 -> 1.4 s, 7x the student's 0.2 s
    assert met == {"ttft": False, "escalated_latency": True, "agreement": True, "recall": True}


def test_goals_missed() -> None:
    rows = [r for p in range(10) for r in prompt_rows(p, early="student", full="teacher", recall_early=0.0)]
    rows += [r for p in range(10, 20) for r in prompt_rows(p, early="teacher", full="teacher", early_total=4.0)]
    rows.append(row(20, "early"))  # a prompt without all four requests is left out
    s = summarize(rows)
    assert s["prompts"] == 20
    assert s["agreement"]["rate"] == 0.5
    assert s["recall"]["diff_early_minus_full"] == -0.5
    met = {g.name: g.met for g in goals(s)}
    assert met == {"ttft": False, "escalated_latency": False, "agreement": False, "recall": False}


def test_nothing_escalated_measures_nothing() -> None:
    rows = [r for p in range(5) for r in prompt_rows(p, early="student", full="student")]
    goal = {g.name: g for g in goals(summarize(rows))}
    assert goal["escalated_latency"].measured is None and goal["escalated_latency"].met is None
    assert goal["ttft"].met is True  # 0.3 s against 0.2 s


def test_hedge_tokens_add_up() -> None:
    rows = [r for p in range(3) for r in prompt_rows(p, early="student", full="student")]
    rows[0] = row(0, "early", hedge_tokens={"cancelled": 700.0})
    s = summarize(rows)
    assert s["hedging"]["hedge_tokens"] == {"cancelled": 700.0} and s["hedging"]["wasted_tokens"] == 700.0


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("TIERGATE_")]:
        monkeypatch.delenv(key)


def test_the_gateway_gets_exactly_the_overrides(clean_env: None, tmp_path: Path) -> None:
    fill = {"prompt": "FAQ {tmp} {early_key}", "admin_key": "adm", "early_key": "e", "full_key": "f"}
    env = gateway_env(tmp_path, fill)
    ours = {k: v for k, v in env.items() if k.startswith("TIERGATE_")}
    assert set(ours) == set(overrides())
    assert ours["TIERGATE_TEACHER__SYSTEM_PROMPT"] == "FAQ {tmp} {early_key}"  # the prompt is not filled in
    assert ours["TIERGATE_SERVER__API_KEYS"] == '["e", "f"]'
    assert ours["TIERGATE_SIGNAL__PATH"] == f"{tmp_path}/signal.db"
    assert ours["TIERGATE_CACHE__ENABLED"] == "false" and ours["TIERGATE_DISTILL__ENABLED"] == "false"
    assert all(o.why for o in overrides().values())
    # Nothing about the decision itself is changed: both modes run the product's router settings.
    assert not [k for k in ours if k.startswith("TIERGATE_ROUTER__")]


def test_the_documented_command_parses() -> None:
    args = parse_args(["--limit", "8", "--warmup", "0"])
    assert (args.limit, args.warmup) == (8, 0)
    assert parse_args([]).limit == 40


def test_the_refit_phase_waits_for_a_scorer_saved_after_the_warm_up(tmp_path: Path) -> None:
    import json
    import os

    state = tmp_path / "routing" / "base.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"floor": None, "prefix": {"coef": [], "n": 0}}))  # the prior: nothing fitted
    assert prefix_state(tmp_path) is None
    state.write_text(json.dumps({"prefix": {"coef": [0.1], "intercept": -0.9, "n": 31}}))
    os.utime(state, (1000.0, 1000.0))
    assert prefix_state(tmp_path) == {"coef": [0.1], "intercept": -0.9, "n": 31}
    assert prefix_state(tmp_path, since=1000.0) is None  # fitted before the last warm-up draft
    assert prefix_state(tmp_path, since=999.0) is not None
