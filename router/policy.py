"""Escalation policies: how the threshold for a request is chosen, per tenant.

- `FixedThreshold`: a number.
- `TargetRate`: a controller that holds the escalation rate on live traffic, by setting the
  threshold to the target quantile of recent confidences (escalate when below it). `reset()`
  after a student swap starts the window afresh, since swaps move the distribution.
- `TargetQuality`: chosen offline (by what-if) as the lowest escalation rate whose estimated
  acceptable rate meets the target with a confidence bound; it then acts as a fixed threshold.

Policies are small mutable objects owned by the gateway's event loop (no locks needed there).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from router.confidence import quantile


@dataclass
class FixedThreshold:
    threshold: float
    kind: Literal["fixed"] = "fixed"

    def current(self) -> float:
        return self.threshold

    def observe(self, confidence: float) -> None:
        """Fixed: nothing to learn."""

    def reset(self) -> None:
        """Fixed: nothing to forget."""

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "threshold": self.threshold}


@dataclass
class TargetRate:
    """Hold P(confidence < threshold) at `rate` over the last `window` routed requests."""

    rate: float
    window: int = 500
    initial: float = 0.35
    min_samples: int = 20
    kind: Literal["target_rate"] = "target_rate"
    _recent: deque[float] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"target rate must be in [0, 1], got {self.rate}")
        self._recent = deque(maxlen=self.window)

    def current(self) -> float:
        if len(self._recent) < self.min_samples:
            return self.initial
        if self.rate <= 0.0:
            return 0.0
        if self.rate >= 1.0:
            return 1.0
        # Escalate strictly below the threshold: the rate-quantile of recent confidences.
        return quantile(list(self._recent), self.rate)

    def observe(self, confidence: float) -> None:
        self._recent.append(confidence)

    def reset(self) -> None:
        """A new student: its confidences follow a new distribution. Keep the last threshold."""
        self.initial = self.current()
        self._recent.clear()

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "rate": self.rate, "window": self.window, "threshold": self.current()}


Policy = FixedThreshold | TargetRate


def policy_from_json(data: dict[str, Any], *, initial: float) -> Policy:
    kind = data.get("kind")
    if kind == "fixed":
        return FixedThreshold(float(data["threshold"]))
    if kind == "target_rate":
        return TargetRate(float(data["rate"]), window=int(data.get("window", 500)), initial=initial)
    raise ValueError(f"unknown policy kind {kind!r}")
