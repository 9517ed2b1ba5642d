"""`bench.prefix_prior`'s replay of the early decision, on drafts whose verdicts are plain: it
must take the gateway's rule (decisive from `min_prefix_tokens`, forced at `decide_after_tokens`,
a short draft decided whole) and count a prefix that looks surer than its whole draft as a
disagreement. Generating real drafts is the benchmark's own run, not a test's."""

from __future__ import annotations

from bench.prefix_prior import Draft, replay, summarize
from router import ConfidenceRouter, RouterConfig

SURE, UNSURE, MIDDLING = -0.01, -6.0, -1.0


def test_replay_decides_clear_prefixes_at_the_first_judged_token_and_short_drafts_whole() -> None:
    config = RouterConfig()
    router = ConfidenceRouter.from_config(config)
    assert replay(router, [SURE] * 40, 0.35) == (False, config.min_prefix_tokens)
    assert replay(router, [UNSURE] * 40, 0.35) == (True, config.min_prefix_tokens)
    assert replay(router, [MIDDLING] * 40, 0.35)[1] == config.decide_after_tokens  # never decisive
    assert replay(router, [UNSURE] * 2, 0.35) == (True, 2)  # ended before any prefix was judged


def test_a_prefix_surer_than_its_whole_draft_counts_against_agreement() -> None:
    config = RouterConfig()
    late_doubt = (-0.6,) * config.decide_after_tokens + (UNSURE,) * 24  # the facts come late, unsure
    drafts = [
        Draft("d", "heldout", (SURE,) * 40),
        Draft("d", "heldout", (UNSURE,) * 40),
        Draft("d", "train", late_doubt),
    ]
    summary = summarize(drafts, [0.35])["d"]
    (row,) = summary["agreement"]
    assert row["full_escalates"] == 2 and row["early_escalates"] == 1
    assert row["kept_but_full_escalates"] == 1 and row["escalated_but_full_keeps"] == 0
    assert row["agreement"] == 2 / 3 and row["decided_before_final"] == 2
    spread = summary["spread"]
    assert spread[-1]["tokens"] == 16 and spread[-1]["mean"] > 0  # the prefix reads surer than the whole
