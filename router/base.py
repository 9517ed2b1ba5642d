"""The student-or-teacher decision, and the protocols that make it pluggable.

Confidence is a number in [0, 1]; higher means trust the student. The gateway escalates to
the teacher exactly when `confidence < threshold` (and always at a threshold of 1). This is the
one place that rule is stated.
The router sees only the student's `Generation`; it knows nothing about HTTP or distillation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol, get_args, runtime_checkable

from models import Generation

if TYPE_CHECKING:
    from router.learned import LearnedRouter
    from router.prefix import PrefixVerdict

# What the confidence router decides on a draft.
Reason = Literal["confident", "low_confidence", "empty_answer"]
# Why a request was answered by the tier that answered it: the one set of reasons, used in the
# `x-tiergate-reason` header, the `tiergate` body object, metrics labels, records and docs.
#   confident            the draft's confidence met the threshold; the student answered
#   low_confidence       the draft's confidence fell below the threshold; escalated
#   prefix_confident     the draft's first tokens made a confident full draft near certain; streamed
#   prefix_unsure        the draft's first tokens made an escalating full draft near certain; escalated
#   empty_answer         the student produced no tokens; escalated
#   predicted_hard       the learned router rated the prompt hard; escalated without a draft
#   student_error        the student failed (unavailable, timeout, upstream error); escalated
#   forced               the client named a tier (`student` or `teacher`); no routing
#   teacher_unavailable  escalated, but the teacher failed; the student's draft was served
#   teacher_budget       escalated, but the key's teacher budget was spent; the student's draft was served
RouteReason = Literal[
    "confident",
    "low_confidence",
    "prefix_confident",
    "prefix_unsure",
    "empty_answer",
    "predicted_hard",
    "student_error",
    "forced",
    "teacher_unavailable",
    "teacher_busy",
    "teacher_budget",
]
ROUTE_REASONS: tuple[RouteReason, ...] = get_args(RouteReason)
EscalationReason = Literal["low_confidence", "prefix_unsure", "empty_answer", "predicted_hard", "student_error"]
# Which of the one decision path's three points decided a routed request (`x-tiergate-decided-by`):
# before generation (the learned router's prompt model), on a prefix of the draft, or on the whole draft.
DecidedBy = Literal["prompt", "prefix", "full_draft"]
ESCALATION_REASONS: tuple[EscalationReason, ...] = get_args(EscalationReason)


@dataclass(frozen=True, slots=True)
class Decision:
    escalate: bool
    confidence: float
    threshold: float
    reason: Reason
    scorer: str
    features: Mapping[str, float] = field(default_factory=dict)


def should_escalate(confidence: float, threshold: float) -> bool:
    """Below the threshold escalates; a threshold of 1 escalates everything, even a draft
    scored exactly 1.0 (a version whose floor is 1 answers nothing on its own)."""
    return confidence < threshold or threshold >= 1.0


@runtime_checkable
class ConfidenceScorer(Protocol):
    """Maps a student generation to features and a confidence in [0, 1]."""

    name: str

    def features(self, generation: Generation) -> dict[str, float]: ...

    def features_of(self, logprobs: Sequence[float]) -> dict[str, float]: ...

    def score(self, features: Mapping[str, float]) -> float: ...


@runtime_checkable
class Router(Protocol):
    @property
    def threshold(self) -> float: ...

    @property
    def learned(self) -> LearnedRouter | None:
        """A learned router, when one is fitted: it can rate a prompt hard before any draft."""

    def set_threshold(self, value: float) -> float:
        """Set the threshold; returns the previous one. Raises ValueError outside [0, 1]."""

    def decide(self, generation: Generation, threshold: float | None = None, prompt: str = "") -> Decision: ...

    def judge_prefix(self, logprobs: Sequence[float], threshold: float, *, final: bool) -> PrefixVerdict:
        """The early decision on a draft's first tokens (router/prefix.py)."""

    def judge_so_far(self, logprobs: Sequence[float], threshold: float) -> PrefixVerdict | None:
        """`judge_prefix` on the schedule a streamed draft is judged on: None while too short."""
