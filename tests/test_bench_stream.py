"""The stream benchmark's bookkeeping, without models: which settings its gateways change, and
how the last quarter of the stream is scored against the issue's goals.

The benchmark's claim rests on these: it must run the product's recipe (no override of the
learning rate, epochs, steps, held-out share or p-value), and a goal must read "missed" when
the numbers miss it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.kb import DATA, StreamItem
from bench.stream_distill import (
    FULL,
    OVERRIDES,
    QUICK,
    RECIPE,
    REPO,
    Outcome,
    WindowRow,
    default_prefix,
    effective_distill,
    gateway_env,
    goals,
    label_stats,
    last_quarter,
    last_quarter_start,
    log_events,
    overrides,
    parse_args,
    promotions,
    request_costs,
    run_in_flight,
    signal_summary,
)
from distill_loop import DistillConfig


def outcome(
    i: int,
    *,
    split: str = "train",
    to_teacher: bool = False,
    served: float | None = 1.0,
    student: float | None = None,
    version: str = "base",
    cost: float | None = 1.0,
) -> Outcome:
    return Outcome(
        index=i,
        split=split,
        intent="x",
        served="",
        served_score=served,
        to_teacher=to_teacher,
        confidence=0.5,
        student=None,
        student_score=student,
        student_version=version,
        seconds=0.1,
        cost_usd=cost,
    )


def row(first: int, n: int, cost: float) -> WindowRow:
    return WindowRow("c", 0, first, n, 0, 0.0, None, None, None, cost, cost / n)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for key in [k for k in os.environ if k.startswith("TIERGATE_")]:
        monkeypatch.delenv(key)


# -- settings ------------------------------------------------------------------------------------
def test_the_full_profile_runs_the_product_recipe() -> None:
    assert not set(RECIPE) & set(overrides(FULL))
    assert "TIERGATE_DISTILL__LORA__LR" in overrides(FULL, lr=5e-4)  # --lr is a tuning run, named as such


def test_the_gateways_read_the_product_defaults_for_the_recipe(clean_env: None, tmp_path: Path) -> None:
    env = gateway_env(tmp_path, "key", "prompt", loop=True, profile=FULL)
    got, product = effective_distill(env), DistillConfig().model_dump(mode="json")
    assert got is not None
    for key in ("lr", "epochs", "max_steps"):
        assert got["lora"][key] == product["lora"][key]
    assert got["holdout_fraction"] == product["holdout_fraction"]
    assert got["gate"] == product["gate"]
    assert got["trigger_records"] == 16 != product["trigger_records"]


def test_the_overrides_are_exactly_what_the_gateway_gets(clean_env: None, tmp_path: Path) -> None:
    prompt = "FAQ with a literal {tmp} in it"
    for profile in (FULL, QUICK):
        for loop in (True, False):
            env = gateway_env(tmp_path, "key", prompt, loop=loop, profile=profile)
            ours = {k: v for k, v in env.items() if k.startswith("TIERGATE_")}
            assert set(ours) == set(overrides(profile)) | {"TIERGATE_DISTILL__ENABLED"}
            assert ours["TIERGATE_DISTILL__ENABLED"] == ("true" if loop else "false")
            assert ours["TIERGATE_TEACHER__SYSTEM_PROMPT"] == prompt  # placeholders are not expanded inside it
            assert ours["TIERGATE_SIGNAL__PATH"] == f"{tmp_path}/signal.db"
            assert ours["TIERGATE_SERVER__ADMIN_API_KEY"] == "key"
            for key, o in overrides(profile).items():
                if "{" not in o.value:
                    assert ours[key] == o.value
    assert all(o.why for o in [*OVERRIDES.values(), *QUICK.overrides.values()])


def test_a_variable_already_set_wins_except_the_loop_flag(
    clean_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERGATE_DISTILL__TRIGGER_RECORDS", "64")
    monkeypatch.setenv("TIERGATE_DISTILL__ENABLED", "true")
    env = gateway_env(tmp_path, "key", "p", loop=False, profile=FULL)
    assert env["TIERGATE_DISTILL__TRIGGER_RECORDS"] == "64"
    assert env["TIERGATE_DISTILL__ENABLED"] == "false"


def test_the_quick_profile_is_small_and_validates(clean_env: None, tmp_path: Path) -> None:
    got = effective_distill(gateway_env(tmp_path, "k", "p", loop=True, profile=QUICK))
    assert got is not None
    assert (got["trigger_records"], got["lora"]["max_steps"], got["gate"]["min_heldout"]) == (5, 24, 4)
    assert got["quality_target"] == 0.8
    assert got["lora"]["lr"] == DistillConfig().lora.lr  # small runs, the same recipe


def test_the_readme_lists_every_override() -> None:
    readme = (REPO / "bench" / "README.md").read_text()
    section = readme[readme.index("## `bench.stream_distill`") :]
    for key in [*OVERRIDES, *QUICK.overrides]:
        assert f"`{key}`" in section or f"`{key.removeprefix('TIERGATE_')}`" in section, key


def test_the_domain_picks_the_knowledge_base_stream_and_output() -> None:
    assert parse_args([]).kb == DATA / "kb.jsonl"
    args = parse_args(["--domain", "bank"])
    assert (args.domain, args.kb) == ("bank", DATA / "kb_bank.jsonl")
    assert parse_args(["--domain", "bank", "--kb", "other.jsonl"]).kb == Path("other.jsonl")
    assert parse_args([]).lr is None
    assert default_prefix("bank", False).name == "stream_distill_bank"
    assert default_prefix("kestrel", True).name == "stream_distill_kestrel_quick"


# -- the last quarter ------------------------------------------------------------------------------
def test_the_last_quarter_is_the_last_quarter_of_requests() -> None:
    assert [last_quarter_start(n) for n in (480, 40, 10, 3, 1)] == [360, 30, 7, 2, 0]


def test_a_request_without_its_own_cost_gets_a_share_of_its_windows() -> None:
    outs = [outcome(0, cost=None), outcome(1, cost=None), outcome(2, cost=0.5), outcome(3, cost=None)]
    rows = [row(0, 2, 3.0), row(2, 2, 1.0)]
    assert request_costs(rows, outs) == [1.5, 1.5, 0.5, 0.5]


def test_last_quarter_numbers_per_configuration() -> None:
    # 8 requests: the last quarter is requests 6 and 7; 7 is held out.
    def stream(esc: list[bool], served: list[float], student: float | None, cost: float) -> list[Outcome]:
        return [
            outcome(
                i,
                split="heldout" if i == 7 else "train",
                to_teacher=esc[i],
                served=served[i],
                student=student if i == 7 else None,
                cost=cost * (2 if esc[i] else 1),
            )
            for i in range(8)
        ]

    outs = {
        "loop_on": stream([True] * 6 + [False, False], [0.0] * 6 + [1.0, 0.5], 0.5, 1.0),
        "loop_off": stream([True, False] * 4, [0.5] * 8, 0.0, 1.0),
        "all_teacher": stream([True] * 8, [1.0] * 8, None, 2.0),
    }
    lq = last_quarter(outs, {n: [o.cost_usd or 0.0 for o in v] for n, v in outs.items()})
    on = lq["loop_on"]
    assert (on["first"], on["requests"], on["heldout"]) == (6, 2, 1)
    assert on["escalation_rate"] == 0.0
    assert on["served_recall_all"] == 0.75
    assert on["served_recall_heldout"] == 0.5
    assert on["student_recall_heldout"] == 0.5
    assert on["cost_vs_all_teacher"] == pytest.approx(2.0 / 8.0)
    assert lq["loop_off"]["escalation_rate"] == 0.5
    assert lq["all_teacher"]["student_recall_heldout"] is None
    assert lq["all_teacher"]["cost_vs_all_teacher"] == 1.0


def lq_of(on: dict[str, float], off_esc: float = 0.5, teacher: tuple[float, float] = (0.8, 0.4)) -> dict:
    return {
        "loop_on": on,
        "loop_off": {"escalation_rate": off_esc},
        "all_teacher": {"served_recall_all": teacher[0], "served_recall_heldout": teacher[1]},
    }


def test_goals_met_with_their_margins() -> None:
    on = {"escalation_rate": 0.21, "served_recall_all": 0.78, "served_recall_heldout": 0.45}
    promo = {"promoted": 2, "rollbacks": 0}
    got = {g.name: g for g in goals(lq_of(on), promo)}
    assert all(g.met for g in got.values())
    esc = got["escalation"]
    assert (esc.measured, esc.bar) == (0.21, 0.25)
    assert esc.detail == "escalation 0.210 vs bar 0.250 (50% of loop off 0.500): met, 0.040 to spare"
    assert got["served_recall_all"].bar == pytest.approx(0.76)
    assert "95% of all-teacher 0.800" in got["served_recall_all"].detail
    assert got["served_recall_heldout"].bar == 0.4
    assert got["promotions"].detail == "2 promoted (bar >= 2), 0 rolled back (bar 0): met"


def test_goals_missed_say_by_how_much() -> None:
    on = {"escalation_rate": 0.30, "served_recall_all": 0.70, "served_recall_heldout": 0.35}
    got = {g.name: g for g in goals(lq_of(on), {"promoted": 3, "rollbacks": 1})}
    assert not any(g.met for g in got.values())
    assert got["escalation"].detail.endswith("missed by 0.050 (20% of the bar)")
    assert got["served_recall_all"].detail.endswith("missed by 0.060 (8% of the bar)")
    assert got["served_recall_heldout"].detail.endswith("missed by 0.050 (13% of the bar)")
    assert got["promotions"].detail.endswith("missed: 1 rollback")
    one = goals(lq_of(on), {"promoted": 1, "rollbacks": 0})[-1]
    assert (one.met, one.detail.endswith("missed: 1 promotion short")) == (False, True)


def test_a_goal_without_its_reference_is_not_measured() -> None:
    got = goals({"loop_on": {"escalation_rate": 0.2}}, None)
    assert [g.met for g in got] == [None, None, None, None]
    assert "not measured" in got[0].detail


# -- promotions, labels, signal ---------------------------------------------------------------------
def test_promotions_from_the_registry_history_and_gate_reports() -> None:
    gate = {
        "n_heldout": 24,
        "heldout_sources": {"escalation": 18, "audit": 2, "label": 4},
        "paired": {"wins": 7, "losses": 1, "p_value": 0.035},
        "routing_threshold": 0.31,
        "floor_candidate": {"threshold": 0.31, "quality": 1.0, "quality_lower": 0.96, "escalation_rate": 0.3, "n": 24},
        "quality_target": 0.95,
    }
    versions = {
        "current": "v0001",
        "versions": [{"name": "v0001", "gate": gate}, {"name": "v0002", "gate": {}}],
        "history": [
            {"time": 1.0, "from": "base", "to": "v0001", "reason": "promoted"},
            {"time": 2.0, "from": "v0001", "to": "v0002", "reason": "promoted"},
            {"time": 3.0, "from": "v0002", "to": "v0001", "reason": "auto_rollback: audit agreement 0.4 < 0.6"},
        ],
    }
    outs = [outcome(0), outcome(1, version="v0001"), outcome(2, version="v0002"), outcome(3, version="v0001")]
    got = promotions(versions, outs)
    assert (got["promoted"], got["rollbacks"]) == (2, 1)
    first, second = got["versions"]
    assert first["version"] == "v0001" and first["first_served_at"] == 1 and not first["rolled_back"]
    assert (first["n_heldout"], first["wins"], first["losses"], first["routing_floor"]) == (24, 7, 1, 0.31)
    assert first["heldout_sources"] == {"escalation": 18, "audit": 2, "label": 4}
    assert first["quality_floor"]["quality_lower"] == 0.96
    assert second["rolled_back"] and second["n_heldout"] is None
    assert goals({}, got)[-1].met is False


def test_promotion_counters_cover_a_truncated_history() -> None:
    m = {
        ("tiergate_distill_runs_total", (("result", "promoted"),)): 3.0,
        ("tiergate_student_rollbacks_total", (("trigger", "auto"),)): 0.0,
    }
    assert promotions({"history": [], "versions": []}, (), m)["promoted"] == 3


def test_label_counts_and_spend_from_metrics() -> None:
    assert label_stats({}) == {"total": 0, "ok": 0, "failed": 0, "by_reason": {}, "cost_usd": 0.0}
    m = {
        ("tiergate_labels_total", (("outcome", "ok"), ("reason", "margin"))): 5.0,
        ("tiergate_labels_total", (("outcome", "failed"), ("reason", "margin"))): 1.0,
        ("tiergate_labels_total", (("outcome", "ok"), ("reason", "uncovered"))): 2.0,
        ("tiergate_label_cost_usd_total", ()): 0.004,
    }
    got = label_stats(m)
    assert (got["total"], got["ok"], got["failed"], got["cost_usd"]) == (8, 7, 1, 0.004)
    assert got["by_reason"] == {"margin": {"ok": 5, "failed": 1}, "uncovered": {"ok": 2}}


def test_a_held_out_prompt_in_the_signal_is_counted() -> None:
    items = [
        StreamItem(({"role": "user", "content": "asked in training"},)),
        StreamItem(({"role": "user", "content": "never trained on"},), split="heldout"),
    ]
    records = [("escalation", "asked in training"), ("label", "never trained on"), ("audit", "asked in training")]
    assert signal_summary(records, items) == {"records": {"escalation": 1, "label": 1, "audit": 1}, "heldout_leaks": 1}


def test_a_run_started_and_not_decided_is_in_flight() -> None:
    started = "2026-11-29 18:28:38,037 INFO distill_loop.loop: distillation run on 44 examples ({...}), serving base"
    promoted = "2026-11-29 18:30:01,000 INFO distill_loop.loop: promoted v0001 (held-out NLL 3.880 -> 0.190; items 4/0)"
    rejected = (
        "2026-11-29 18:31:00,000 WARNING distill_loop.loop: candidate rejected by the gate: served_quality_fell (…)"
    )
    assert not run_in_flight(log_events(""))
    assert run_in_flight(log_events(started))
    assert not run_in_flight(log_events("\n".join([started, promoted])))
    assert run_in_flight(log_events("\n".join([started, promoted, started])))
    assert not run_in_flight(log_events("\n".join([started, rejected])))
    assert log_events(promoted)[0]["groups"] == ["v0001", "3.880", "0.190"]
