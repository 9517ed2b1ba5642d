"""The student-or-teacher decision, and the protocols that make it pluggable.

Confidence is a number in [0, 1]; higher means trust the student. The gateway escalates to
the teacher exactly when `confidence < threshold`. This is the one place that rule is stated.
The router sees only the student's `Generation`; it knows nothing about HTTP or distillation.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from models import Generation

Reason = Literal["confident", "low_confidence", "empty_answer"]


@dataclass(frozen=True, slots=True)
class Decision:
    escalate: bool
    confidence: float
    threshold: float
    reason: Reason
    scorer: str
    features: Mapping[str, float] = field(default_factory=dict)


def should_escalate(confidence: float, threshold: float) -> bool:
    return confidence < threshold


@runtime_checkable
class ConfidenceScorer(Protocol):
    """Maps a student generation to features and a confidence in [0, 1]."""

    name: str

    def features(self, generation: Generation) -> dict[str, float]: ...

    def score(self, features: Mapping[str, float]) -> float: ...


@runtime_checkable
class Router(Protocol):
    @property
    def threshold(self) -> float: ...

    def set_threshold(self, value: float) -> float:
        """Set the threshold; returns the previous one. Raises ValueError outside [0, 1]."""

    def decide(self, generation: Generation, threshold: float | None = None, prompt: str = "") -> Decision: ...
