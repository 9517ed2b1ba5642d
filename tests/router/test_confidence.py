"""Confidence features, the logprob scorer and the threshold rule, on hand-computed values."""

from __future__ import annotations

import math

import pytest

from models import Generation, TokenLogprob, Usage
from router import ConfidenceRouter, LogprobScorer, RouterConfig, UnknownScorer, logprob_features, quantile


def gen(*lps: float) -> Generation:
    return Generation(
        text="x" * len(lps),
        finish_reason="stop",
        usage=Usage(1, len(lps)),
        model="m",
        logprobs=tuple(TokenLogprob("x", lp) for lp in lps),
    )


def test_quantile_matches_linear_interpolation() -> None:
    assert quantile([4.0, 1.0, 3.0, 2.0], 0.5) == 2.5
    assert quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.1) == pytest.approx(1.4)
    assert quantile([7.0], 0.1) == 7.0
    with pytest.raises(ValueError):
        quantile([], 0.5)


def test_features_of_known_logprobs() -> None:
    f = logprob_features([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert f["n_tokens"] == 5
    assert f["mean_logprob"] == -3.0
    assert f["min_logprob"] == -5.0
    assert f["p10_logprob"] == pytest.approx(-4.6)
    assert f["p50_logprob"] == -3.0
    assert logprob_features([]) == {"n_tokens": 0.0}


def test_score_is_exp_of_weighted_mean_and_quantile() -> None:
    scorer = LogprobScorer(RouterConfig(mean_weight=0.5, quantile=0.1))
    f = scorer.features(gen(-1.0, -2.0, -3.0, -4.0, -5.0))
    assert scorer.score(f) == pytest.approx(math.exp(0.5 * -3.0 + 0.5 * -4.6))
    assert scorer.score(scorer.features(gen(0.0, 0.0))) == 1.0
    assert scorer.score(scorer.features(gen())) == 0.0


def test_low_quantile_is_length_aware_unlike_the_minimum() -> None:
    # One rare token in a long confident answer barely moves the score; in a short one it matters.
    scorer = LogprobScorer(RouterConfig(mean_weight=0.5, quantile=0.1))
    long = scorer.score(scorer.features(gen(*([-0.05] * 49 + [-6.0]))))
    short = scorer.score(scorer.features(gen(-0.05, -6.0)))
    assert long > 0.85
    assert short < 0.2


def test_router_escalates_strictly_below_threshold() -> None:
    router = ConfidenceRouter.from_config(RouterConfig(threshold=0.5, mean_weight=1.0))
    at = gen(math.log(0.5))
    assert router.decide(at).escalate is False  # confidence == threshold keeps the student
    below = router.decide(gen(math.log(0.49)))
    assert below.escalate is True and below.reason == "low_confidence"
    empty = router.decide(gen())
    assert empty.escalate is True and empty.reason == "empty_answer" and empty.confidence == 0.0


def test_threshold_changes_at_runtime_and_rejects_bad_values() -> None:
    router = ConfidenceRouter.from_config(RouterConfig(threshold=0.3))
    assert router.set_threshold(0.8) == 0.3
    assert router.threshold == 0.8
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError):
            router.set_threshold(bad)
    assert router.threshold == 0.8


def test_unknown_scorer_is_a_clear_error() -> None:
    with pytest.raises(UnknownScorer, match="unknown scorer"):
        ConfidenceRouter.from_config(RouterConfig(scorer="nope"))
