"""The student-or-teacher decision: confidence scorers and the threshold router."""

from __future__ import annotations

from router.audited import AuditedTable, Where, is_url
from router.base import (
    ESCALATION_REASONS,
    ROUTE_REASONS,
    ConfidenceScorer,
    DecidedBy,
    Decision,
    EscalationReason,
    Router,
    RouteReason,
    should_escalate,
)
from router.calibrate import IDENTITY, Calibrator, expected_calibration_error, fit_calibrator
from router.confidence import SCORERS, LogprobScorer, logprob_features, quantile
from router.config import RouterConfig
from router.errors import RouterError, UnknownScorer
from router.judge import Judge, JudgeSource
from router.learned import LearnedRouter, fit_learned_router
from router.policy import (
    DEFAULT_TENANT,
    FixedThreshold,
    Policy,
    PolicyBook,
    TargetQuality,
    TargetRate,
    policy_from_json,
)
from router.prefix import PRIOR, PrefixScorer, PrefixVerdict, fit_prefix_scorer, prefix_features
from router.replay import (
    Floor,
    Routed,
    effective_threshold,
    fit_threshold,
    quality_floor,
    route_at,
    served_bound,
    served_ranks,
    simulate,
    z_for,
)
from router.threshold import ConfidenceRouter, check_threshold
from router.whatif import CurvePoint, Observation, curve, point, threshold_for_quality

__all__ = [
    "PRIOR",
    "PrefixScorer",
    "PrefixVerdict",
    "fit_prefix_scorer",
    "prefix_features",
    "DecidedBy",
    "AuditedTable",
    "Where",
    "is_url",
    "ESCALATION_REASONS",
    "ROUTE_REASONS",
    "EscalationReason",
    "RouteReason",
    "DEFAULT_TENANT",
    "Judge",
    "JudgeSource",
    "PolicyBook",
    "Floor",
    "Routed",
    "TargetQuality",
    "quality_floor",
    "served_bound",
    "served_ranks",
    "z_for",
    "effective_threshold",
    "fit_threshold",
    "route_at",
    "simulate",
    "IDENTITY",
    "SCORERS",
    "Calibrator",
    "CurvePoint",
    "FixedThreshold",
    "LearnedRouter",
    "Observation",
    "Policy",
    "TargetRate",
    "curve",
    "expected_calibration_error",
    "fit_calibrator",
    "fit_learned_router",
    "point",
    "policy_from_json",
    "threshold_for_quality",
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
