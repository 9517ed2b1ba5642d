"""The promotion gate: paired comparison of candidate and serving student on the same items.

Pass when, on the held-out set, the candidate's NLL of teacher answers falls by at least
`min_nll_gain` and its agreement with the teacher does not fall; and, on the anchor set, its
agreement drops by no more than `anchor_max_agreement_drop` and its NLL rises by no more
than `anchor_max_nll_rise`. Pure decision over measured numbers; measuring is the trainer's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from distill_loop.config import GateSettings


@dataclass(frozen=True, slots=True)
class Measured:
    nll: float
    agreement: float


@dataclass(frozen=True, slots=True)
class GateReport:
    passed: bool
    reason: str
    heldout_serving: Measured
    heldout_candidate: Measured
    anchor_serving: Measured
    anchor_candidate: Measured
    n_heldout: int
    n_anchor: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(
    cfg: GateSettings,
    heldout: tuple[Measured, Measured],
    anchor: tuple[Measured, Measured],
    n_heldout: int,
    n_anchor: int,
) -> GateReport:
    (hs, hc), (as_, ac) = heldout, anchor

    def report(passed: bool, reason: str) -> GateReport:
        return GateReport(passed, reason, hs, hc, as_, ac, n_heldout, n_anchor)

    if n_heldout == 0 or math.isnan(hc.nll):
        return report(False, "no_heldout_data")
    if n_heldout < cfg.min_heldout:  # a promotion on 2 items was seen, and it was a bad one
        return report(False, "too_few_heldout")
    if not hc.nll <= hs.nll - cfg.min_nll_gain:
        return report(False, "heldout_nll_not_improved")
    if hc.agreement < hs.agreement:
        return report(False, "heldout_agreement_fell")
    if n_anchor:
        if ac.agreement < as_.agreement - cfg.anchor_max_agreement_drop:
            return report(False, "anchor_agreement_regressed")
        if ac.nll > as_.nll + cfg.anchor_max_nll_rise:
            return report(False, "anchor_nll_regressed")
    return report(True, "passed")
