"""What-if: escalation rate, served quality and cost at every threshold, from logged outcomes.

Each observation is one logged request with its confidence, whether the student's own answer
was acceptable, its costs, and a weight that undoes the logging's selection: escalations are
all logged (weight 1) but confident requests only through the audit slice (weight 1/audit
fraction), so the weighted sample stands for all traffic. At threshold t, requests that
escalate (router/base.py's rule) are served by the teacher (counted acceptable: it is the
reference), the rest by the student. Pure arithmetic over the observations; building them is the caller's job.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from router.base import should_escalate


@dataclass(frozen=True, slots=True)
class Observation:
    confidence: float
    acceptable: bool  # the student's answer, judged against the teacher's
    weight: float
    student_cost: float  # the student's draft, paid on every request
    teacher_cost: float  # paid when escalated


@dataclass(frozen=True, slots=True)
class CurvePoint:
    threshold: float
    escalation_rate: float
    quality: float  # estimated share of acceptable served answers
    quality_lower: float  # one-sided Wilson lower bound at the chosen z
    cost_per_request: float
    cost_vs_teacher: float  # cost relative to sending everything to the teacher

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def wilson_lower(p: float, n_eff: float, z: float) -> float:
    if n_eff <= 0:
        return 0.0
    denom = 1 + z * z / n_eff
    centre = p + z * z / (2 * n_eff)
    margin = z * math.sqrt(max(0.0, p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff)))
    return max(0.0, (centre - margin) / denom)


def point(obs: Sequence[Observation], threshold: float, z: float = 1.645) -> CurvePoint:
    total = sum(o.weight for o in obs)
    if total <= 0:
        return CurvePoint(threshold, math.nan, math.nan, math.nan, math.nan, math.nan)
    up = [should_escalate(o.confidence, threshold) for o in obs]
    escalated = sum(o.weight for o, e in zip(obs, up, strict=True) if e)
    good = escalated + sum(o.weight for o, e in zip(obs, up, strict=True) if not e and o.acceptable)
    cost = sum(o.weight * (o.student_cost + (o.teacher_cost if e else 0.0)) for o, e in zip(obs, up, strict=True))
    teacher_only = sum(o.weight * o.teacher_cost for o in obs)
    n_eff = total * total / sum(o.weight * o.weight for o in obs)
    quality = good / total
    return CurvePoint(
        threshold=threshold,
        escalation_rate=escalated / total,
        quality=quality,
        quality_lower=wilson_lower(quality, n_eff, z),
        cost_per_request=cost / total,
        cost_vs_teacher=cost / teacher_only if teacher_only > 0 else math.nan,
    )


def curve(obs: Sequence[Observation], thresholds: Sequence[float] | None = None, z: float = 1.645) -> list[CurvePoint]:
    grid = thresholds if thresholds is not None else [i / 50 for i in range(51)]
    return [point(obs, t, z) for t in grid]


def threshold_for_quality(obs: Sequence[Observation], target: float, z: float = 1.645) -> CurvePoint | None:
    """The lowest-escalation point whose quality lower bound meets `target`, or None."""
    candidates = sorted({0.0, 1.0 + 1e-9, *(o.confidence for o in obs), *(o.confidence + 1e-9 for o in obs)})
    best: CurvePoint | None = None
    for t in candidates:
        p = point(obs, t, z)
        if p.quality_lower >= target and (best is None or p.escalation_rate < best.escalation_rate):
            best = p
    return best
