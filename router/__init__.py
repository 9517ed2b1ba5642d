"""The student-or-teacher decision: confidence scorers and the threshold router."""

from __future__ import annotations

from router.base import ConfidenceScorer, Decision, Router, should_escalate
from router.confidence import SCORERS, LogprobScorer, logprob_features, quantile
from router.config import RouterConfig
from router.errors import RouterError, UnknownScorer
from router.threshold import ConfidenceRouter, check_threshold

__all__ = [
    "SCORERS",
    "ConfidenceRouter",
    "ConfidenceScorer",
    "Decision",
    "LogprobScorer",
    "Router",
    "RouterConfig",
    "RouterError",
    "UnknownScorer",
    "check_threshold",
    "logprob_features",
    "quantile",
    "should_escalate",
]
