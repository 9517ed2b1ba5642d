"""Escalation policies: how the threshold for a request is chosen, per tenant.

- `FixedThreshold`: a number.
- `TargetRate`: a controller that holds the escalation rate on live traffic, by setting the
  threshold to the target quantile of recent confidences (escalate when below it). `reset()`
  after a student swap starts the window afresh, since swaps move the distribution.
- `TargetQuality`: a served-quality target. Its threshold is chosen offline (by what-if) as the
  lowest escalation rate whose estimated acceptable rate meets the target with a confidence
  bound; and each student version is routed at no less than its own floor for that target
  (`floor_curves`), instead of the floor fitted for `distill.quality_target`.

`PolicyBook` holds one policy per tenant ("*" is the default) and each student version's
routing floor, and answers the one question routing asks: `effective_threshold(tenant,
version)`. It persists policies in a small SQLite file with an append-only audit trail (who,
when, old, new: `router/audited.py`); writes run in a worker thread, never on the event loop.
Policies are small mutable objects owned by the gateway's event loop (no locks needed there).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from router.audited import AuditedTable, Where
from router.confidence import quantile
from router.replay import effective_threshold

DEFAULT_TENANT = "*"
# Where a routed request is decided: on a prefix of the draft, or on the whole draft
# (`router.decision` is the default; a policy may set its own).
DecisionMode = Literal["early", "full"]


@dataclass
class FixedThreshold:
    threshold: float
    kind: Literal["fixed"] = "fixed"
    decision: DecisionMode | None = None  # None: the gateway's `router.decision`

    def current(self) -> float:
        return self.threshold

    def observe(self, confidence: float) -> None:
        """Fixed: nothing to learn."""

    def reset(self) -> None:
        """Fixed: nothing to forget."""

    def to_json(self) -> dict[str, Any]:
        return _with_decision({"kind": self.kind, "threshold": self.threshold}, self.decision)


@dataclass
class TargetRate:
    """Hold P(confidence < threshold) at `rate` over the last `window` routed requests."""

    rate: float
    initial: float  # the threshold until `min_samples` confidences are seen (the caller's choice)
    window: int = 500
    min_samples: int = 20
    kind: Literal["target_rate"] = "target_rate"
    decision: DecisionMode | None = None  # None: the gateway's `router.decision`
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
        body = {"kind": self.kind, "rate": self.rate, "window": self.window, "threshold": self.current()}
        return _with_decision(body, self.decision)


@dataclass
class TargetQuality:
    """Serve at least `quality` agreement with the teacher: `threshold` from what-if on logged
    traffic, and each version's floor for this target (PolicyBook.floor_curves)."""

    quality: float
    threshold: float
    kind: Literal["target_quality"] = "target_quality"
    decision: DecisionMode | None = None  # None: the gateway's `router.decision`

    def current(self) -> float:
        return self.threshold

    def observe(self, confidence: float) -> None:
        """Chosen offline: nothing to learn per request."""

    def reset(self) -> None:
        """The per-version floors follow a swap; the threshold stays."""

    def to_json(self) -> dict[str, Any]:
        return _with_decision({"kind": self.kind, "quality": self.quality, "threshold": self.threshold}, self.decision)


Policy = FixedThreshold | TargetRate | TargetQuality


def _with_decision(body: dict[str, Any], decision: DecisionMode | None) -> dict[str, Any]:
    return body if decision is None else {**body, "decision": decision}


def policy_from_json(data: dict[str, Any], *, initial: float) -> Policy:
    kind = data.get("kind")
    decision = data.get("decision")
    if decision not in (None, "early", "full"):
        raise ValueError(f"unknown decision {decision!r}: early or full")
    if kind == "fixed":
        return FixedThreshold(float(data["threshold"]), decision=decision)
    if kind == "target_quality":
        return TargetQuality(float(data["quality"]), float(data["threshold"]), decision=decision)
    if kind == "target_rate":
        return TargetRate(float(data["rate"]), initial, window=int(data.get("window", 500)), decision=decision)
    raise ValueError(f"unknown policy kind {kind!r}")


class PolicyBook:
    """Per-tenant escalation policies and per-version routing floors, owned by the event loop."""

    def __init__(self, where: Where, default_threshold: float) -> None:
        """`where`: a SQLite file, or the shared database's URL (`signal.url`)."""
        self.where = where
        self._table = AuditedTable(where, "policy")
        self._policies: dict[str, Policy] = {DEFAULT_TENANT: FixedThreshold(default_threshold)}
        self._stamp = 0  # the table's stamp when last loaded
        # Per student version, the lowest threshold it may be routed with (the registry's routing
        # state); replaced whole at each swap, so a reader sees the old or the new map.
        self.floors: Mapping[str, float] = {}
        # Per version, its floor for another quality target (a tenant's TargetQuality policy).
        self.floor_curves: Mapping[str, Callable[[float], float]] = {}

    def open(self) -> None:
        """Create the table if needed and load the persisted policies (blocking: call in a thread)."""
        bodies, self._stamp = self._table.load()
        default = self._policies[DEFAULT_TENANT].current()
        for tenant, body in bodies.items():
            if tenant not in self._policies or self._policies[tenant].to_json() != body:
                self._policies[tenant] = policy_from_json(body, initial=default)

    def stale(self) -> bool:
        """Whether another process changed a policy since this book last loaded (blocking)."""
        return self._table.stamp() != self._stamp

    @classmethod
    def load(cls, where: Where, default_threshold: float) -> PolicyBook:
        """The persisted book, as another process (a trainer) sees it. Blocking."""
        book = cls(where, default_threshold)
        if book._table.exists():
            book.open()
        return book

    def policy(self, tenant: str) -> Policy:
        return self._policies.get(tenant) or self._policies[DEFAULT_TENANT]

    def threshold(self, tenant: str) -> float:
        """The tenant's policy threshold, before any version floor."""
        return self.policy(tenant).current()

    def decision(self, tenant: str, default: DecisionMode) -> DecisionMode:
        """Where the tenant's routed requests are decided: its policy's choice, else `default`."""
        return self.policy(tenant).decision or default

    def effective_threshold(self, tenant: str, version: str) -> float:
        """What a request of `tenant` answered by student `version` is routed with."""
        policy = self.policy(tenant)
        if policy.kind == "target_quality" and version in self.floor_curves:
            return effective_threshold(policy.threshold, self.floor_curves[version](policy.quality))
        return effective_threshold(policy.current(), self.floors.get(version))

    def observe(self, tenant: str, confidence: float) -> None:
        self.policy(tenant).observe(confidence)

    def reset(self) -> None:
        for p in self._policies.values():
            p.reset()

    def all(self) -> dict[str, dict[str, Any]]:
        return {tenant: p.to_json() for tenant, p in self._policies.items()}

    async def set(self, tenant: str, policy: Policy, actor: str) -> dict[str, Any] | None:
        """Persist a policy with who changed what (in a thread), then apply it. Returns the old
        policy's JSON."""
        old = self._policies.get(tenant)
        old_json = old.to_json() if old is not None else None
        await asyncio.to_thread(self._table.write, tenant, old_json, policy.to_json(), actor)
        self._policies[tenant] = policy
        return old_json

    def close(self) -> None:
        self._table.close()

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest audit rows first (blocking: call in a thread)."""
        return self._table.audit(limit)
