"""The promotion gate's rules, one by one, on measured numbers."""

from __future__ import annotations

import math

import pytest

from distill_loop import GateSettings
from distill_loop.gate import Measured, Paired, decide, sign_test
from router import fit_threshold, route_at, simulate

CFG = GateSettings(min_nll_gain=0.05, anchor_max_agreement_drop=0.05, anchor_max_nll_rise=0.1, min_heldout=4)
SERVING = Measured(nll=2.0, agreement=0.5)
ANCHOR = Measured(nll=3.0, agreement=0.6)


@pytest.mark.parametrize(
    ("candidate", "anchor", "n_heldout", "reason"),
    [
        (Measured(1.5, 0.6), ANCHOR, 10, "passed"),
        (Measured(1.5, 0.6), ANCHOR, 0, "no_heldout_data"),
        (Measured(math.nan, 0.6), ANCHOR, 10, "no_heldout_data"),
        (Measured(1.5, 0.6), ANCHOR, 3, "too_few_heldout"),
        (Measured(1.97, 0.6), ANCHOR, 10, "heldout_nll_not_improved"),  # gain 0.03 < 0.05
        (Measured(1.5, 0.45), ANCHOR, 10, "heldout_agreement_fell"),
        (Measured(1.5, 0.6), Measured(3.0, 0.54), 10, "anchor_agreement_regressed"),  # drop 0.06 > 0.05
        (Measured(1.5, 0.6), Measured(3.2, 0.6), 10, "anchor_nll_regressed"),
        (Measured(1.5, 0.6), Measured(3.05, 0.56), 10, "passed"),  # within both anchor bounds
    ],
)
def test_gate_rules(candidate: Measured, anchor: Measured, n_heldout: int, reason: str) -> None:
    report = decide(CFG, (SERVING, candidate), (ANCHOR, anchor), n_heldout, 40)
    assert report.reason == reason
    assert report.passed == (reason == "passed")
    assert report.to_json()["heldout_candidate"]["nll"] == candidate.nll or math.isnan(candidate.nll)


@pytest.mark.parametrize(
    ("n_anchor", "fall", "passed"),
    [
        (8, 0.115, True),  # one of 8 anchors slipped (run K's refusal): a flip, not forgetting
        (8, 0.125, True),  # one whole anchor lost
        (8, 0.2, False),  # more than one item's worth
        (40, 0.04, True),  # a large set: the configured 0.05 governs
        (40, 0.06, False),
    ],
)
def test_the_anchor_allowance_is_never_below_one_item(n_anchor: int, fall: float, passed: bool) -> None:
    anchor = Measured(3.0, ANCHOR.agreement - fall)
    report = decide(CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, anchor), 10, n_anchor)
    assert report.passed == passed
    assert report.reason == ("passed" if passed else "anchor_agreement_regressed")


def test_simulate_serves_kept_drafts_and_the_teacher_otherwise() -> None:
    # kept drafts score 0.2 and 0.6; the escalated one is served by the teacher (1.0)
    routed = simulate([True, False, True, False], [0.2, 0.0, 0.6, 0.3])
    assert routed.served_quality == pytest.approx((0.2 + 1.0 + 0.6 + 1.0) / 4)
    assert routed.escalation_rate == 0.5 and routed.n == 4
    assert math.isnan(simulate([], []).served_quality)


def test_a_confident_candidate_that_keeps_wrong_answers_is_rejected() -> None:
    """Better NLL and agreement on its own answers, but routing would now serve its misses."""
    serving = simulate([False, False, True, False], [0.1, 0.2, 0.9, 0.1])  # 0.975 served
    candidate = simulate([True, True, True, False], [0.3, 0.4, 0.9, 0.2])  # 0.65 served
    report = decide(CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 10, 8, (serving, candidate))
    assert (report.passed, report.reason) == (False, "served_quality_fell")
    assert report.to_json()["routed_candidate"]["escalation_rate"] == 0.25
    better = simulate([True, False, True, False], [1.0, 0.2, 0.9, 0.1])  # keeps one more, and gets it right
    assert decide(CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 10, 8, (serving, better)).passed


def test_escalating_more_for_the_same_quality_is_refused() -> None:
    serving = simulate([True, False, True, False], [1.0, 0.2, 0.9, 0.1])  # 0.975, escalation 0.5
    costlier = simulate([True, False, False, False], [1.0, 0.2, 0.9, 0.1])  # 1.0, escalation 0.75
    report = decide(CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 10, 8, (serving, costlier))
    assert (report.passed, report.reason) == (False, "escalation_would_rise")


