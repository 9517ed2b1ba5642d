"""Routing replay: the gateway's rule applied to drafts after the fact.

The gateway (live requests), the distillation gate (held-out drafts of a serving and a
candidate student) and what-if (logged traffic) all route through the functions here, so the
rule `confidence < threshold` (router/base.py) and the version floor `max(threshold, floor)`
are applied the same way everywhere. Pure arithmetic over confidences and agreement scores:
measuring agreement is the caller's job, and nothing here knows about HTTP or training.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from router.base import should_escalate


def effective_threshold(threshold: float, floor: float | None) -> float:
    """The threshold a request is routed with: the tenant's, raised to the serving version's
    routing floor where it has one (set at promotion, see `fit_threshold`)."""
    return threshold if floor is None else max(threshold, floor)


@dataclass(frozen=True, slots=True)
class Routed:
    """One student's drafts routed as the gateway would route them live.

    A kept draft is served as is; an escalated one is replaced by the teacher's answer, which
    agrees with itself. A more confident student that keeps wrong answers thus scores lower
    here even when its own answers improved: the failure the stream benchmark showed.
    """

    served_quality: float  # mean agreement with the teacher of what would be served
    escalation_rate: float
    n: int


def simulate(kept: Sequence[bool], scores: Sequence[float]) -> Routed:
    """`kept[i]`: the router serves item i's draft; `scores[i]`: that draft's agreement."""
    if not kept:
        return Routed(math.nan, math.nan, 0)
    served = [score if keep else 1.0 for keep, score in zip(kept, scores, strict=True)]
    return Routed(sum(served) / len(served), 1 - sum(kept) / len(kept), len(kept))


def route_at(threshold: float, confidences: Sequence[float], scores: Sequence[float]) -> Routed:
    """The drafts routed at `threshold`: each kept unless it should escalate."""
    return simulate([not should_escalate(c, threshold) for c in confidences], scores)


def fit_threshold(
    confidences: Sequence[float], scores: Sequence[float], floor: float, target: float
) -> tuple[float, Routed]:
    """The lowest threshold, not below `floor`, at which the routed quality reaches `target`.

    Re-fitting the threshold per version is what keeps a promoted student's higher confidence
    from buying escalations with quality: the candidate is held to the serving student's
    served quality and gains only where it is confidently right. `inf` (escalate everything)
    always reaches the target, since the teacher then answers all.
    """
    for t in sorted({floor, *(c for c in confidences if c > floor)}):
        routed = route_at(t, confidences, scores)
        if routed.served_quality >= target:
            return t, routed
    return math.inf, route_at(math.inf, confidences, scores)
