"""The promotion gate's rules, one by one, on measured numbers."""

from __future__ import annotations

import math

import pytest

from distill_loop import GateSettings
from distill_loop.gate import Measured, decide

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
    report = decide(CFG, (SERVING, candidate), (ANCHOR, anchor), n_heldout, 8)
    assert report.reason == reason
    assert report.passed == (reason == "passed")
    assert report.to_json()["heldout_candidate"]["nll"] == candidate.nll or math.isnan(candidate.nll)