def test_fit_threshold_finds_the_lowest_threshold_that_keeps_quality() -> None:
    conf = [0.9, 0.8, 0.6, 0.4]
    scores = [1.0, 0.2, 1.0, 0.0]
    # at 0.5: keeps 0.9, 0.8, 0.6 -> (1 + 0.2 + 1 + 1) / 4 = 0.8; at 0.6: same set;
    # at 0.8: keeps 0.9, 0.8 -> (1 + 0.2 + 1 + 1) / 4 = 0.8; at 0.9: keeps 0.9 -> 1.0
    assert route_at(0.5, conf, scores).served_quality == pytest.approx(0.8)
    t, routed = fit_threshold(conf, scores, floor=0.5, target=0.9)
    assert t == 0.9 and routed.served_quality == 1.0 and routed.escalation_rate == 0.75
    assert fit_threshold(conf, scores, floor=0.5, target=0.8)[0] == 0.5  # the floor already does
    t, routed = fit_threshold([0.9], [0.0], floor=0.5, target=1.0)
    assert math.isinf(t) and routed.escalation_rate == 1.0  # only the teacher reaches it


def test_a_raised_floor_must_save_escalations() -> None:
    serving = simulate([True, False, True, False], [0.0, 0.2, 0.9, 0.1])  # 0.725, escalation 0.5
    same_cost = simulate([False, True, True, False], [0.2, 0.9, 0.9, 0.1])  # 0.95, escalation 0.5
    args = (CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 10, 8, (serving, same_cost))
    assert decide(*args, routing_threshold=0.5, configured_threshold=0.5).passed  # floor not raised
    report = decide(*args, routing_threshold=0.6, configured_threshold=0.5)
    assert (report.passed, report.reason) == (False, "no_escalations_saved")
    cheaper = simulate([True, True, True, False], [1.0, 0.9, 0.9, 0.1])  # escalation 0.25
    cheaper_args = (CFG, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 10, 8, (serving, cheaper))
    assert decide(*cheaper_args, routing_threshold=0.6, configured_threshold=0.5).passed


def test_sign_test_against_hand_computed_binomial_tails() -> None:
    # 5 wins, 0 losses: (1/2)^5. Ties (equal scores) are dropped before counting.
    assert sign_test([0, 0, 0, 0, 0, 0.5], [1, 1, 1, 1, 1, 0.5]) == Paired(5, 0, 1 / 32)
    # 6 wins, 1 loss: P(X >= 6), X ~ Bin(7, 1/2) = (7 + 1) / 128
    paired = sign_test([0] * 6 + [1], [1] * 6 + [0])
    assert (paired.wins, paired.losses) == (6, 1) and paired.p_value == pytest.approx(8 / 128)
    # no movement at all: nothing to claim
    assert sign_test([0.3, 0.3], [0.3, 0.3]).p_value == 1.0
    # more losses than wins
    assert sign_test([1, 1, 1], [0, 0, 1]).p_value == 1.0


def test_a_mean_gain_carried_by_one_item_is_not_significant() -> None:
    """The stream benchmark's failure: 6 items, one flipped answer, 0.667 -> 0.750."""
    serving, candidate = [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0.5, 0]
    flip = sign_test(serving, candidate)
    assert flip.p_value == 0.5
    cfg = CFG.model_copy(update={"max_p_value": 0.05})
    report = decide(cfg, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 6, 8, paired=flip)
    assert (report.passed, report.reason) == (False, "improvement_not_significant")
    assert report.to_json()["paired"] == {"wins": 1, "losses": 0, "p_value": 0.5}
    learned = sign_test([0, 0, 0, 0, 0, 1], [1, 1, 0.5, 1, 1, 1])
    assert decide(cfg, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 6, 8, paired=learned).passed


def test_the_default_significance_level_passes_four_clean_wins_and_not_three() -> None:
    """4 of 20 held-out items better and none worse pass; 3 do not. A decision rests on at
    least 20 items by default (8-12 let noise promote and refuse alike)."""
    cfg = GateSettings()
    assert cfg.max_p_value == 0.1 and cfg.min_heldout == 20
    four, three = sign_test([0] * 20, [1] * 4 + [0] * 16), sign_test([0] * 20, [1] * 3 + [0] * 17)
    assert (four.p_value, three.p_value) == (1 / 16, 1 / 8)
    assert decide(cfg, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 20, 8, paired=four).passed
    assert decide(cfg, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 19, 8, paired=four).reason == "too_few_heldout"
    refused = decide(cfg, (SERVING, Measured(1.5, 0.6)), (ANCHOR, ANCHOR), 20, 8, paired=three)
    assert refused.reason == "improvement_not_significant"
