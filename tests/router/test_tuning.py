"""Calibration, the target-rate controller, what-if curves and the learned router."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from router.calibrate import Calibrator, expected_calibration_error, fit_calibrator
from router.learned import fit_learned_router
from router.policy import FixedThreshold, TargetRate, policy_from_json
from router.whatif import Observation, curve, point, threshold_for_quality, wilson_lower


def synthetic(n: int, seed: int) -> tuple[list[float], list[bool]]:
    """Raw confidences that are badly calibrated: P(acceptable) = conf**3."""
    rng = random.Random(seed)
    conf = [rng.random() for _ in range(n)]
    return conf, [rng.random() < c**3 for c in conf]


@pytest.mark.parametrize(("n", "method"), [(400, "platt"), (3000, "isotonic")])
def test_calibration_lowers_ece_on_held_out_data(n: int, method: str) -> None:
    conf, ok = synthetic(n, seed=1)
    cal = fit_calibrator(conf, ok)
    assert cal.method == method
    test_conf, test_ok = synthetic(2000, seed=2)
    raw = expected_calibration_error(test_conf, test_ok)
    calibrated = expected_calibration_error([cal(c) for c in test_conf], test_ok)
    assert calibrated < raw / 2, (raw, calibrated)
    assert Calibrator.from_json(cal.to_json()) == cal


def test_ece_by_hand() -> None:
    # Two bins: predictions 0.1 (observed 0/2) and 0.9 (observed 2/2): ECE = 0.5*0.1 + 0.5*0.1.
    assert expected_calibration_error([0.1, 0.1, 0.9, 0.9], [False, False, True, True]) == pytest.approx(0.1)


def test_one_class_labels_give_identity() -> None:
    assert fit_calibrator([0.1, 0.5, 0.9], [True, True, True]).method == "identity"


def test_target_rate_holds_within_two_points_across_a_swap() -> None:
    rng = np.random.default_rng(0)
    policy = TargetRate(0.2, window=500, initial=0.35, min_samples=20)
    escalated = []
    for i in range(6000):
        if i == 3000:
            policy.reset()  # a student swap: its confidences are distributed differently
        c = rng.beta(2, 5) if i < 3000 else rng.beta(5, 2)
        t = policy.current()
        escalated.append(c < t)
        policy.observe(float(c))
    overall = sum(escalated) / len(escalated)
    assert abs(overall - 0.2) <= 0.02, overall
    for start in range(0, 6000, 1000):
        window = escalated[start : start + 1000]
        assert abs(sum(window) / len(window) - 0.2) <= 0.02, (start, sum(window) / len(window))


def test_policies_round_trip() -> None:
    assert policy_from_json({"kind": "fixed", "threshold": 0.4}, initial=0.3) == FixedThreshold(0.4)
    tr = policy_from_json({"kind": "target_rate", "rate": 0.1}, initial=0.3)
    assert isinstance(tr, TargetRate) and tr.current() == 0.3
    with pytest.raises(ValueError):
        policy_from_json({"kind": "nope"}, initial=0.3)
    with pytest.raises(ValueError):
        TargetRate(1.5, initial=0.5)


def test_whatif_point_by_hand() -> None:
    obs = [
        Observation(0.2, False, 1.0, 1.0, 10.0),  # escalated when t > 0.2
        Observation(0.6, True, 4.0, 1.0, 10.0),  # an audit standing for 4 requests
        Observation(0.8, False, 4.0, 1.0, 10.0),
    ]
    p = point(obs, 0.5)
    assert p.escalation_rate == pytest.approx(1 / 9)
    assert p.quality == pytest.approx((1 + 4) / 9)
    assert p.cost_per_request == pytest.approx((9 * 1 + 1 * 10) / 9)
    assert p.cost_vs_teacher == pytest.approx((9 + 10) / 90)
    everything = point(obs, 1.01)
    assert everything.escalation_rate == 1.0 and everything.quality == 1.0
    rates = [q.escalation_rate for q in curve(obs)]
    assert rates == sorted(rates)  # more escalation as the threshold rises


def test_threshold_for_quality_picks_the_cheapest_point_meeting_the_bound() -> None:
    rng = random.Random(3)
    obs = [Observation(c, rng.random() < c, 1.0, 0.1, 1.0) for c in (rng.random() for _ in range(2000))]
    best = threshold_for_quality(obs, 0.8)
    assert best is not None and best.quality_lower >= 0.8
    for p in curve(obs, [i / 100 for i in range(101)]):
        if p.quality_lower >= 0.8:
            assert p.escalation_rate >= best.escalation_rate - 1e-9
    assert threshold_for_quality(obs, 1.01) is None
    assert wilson_lower(0.5, 100, 1.645) == pytest.approx(0.4189, abs=1e-3)


def test_learned_router_prefers_prompts_it_saw_fail_and_uses_weights() -> None:
    rng = random.Random(0)
    prompts, feats, needs, weights = [], [], [], []
    for _ in range(400):
        hard = rng.random() < 0.5
        prompts.append("order 12345 status 67890?" if hard else "hello")
        lp = -3.0 if hard else -0.2
        feats.append({"mean_logprob": lp, "min_logprob": lp, "p10_logprob": lp, "p25_logprob": lp, "n_tokens": 8})
        needs.append(hard)
        weights.append(1.0 if hard else 20.0)  # confident ones came from a 5% audit slice
    router = fit_learned_router(feats, prompts, needs, weights)
    assert router is not None
    assert router.p_hard_prompt("order 54321 status 09876?") > 0.5 > router.p_hard_prompt("hallo")
    assert router.p_escalate(feats[0], prompts[0]) == pytest.approx(float(needs[0]), abs=0.2)
    assert fit_learned_router(feats[:5], prompts[:5], needs[:5], weights[:5]) is None
    assert math.isfinite(router.p_hard_prompt(""))
