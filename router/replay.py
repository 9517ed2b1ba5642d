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
from statistics import NormalDist

from router.base import should_escalate
from router.whatif import wilson_lower


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


@dataclass(frozen=True, slots=True)
class Floor:
    """A version's quality-target floor and what it rests on.

    `threshold` is the lowest threshold at which the lower confidence bound of the served
    agreement meets the target; 1.0 means no threshold below 1 does, and the version answers
    nothing on its own. `quality` and `quality_lower` are the estimate and its bound there.
    """

    threshold: float
    quality: float
    quality_lower: float
    escalation_rate: float
    n: int

    def to_json(self) -> dict[str, float | int]:
        return {
            "threshold": self.threshold,
            "quality": self.quality,
            "quality_lower": self.quality_lower,
            "escalation_rate": self.escalation_rate,
            "n": self.n,
        }


def z_for(confidence: float) -> float:
    """The one-sided normal quantile for a lower bound held with `confidence` (0.8 -> 0.84)."""
    return NormalDist().inv_cdf(confidence)


def served_bound(threshold: float, confidences: Sequence[float], agree: Sequence[bool], z: float) -> Floor:
    """Served agreement at `threshold` and its lower bound.

    An escalated item is served by the teacher, which agrees with itself: it is certain. Only
    the items the student keeps are uncertain, so the bound is the escalated share plus the
    kept share times the Wilson lower bound of the kept items' agreement. (A bound over all
    items at once would charge the teacher's answers for sampling noise they do not have.)
    """
    n = len(confidences)
    if n == 0:
        return Floor(threshold, math.nan, 0.0, math.nan, 0)
    kept = [a for c, a in zip(confidences, agree, strict=True) if not should_escalate(c, threshold)]
    m, good = len(kept), sum(kept)
    escalated = n - m
    quality = (escalated + good) / n
    lower = (escalated + (m * wilson_lower(good / m, m, z) if m else 0.0)) / n
    return Floor(threshold, quality, lower, escalated / n, n)


def served_ranks(threshold: float, confidences: Sequence[float], agree: Sequence[bool]) -> list[int]:
    """What a client is served for each item at `threshold`, ranked quality first, then cost:
    2 = the student's answer, and it agrees with the teacher's (right and cheap); 1 = the
    teacher's answer (right, at the teacher's cost); 0 = the student's answer, and it does not
    agree (wrong). Two cascades compared item by item on these ranks show which serves better."""
    return [1 if should_escalate(c, threshold) else 2 * a for c, a in zip(confidences, agree, strict=True)]


def quality_floor(confidences: Sequence[float], agree: Sequence[bool], target: float, z: float) -> Floor:
    """The lowest threshold whose served-agreement lower bound meets `target` (see `served_bound`).

    Candidates are 0 and each item's confidence (the points where routing changes), then 1.0,
    which escalates everything and so always meets it. Few items widen the bound, so the floor
    rises with thin evidence and falls as evidence accumulates, never on a guess. With no
    items at all there is nothing to rest on, and the floor is 1.0.
    """
    if not confidences:
        return Floor(1.0, 1.0, 1.0, 1.0, 0)
    for t in sorted({0.0, *(c for c in confidences if c < 1.0)}):
        bound = served_bound(t, confidences, agree, z)
        if bound.quality_lower >= target:
            return bound
    return served_bound(1.0, confidences, agree, z)
