"""The early decision: will the full draft escalate, judged on its first tokens?

A `PrefixScorer` predicts the full draft's confidence from a prefix of its token logprobs, as
a normal distribution in logit space (mean from a linear model over prefix features, spread
from its residuals at each prefix length: a short prefix foretells less than a long one, and
one spread for all lengths would make short prefixes too decisive and long ones too timid),
so P(the full-draft decision escalates | prefix) = P(confidence < threshold) holds for any
tenant's threshold. Before a version has a fitted one, a prior stands in: the full scorer
applied to the prefix, with a wide spread (`PRIOR_SIGMA`), so only clearly sure or clearly
unsure prefixes decide early. Fitted with scikit-learn on logged full drafts (records whose
draft ran to the end), serialised to JSON beside the version's calibrator, and evaluated in
plain Python (serving does not load numpy). What to do with a verdict (stream, escalate,
hedge) is the gateway's business, not this module's.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from router.confidence import logprob_features

Verdict = Literal["keep", "escalate", "undecided"]
PRIOR_SIGMA = 1.5  # logit units: the prior's spread, before any prefix scorer is fitted
_CLIP = 8.0  # confidences of exactly 0 or 1 map to ±8 in logit space
FEATURES = ("mean_logprob", "min_logprob", "p10_logprob", "p25_logprob", "p50_logprob")


def logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return max(-_CLIP, min(_CLIP, math.log(p / (1 - p))))


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


def prefix_features(logprobs: Sequence[float]) -> list[float]:
    """The prefix's logprob summary plus log(1 + its length); empty prefixes are not scored."""
    feats = logprob_features(logprobs)
    return [feats[k] for k in FEATURES] + [math.log1p(len(logprobs))]


@dataclass(frozen=True, slots=True)
class PrefixVerdict:
    verdict: Verdict
    p_escalate: float  # P(the full draft's confidence < threshold | this prefix)
    confidence: float  # the predicted full-draft confidence (median)
    tokens: int


@dataclass(frozen=True, slots=True)
class PrefixScorer:
    """`coef`/`intercept` over standardised `prefix_features` (`mean`, `scale`) give the mean
    logit of the full draft's confidence; `sigma` is the residual spread over all lengths and
    `sigmas` the spread at each fitted length (`lengths`), which a prefix of that length (or
    the longest fitted length below it) uses. An empty `coef` is the prior: the full scorer's
    confidence of the prefix itself, spread by `sigma`."""

    mean: tuple[float, ...] = ()
    scale: tuple[float, ...] = ()
    coef: tuple[float, ...] = ()
    intercept: float = 0.0
    sigma: float = PRIOR_SIGMA
    n: int = 0
    lengths: tuple[int, ...] = ()
    sigmas: tuple[float, ...] = ()

    def sigma_at(self, tokens: int) -> float:
        """The spread for a prefix of `tokens`: its length's, else the pooled one."""
        at = bisect.bisect_right(self.lengths, tokens) - 1
        return self.sigmas[at] if at >= 0 else self.sigma

    @property
    def fitted(self) -> bool:
        return bool(self.coef)

    def predict(self, logprobs: Sequence[float], prior_confidence: float) -> tuple[float, float]:
        """(mean logit, sigma) of the full draft's confidence given this prefix."""
        if not self.fitted:
            return logit(prior_confidence), self.sigma
        x = prefix_features(logprobs)
        z = self.intercept + sum(
            c * (v - m) / s for c, v, m, s in zip(self.coef, x, self.mean, self.scale, strict=True)
        )
        return z, self.sigma_at(len(logprobs))

    def judge(
        self, logprobs: Sequence[float], prior_confidence: float, threshold: float, *, decisive: float, final: bool
    ) -> PrefixVerdict:
        """Escalate when P(escalate) >= `decisive`, keep when <= 1 - `decisive`; `final`
        (the prefix reached `decide_after_tokens`) decides on which side of 1/2 it falls."""
        mu, sigma = self.predict(logprobs, prior_confidence)
        if threshold >= 1.0:
            p = 1.0
        elif threshold <= 0.0:
            p = 0.0
        else:
            p = _phi((logit(threshold) - mu) / max(sigma, 1e-6))
        if p >= decisive or (final and p >= 0.5):
            verdict: Verdict = "escalate"
        elif p <= 1.0 - decisive or final:
            verdict = "keep"
        else:
            verdict = "undecided"
        return PrefixVerdict(verdict, p, 1.0 / (1.0 + math.exp(-mu)), len(logprobs))

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": list(self.mean),
            "scale": list(self.scale),
            "coef": list(self.coef),
            "intercept": self.intercept,
            "sigma": self.sigma,
            "n": self.n,
            "lengths": list(self.lengths),
            "sigmas": list(self.sigmas),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PrefixScorer:
        return cls(
            tuple(map(float, data.get("mean", ()))),
            tuple(map(float, data.get("scale", ()))),
            tuple(map(float, data.get("coef", ()))),
            float(data.get("intercept", 0.0)),
            float(data.get("sigma", PRIOR_SIGMA)),
            int(data.get("n", 0)),
            tuple(map(int, data.get("lengths", ()))),  # scorers stored before these: pooled only
            tuple(map(float, data.get("sigmas", ()))),
        )


