"""Confidence features and scorers computed from the student's own token logprobs.

Pure functions over floats: no model, no I/O. Learned and calibrated scorers (a later issue)
implement the same `ConfidenceScorer` protocol and register in `SCORERS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from models import Generation
from router.config import RouterConfig


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default method), without numpy."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def logprob_features(logprobs: Sequence[float]) -> dict[str, float]:
    """Summary features of per-token logprobs. An empty answer has n_tokens == 0 and no others."""
    n = len(logprobs)
    if n == 0:
        return {"n_tokens": 0.0}
    return {
        "n_tokens": float(n),
        "mean_logprob": sum(logprobs) / n,
        "min_logprob": min(logprobs),
        "p10_logprob": quantile(logprobs, 0.10),
        "p25_logprob": quantile(logprobs, 0.25),
        "p50_logprob": quantile(logprobs, 0.50),
    }


class LogprobScorer:
    """confidence = exp(w_mean·mean + w_q·quantile), clipped to [0, 1].

    The geometric-mean token probability tells how sure the student was overall; a low
    quantile catches the few tokens it guessed (a wrong fact is often one unsure token).
    A low quantile rather than the minimum keeps long answers from being punished for one
    rare token simply because they have more tokens (length-awareness). An empty answer
    scores 0.
    """

    name = "logprob_v1"

    def __init__(self, config: RouterConfig) -> None:
        self._w_mean = config.mean_weight
        self._w_q = 1.0 - config.mean_weight
        self._qkey = f"p{round(config.quantile * 100):02d}_logprob"
        self._q = config.quantile

    def features(self, generation: Generation) -> dict[str, float]:
        return self.features_of([t.logprob for t in generation.logprobs])

    def features_of(self, lps: Sequence[float]) -> dict[str, float]:
        """`features` of a bare logprob sequence (a draft's prefix, while it is generated)."""
        feats = logprob_features(lps)
        if lps and self._qkey not in feats:
            feats[self._qkey] = quantile(lps, self._q)
        return feats

    def score(self, features: Mapping[str, float]) -> float:
        if features.get("n_tokens", 0.0) == 0.0:
            return 0.0
        z = self._w_mean * features["mean_logprob"] + self._w_q * features[self._qkey]
        return min(1.0, max(0.0, math.exp(min(0.0, z))))


SCORERS: dict[str, Callable[[RouterConfig], LogprobScorer]] = {LogprobScorer.name: LogprobScorer}
