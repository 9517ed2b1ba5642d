"""The prefix scorer: its prior, a fit on full drafts, JSON round trips, and the verdicts."""

from __future__ import annotations

import dataclasses
import random

import pytest

from router import PRIOR, ConfidenceRouter, PrefixScorer, RouterConfig, fit_prefix_scorer


def drafts(n: int, seed: int = 0) -> tuple[list[list[float]], list[float]]:
    """Drafts whose first tokens foretell the whole: a sure draft starts sure, an unsure one
    starts unsure, and its confidence is that of the whole draft (the logprob_v1 prior's)."""
    rng = random.Random(seed)
    out, conf = [], []
    scorer = ConfidenceRouter.from_config(RouterConfig()).scorer
    for i in range(n):
        level = -0.05 if i % 2 else -2.5
        lps = [level + rng.gauss(0, 0.1) for _ in range(24)]
        out.append(lps)
        conf.append(scorer.score(scorer.features_of(lps)))
    return out, conf


def test_the_prior_reads_a_prefix_as_a_draft_and_decides_only_clear_cases() -> None:
    router = ConfidenceRouter.from_config(RouterConfig(threshold=0.35))
    sure = router.judge_prefix([-0.05] * 4, 0.35, final=False)
    unsure = router.judge_prefix([-3.0] * 4, 0.35, final=False)
    middling = router.judge_prefix([-1.0] * 4, 0.35, final=False)
    assert (sure.verdict, unsure.verdict, middling.verdict) == ("keep", "escalate", "undecided")
    assert sure.p_escalate < 0.1 < 0.9 < unsure.p_escalate
    # The last prefix decides, to whichever side is likelier.
    assert router.judge_prefix([-1.0] * 16, 0.35, final=True).verdict in ("keep", "escalate")
    assert router.judge_prefix([-0.05] * 4, 1.0, final=False).verdict == "escalate"  # 1 escalates everything
    assert router.judge_prefix([-3.0] * 4, 0.0, final=False).verdict == "keep"  # 0 escalates nothing


def test_a_streamed_draft_is_judged_on_the_configured_schedule() -> None:
    """No verdict before `min_prefix_tokens`; undecided until `decide_after_tokens`, where the
    verdict is forced; the schedule is the config's, not a default's."""
    router = ConfidenceRouter.from_config(RouterConfig(min_prefix_tokens=2, decide_after_tokens=6))
    middling = [-1.0] * 8
    verdicts = [router.judge_so_far(middling[:k], 0.35) for k in range(1, 8)]
    assert verdicts[0] is None
    assert [v.verdict if v else None for v in verdicts[1:5]] == ["undecided"] * 4
    assert all(v is not None and v.verdict != "undecided" for v in verdicts[5:])


def test_a_fitted_scorer_predicts_the_whole_drafts_decision_from_its_prefix() -> None:
    train, conf = drafts(80)
    scorer = fit_prefix_scorer(train, conf, lengths=range(4, 17))
    assert scorer is not None and scorer.fitted and scorer.n == 80
    test, test_conf = drafts(40, seed=1)
    agree = 0
    for lps, c in zip(test, test_conf, strict=True):
        v = scorer.judge(lps[:8], 0.0, 0.35, decisive=0.9, final=True)
        agree += (v.verdict == "escalate") == (c < 0.35)
    assert agree == len(test)
    assert PrefixScorer.from_json(scorer.to_json()) == scorer


def test_too_few_drafts_fit_nothing() -> None:
    train, conf = drafts(10)
    assert fit_prefix_scorer(train, conf, lengths=range(4, 17)) is None
    assert PrefixScorer.from_json(PRIOR.to_json()) == PRIOR and not PRIOR.fitted


def test_prefix_lengths_are_checked() -> None:
    with pytest.raises(ValueError, match="min_prefix_tokens"):
        RouterConfig(min_prefix_tokens=20, decide_after_tokens=16)


def test_a_short_prefix_that_foretells_little_gets_a_wide_spread_and_does_not_decide() -> None:
    """Drafts whose first six tokens look alike whatever follows: a fitted scorer must learn
    that a 4-token prefix says little (wide spread, no early verdict) while a 12-token one says
    much, rather than one spread for every length."""
    rng = random.Random(3)
    scorer_of = ConfidenceRouter.from_config(RouterConfig()).scorer
    train, conf = [], []
    for i in range(120):
        level = -0.05 if i % 2 else -2.5
        lps = [rng.gauss(-1.2, 0.6) for _ in range(6)] + [level + rng.gauss(0, 0.1) for _ in range(18)]
        train.append(lps)
        conf.append(scorer_of.score(scorer_of.features_of(lps)))
    scorer = fit_prefix_scorer(train, conf, lengths=range(4, 17))
    assert scorer is not None and scorer.lengths == tuple(range(4, 17))
    assert scorer.sigma_at(4) > 1.5 * scorer.sigma_at(12)
    assert scorer.sigma_at(2) == scorer.sigma and scorer.sigma_at(40) == scorer.sigma_at(16)

    def tally(m: PrefixScorer, k: int) -> dict[str, int]:
        out = {"right": 0, "wrong": 0, "undecided": 0}
        for lps, c in zip(train[:40], conf[:40], strict=True):
            v = m.judge(lps[:k], 0.0, 0.35, decisive=0.9, final=False).verdict
            truth = "escalate" if c < 0.35 else "keep"
            out["undecided" if v == "undecided" else "right" if v == truth else "wrong"] += 1
        return out

    pooled = dataclasses.replace(scorer, lengths=(), sigmas=())  # one spread for every length
    assert tally(scorer, 4)["wrong"] == 0 < tally(pooled, 4)["wrong"]  # pooled: 7 wrong early verdicts
    assert tally(scorer, 4)["undecided"] >= 36
    for k in (12, 16):
        assert tally(scorer, k)["wrong"] == 0
        assert tally(scorer, k)["right"] > tally(pooled, k)["right"] + 5  # per length: 32 and 38; pooled 23 and 29
    assert PrefixScorer.from_json(scorer.to_json()) == scorer
    # A scorer stored before per-length spreads reads back with its pooled spread only.
    old = {k: v for k, v in scorer.to_json().items() if k not in ("lengths", "sigmas")}
    assert PrefixScorer.from_json(old).sigma_at(4) == scorer.sigma
