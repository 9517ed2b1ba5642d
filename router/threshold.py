"""The confidence router: score the student's answer, compare with the live threshold.

The threshold can change at runtime (admin API); a float assignment is atomic, so a request
sees either the old or the new value, never a mix. Per-tenant policies are a later issue.
"""

from __future__ import annotations

from collections.abc import Sequence

from models import Generation
from router.base import ConfidenceScorer, Decision, should_escalate
from router.calibrate import IDENTITY, Calibrator
from router.confidence import SCORERS
from router.config import RouterConfig
from router.errors import UnknownScorer
from router.learned import LearnedRouter
from router.prefix import PRIOR, PrefixScorer, PrefixVerdict


def check_threshold(value: float) -> float:
    if not 0.0 <= value <= 1.0 or value != value:  # value != value catches NaN
        raise ValueError(f"threshold must be in [0, 1], got {value}")
    return float(value)


_DEFAULT = RouterConfig()


class ConfidenceRouter:
    def __init__(
        self,
        scorer: ConfidenceScorer,
        threshold: float,
        *,
        decisive: float = _DEFAULT.decisive,
        min_prefix_tokens: int = _DEFAULT.min_prefix_tokens,
        decide_after_tokens: int = _DEFAULT.decide_after_tokens,
    ) -> None:
        self.scorer = scorer
        self._threshold = check_threshold(threshold)
        self.calibrator: Calibrator = IDENTITY  # replaced whole on refit, never mutated
        self.learned: LearnedRouter | None = None
        self.prefix: PrefixScorer = PRIOR  # the serving version's, replaced whole at each swap or refit
        self.decisive = decisive
        self.min_prefix_tokens, self.decide_after_tokens = min_prefix_tokens, decide_after_tokens

    @classmethod
    def from_config(cls, config: RouterConfig) -> ConfidenceRouter:
        try:
            factory = SCORERS[config.scorer]
        except KeyError:
            raise UnknownScorer(f"unknown scorer {config.scorer!r}; known: {', '.join(SCORERS)}") from None
        return cls(
            factory(config),
            config.threshold,
            decisive=config.decisive,
            min_prefix_tokens=config.min_prefix_tokens,
            decide_after_tokens=config.decide_after_tokens,
        )

    @property
    def threshold(self) -> float:
        return self._threshold

    def set_threshold(self, value: float) -> float:
        old, self._threshold = self._threshold, check_threshold(value)
        return old

    def decide(self, generation: Generation, threshold: float | None = None, prompt: str = "") -> Decision:
        """Score a draft. `threshold` overrides the default (per-tenant policies).

        With a learned router, confidence is 1 − P(needs the teacher); otherwise the scorer's
        value, mapped through the calibrator (identity until one is fitted). The raw score is
        kept in `features["raw_confidence"]` for refits.
        """
        threshold = self._threshold if threshold is None else threshold
        features = self.scorer.features(generation)
        raw = self.scorer.score(features)
        learned, calibrator = self.learned, self.calibrator  # read once: one decision, one model
        if learned is not None and features.get("n_tokens", 0.0) > 0:
            confidence = 1.0 - learned.p_escalate(features, prompt)
        else:
            confidence = calibrator(raw) if features.get("n_tokens", 0.0) > 0 else 0.0
        features["raw_confidence"] = raw
        if features.get("n_tokens", 0.0) == 0.0:
            reason = "empty_answer"
        elif should_escalate(confidence, threshold):
            reason = "low_confidence"
        else:
            reason = "confident"
        return Decision(
            escalate=should_escalate(confidence, threshold),
            confidence=confidence,
            threshold=threshold,
            reason=reason,  # type: ignore[arg-type]
            scorer=self.scorer.name if learned is None else "learned",
            features=features,
        )

    def judge_prefix(self, logprobs: Sequence[float], threshold: float, *, final: bool) -> PrefixVerdict:
        """Judge a draft's first tokens: would the whole draft escalate at `threshold`?
        Before a prefix scorer is fitted, the prior reads the prefix as a (calibrated) draft."""
        prefix, calibrator = self.prefix, self.calibrator  # read once: one verdict, one model
        prior = 0.0 if prefix.fitted else calibrator(self.scorer.score(self.scorer.features_of(logprobs)))
        return prefix.judge(logprobs, prior, threshold, decisive=self.decisive, final=final)

    def judge_so_far(self, logprobs: Sequence[float], threshold: float) -> PrefixVerdict | None:
        """The early decision's schedule, on a draft that arrives a token at a time: no verdict
        before `router.min_prefix_tokens` tokens, then `judge_prefix`, forced once the draft
        has `decide_after_tokens`. (A draft that ends first is decided whole, by `decide`.)"""
        if len(logprobs) < self.min_prefix_tokens:
            return None
        return self.judge_prefix(logprobs, threshold, final=len(logprobs) >= self.decide_after_tokens)
