"""Calibration: map raw confidence to P(student answer acceptable), with scikit-learn.

Platt scaling (logistic regression on the raw score) below `isotonic_min` labels, isotonic
regression above, as is usual for small vs large label sets. A fitted calibrator is an
immutable value that serialises to JSON (no pickles), so it can be stored beside the student
version it was fitted for and swapped in whole. Labels come from the caller; nothing here
reads records or judges answers.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

ISOTONIC_MIN = 1000


@dataclass(frozen=True, slots=True)
class Calibrator:
    method: Literal["platt", "isotonic", "identity"]
    n: int
    # platt: (coef, intercept); isotonic: x thresholds and y values (interpolated, clipped)
    params: tuple[tuple[float, ...], tuple[float, ...]]

    def __call__(self, confidence: float) -> float:
        if self.method == "identity":
            return confidence
        if self.method == "platt":
            (coef,), (intercept,) = self.params
            return 1.0 / (1.0 + math.exp(-(coef * confidence + intercept)))
        xs, ys = self.params
        return _interp(confidence, xs, ys)

    def to_json(self) -> dict[str, Any]:
        return {"method": self.method, "n": self.n, "params": [list(self.params[0]), list(self.params[1])]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibrator:
        a, b = data["params"]
        return cls(data["method"], int(data["n"]), (tuple(a), tuple(b)))


IDENTITY = Calibrator("identity", 0, ((), ()))


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    """numpy.interp for one point, in plain Python: serving a calibrator must not load numpy
    (a remote-only gateway stays small); only fitting does."""
    if x <= xs[0]:
        return float(ys[0])
    if x >= xs[-1]:
        return float(ys[-1])
    i = bisect_right(xs, x)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return float(y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def fit_calibrator(
    confidences: Sequence[float],
    acceptable: Sequence[bool],
    weights: Sequence[float] | None = None,
    *,
    isotonic_min: int = ISOTONIC_MIN,
) -> Calibrator:
    """Fit P(acceptable | confidence). `weights` correct for sampling (e.g. 1/audit fraction)."""
    import numpy as np
    from sklearn.isotonic import IsotonicRegression
    from sklearn.linear_model import LogisticRegression

    x = np.asarray(confidences, dtype=float)
    y = np.asarray(acceptable, dtype=bool)
    w = None if weights is None else np.asarray(weights, dtype=float)
    if len(x) < 2 or y.all() or not y.any():
        return IDENTITY  # nothing to learn from one class
    if len(x) < isotonic_min:
        model = LogisticRegression().fit(x.reshape(-1, 1), y, sample_weight=w)  # default C=1: small label sets overfit
        return Calibrator("platt", len(x), ((float(model.coef_[0][0]),), (float(model.intercept_[0]),)))
    iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0).fit(x, y.astype(float), sample_weight=w)
    return Calibrator("isotonic", len(x), (tuple(map(float, iso.X_thresholds_)), tuple(map(float, iso.y_thresholds_))))


def expected_calibration_error(probs: Sequence[float], labels: Sequence[bool], bins: int = 10) -> float:
    """ECE: the label-weighted gap between predicted and observed acceptance, over equal-width bins."""
    import numpy as np

    p = np.asarray(probs, dtype=float)
    y = np.asarray(labels, dtype=float)
    if len(p) == 0:
        return float("nan")
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() / len(p) * abs(p[mask].mean() - y[mask].mean())
    return float(total)
