"""A learned router: a scikit-learn classifier of P(the request needs the teacher).

Two models share one training set of logged outcomes: a full model over confidence features
plus prompt features (after the student drafted), and a prompt-only model usable before
generation, so prompts it rates hard skip the student. Samples are weighted to undo the
selection between escalations (all logged) and audits (a random slice of confident traffic).
Immutable once fitted: a refit builds a new object that replaces the old one. numpy and
scikit-learn load on first use, so a gateway without a learned router never loads them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FEATURES = ("mean_logprob", "min_logprob", "p10_logprob", "p25_logprob", "n_tokens")
_DIGIT = re.compile(r"\d")


def prompt_features(prompt: str) -> list[float]:
    words = prompt.split()
    return [
        float(len(prompt)),
        float(len(words)),
        float(len(_DIGIT.findall(prompt))),
        float(prompt.count("?")),
        float(sum(len(w) for w in words) / max(1, len(words))),
    ]


def confidence_features(features: Mapping[str, float]) -> list[float]:
    return [float(features.get(k, 0.0)) for k in FEATURES]


@dataclass(frozen=True)
class LearnedRouter:
    full: Any  # sklearn pipeline over confidence + prompt features
    prompt_only: Any
    n: int

    def p_escalate(self, features: Mapping[str, float], prompt: str) -> float:
        import numpy as np

        x = np.array([confidence_features(features) + prompt_features(prompt)])
        return float(self.full.predict_proba(x)[0, 1])

    def p_hard_prompt(self, prompt: str) -> float:
        import numpy as np

        return float(self.prompt_only.predict_proba(np.array([prompt_features(prompt)]))[0, 1])


def fit_learned_router(
    features: Sequence[Mapping[str, float]],
    prompts: Sequence[str],
    needs_teacher: Sequence[bool],
    weights: Sequence[float],
) -> LearnedRouter | None:
    """Fit on logged outcomes; None when there is too little or one-class data."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(needs_teacher, dtype=bool)
    if len(y) < 10 or y.all() or not y.any():
        return None
    w = np.asarray(weights, dtype=float)
    xp = np.array([prompt_features(p) for p in prompts])
    xf = np.hstack([np.array([confidence_features(f) for f in features]), xp])
    full = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        xf, y, logisticregression__sample_weight=w
    )
    prompt_only = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(
        xp, y, logisticregression__sample_weight=w
    )
    return LearnedRouter(full, prompt_only, len(y))