PRIOR = PrefixScorer()
MIN_DRAFTS = 30  # fewer full drafts than this: keep the scorer there is (or the prior)
# A length's spread is shrunk towards the pooled one as if the pooled one came from this many
# drafts: a length few drafts reach gets little say of its own.
SIGMA_PRIOR_DRAFTS = 10.0


def fit_prefix_scorer(
    drafts: Sequence[Sequence[float]],
    confidences: Sequence[float],
    weights: Sequence[float] | None = None,
    *,
    lengths: Sequence[int],
) -> PrefixScorer | None:
    """Fit on full drafts: each draft's token logprobs, its full-draft confidence (as routed),
    and its sampling weight. Every prefix length in `lengths` that a draft reaches gives one
    row, weighted so each draft counts once. None with too few drafts."""
    import numpy as np
    from sklearn.linear_model import Ridge

    rows: list[list[float]] = []
    targets: list[float] = []
    w: list[float] = []
    at: list[int] = []
    kept = 0
    for i, lps in enumerate(drafts):
        ks = [k for k in lengths if 0 < k <= len(lps)]
        if not ks:
            continue
        kept += 1
        base = 1.0 if weights is None else float(weights[i])
        for k in ks:
            rows.append(prefix_features(lps[:k]))
            targets.append(logit(confidences[i]))
            w.append(base / len(ks))
            at.append(k)
    if kept < MIN_DRAFTS:
        return None
    x, y, sw = np.asarray(rows), np.asarray(targets), np.asarray(w)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale == 0] = 1.0
    model = Ridge(alpha=1.0).fit((x - mean) / scale, y, sample_weight=sw)
    resid = y - model.predict((x - mean) / scale)
    pooled = float(np.average(resid**2, weights=sw))
    ks_at = np.asarray(at)
    fitted_lengths = sorted(set(at))
    sigmas = []
    for k in fitted_lengths:
        here = ks_at == k
        n_k = int(here.sum())  # drafts that reach this length (one row each)
        var_k = float(np.average(resid[here] ** 2, weights=sw[here]))
        shrunk = (n_k * var_k + SIGMA_PRIOR_DRAFTS * pooled) / (n_k + SIGMA_PRIOR_DRAFTS)
        sigmas.append(max(math.sqrt(shrunk), 0.05))
    return PrefixScorer(
        tuple(map(float, mean)),
        tuple(map(float, scale)),
        tuple(map(float, model.coef_)),
        float(model.intercept_),
        max(math.sqrt(pooled), 0.05),
        kept,
        tuple(fitted_lengths),
        tuple(sigmas),
    )
