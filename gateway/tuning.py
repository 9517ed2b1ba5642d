"""Threshold tuning for product teams: calibration and learned-router refits, each version's
routing state, and what-if curves over logged traffic.

Policies and their audit trail are router/'s `PolicyBook`. Refits read the signal store, judge
each student draft against the teacher's answer with the gate's metric, weight audits by their
sampling weight, and replace the router's calibrator / learned model whole. The calibrator is
saved as the version's routing state in the registry, and the serving version's routing state
(calibrator, and every version's floor) is applied at start-up and at each swap. A swap also
resets target-rate controllers and refits, since a new student moves the confidence distribution.
Active labels join calibration refits (chosen near the threshold, where calibration matters) but
not what-if curves: those stand for all traffic, and a label was chosen, not drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from distill_loop import BASE, Registry, RoutingState, Sample, open_registry, read_samples, signal_db
from gateway.settings import Settings
from router import (
    DEFAULT_TENANT,
    ConfidenceRouter,
    FixedThreshold,
    Floor,
    Observation,
    Policy,
    PolicyBook,
    TargetQuality,
    TargetRate,
    curve,
    fit_calibrator,
    fit_learned_router,
    fit_prefix_scorer,
    point,
    quantile,
    threshold_for_quality,
    z_for,
)

log = logging.getLogger(__name__)


class Tuning:
    """Builds observations from the signal store, refits models, answers what-if questions."""

    def __init__(self, settings: Settings, router: ConfidenceRouter, policies: PolicyBook) -> None:
        self.settings = settings
        self.router = router
        self.policies = policies
        self._registry: Registry | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_refit: dict[str, Any] = {}

    # -- data ----------------------------------------------------------------------------------
    def samples(
        self, hours: float | None = None, version: str | None = None, *, population: bool = False
    ) -> list[Sample]:
        """Records with a student draft and its confidence. `population`: only those that stand
        for served traffic by their sampling weights (escalations and audits, not labels)."""
        db = signal_db(self.settings.signal)
        if not db.exists():
            return []
        since = time.time() - hours * 3600 if hours else 0.0
        return [
            s
            for s in read_samples(db, since=since)
            if s.student is not None
            and s.confidence is not None
            and (version is None or s.student.version == version)
            and not (population and s.kind == "label")
        ]

    def acceptable(self, s: Sample) -> bool:
        assert s.student is not None
        return self.settings.distill.gate.agrees(s.student.text, s.teacher.text)

    def weight(self, s: Sample) -> float:
        """How many requests `s` stands for: the weight stored when it was sampled. Only records
        written before the store kept it fall back to this process's `signal.audit_fraction`."""
        if s.sampling_weight is not None:
            return s.sampling_weight
        fraction = self.settings.signal.audit_fraction
        return 1.0 / fraction if s.kind == "audit" and fraction > 0 else 1.0

    def observations(self, samples: Sequence[Sample]) -> list[Observation]:
        pricing = self.settings.pricing
        out = []
        for s in samples:
            assert s.student is not None and s.confidence is not None
            out.append(
                Observation(
                    confidence=s.confidence,
                    acceptable=self.acceptable(s),
                    weight=self.weight(s),
                    student_cost=pricing.student.cost(s.student.usage.prompt_tokens, s.student.usage.completion_tokens),
                    teacher_cost=pricing.teacher.cost(s.teacher.usage.prompt_tokens, s.teacher.usage.completion_tokens),
                )
            )
        return out

    # -- what-if -------------------------------------------------------------------------------
    def whatif(self, hours: float | None = None, tenant: str = DEFAULT_TENANT) -> dict[str, Any]:
        samples = self.samples(hours, population=True)
        obs = self.observations(samples)
        current = self.policies.threshold(tenant)
        return {
            "samples": len(obs),
            "current": point(obs, current).to_json() if obs else None,
            "policy": self.policies.policy(tenant).to_json(),
            "curve": [p.to_json() for p in curve(obs)] if obs else [],
            "early": self._early_whatif(samples, obs, current),
        }

    @staticmethod
    def _early_whatif(samples: Sequence[Sample], obs: Sequence[Observation], current: float) -> dict[str, Any]:
        """The early-decision policy beside the full-draft one, on the records that hold both
        decisions (kept drafts and the audited slice of prefix escalations, weighted as drawn):
        at a threshold t a prefix escalates when its predicted confidence is below t, and a kept
        draft is served whole, so its quality is the whole draft's. `agreement` is how often
        the two decisions agree at the current threshold."""
        pairs = [
            (dataclasses.replace(o, confidence=s.features["prefix_confidence"]), o)
            for s, o in zip(samples, obs, strict=True)
            if "prefix_confidence" in s.features and s.features.get("full_draft") == 1.0
        ]
        if not pairs:
            return {"samples": 0, "agreement": None, "current": None, "curve": []}
        early = [e for e, _ in pairs]
        total = sum(o.weight for _, o in pairs)
        agree = sum(o.weight for e, o in pairs if (e.confidence < current) == (o.confidence < current))
        return {
            "samples": len(pairs),
            "agreement": agree / total if total else None,
            "current": point(early, current).to_json(),
            "curve": [p.to_json() for p in curve(early)],
        }

    def resolve(self, body: dict[str, Any], hours: float | None = None) -> tuple[Policy, dict[str, Any] | None]:
        """Turn an admin request into a policy, and predict its effect on logged traffic."""
        kind = body.get("kind")
        decision = body.get("decision")
        obs = self.observations(self.samples(hours, population=True))
        if kind == "fixed":
            policy: Policy = FixedThreshold(_unit(body.get("threshold"), "threshold"))
        elif kind == "target_rate":
            rate = _unit(body.get("rate"), "rate")
            # With no logged traffic yet, start where the default policy routes now.
            start = _weighted_quantile(obs, rate) if obs else self.policies.threshold(DEFAULT_TENANT)
            policy = TargetRate(rate, window=int(body.get("window", 500)), initial=start)
        elif kind == "target_quality":
            quality = _unit(body.get("quality"), "quality")
            best = threshold_for_quality(obs, quality)
            if best is None:
                raise ValueError(f"no threshold reaches quality {quality} (lower bound) on the logged traffic")
            policy = TargetQuality(quality, best.threshold)
        else:
            raise ValueError("kind must be fixed, target_rate or target_quality")
        if decision is not None:
            policy = dataclasses.replace(policy, decision=decision)
        predicted = point(obs, policy.current()).to_json() if obs else None
        return policy, predicted

    def timeline(self, hours: float | None = None, bucket_s: float = 3600.0) -> list[dict[str, Any]]:
        """Escalation rate and cost saved per time bucket and student version."""
        buckets: dict[tuple[float, str], list[Sample]] = defaultdict(list)
        for s in self.samples(hours, population=True):
            assert s.student is not None
            buckets[(s.created_at // bucket_s * bucket_s, s.student.version)].append(s)
        rows = []
        for (start, version), group in sorted(buckets.items()):
            obs = self.observations(group)
            total = sum(o.weight for o in obs)
            # A cache hit escalated, but its teacher answer was paid for by the request it was first asked for.
            escalated = sum(self.weight(s) for s in group if s.kind in ("escalation", "cache_hit"))
            cost = sum(o.weight * (o.student_cost + (o.teacher_cost if s.kind == "escalation" else 0.0))
                       for o, s in zip(obs, group, strict=True))  # fmt: skip
            teacher_only = sum(o.weight * o.teacher_cost for o in obs)
            rows.append(
                {
                    "start": start,
                    "version": version,
                    "requests": total,
                    "escalation_rate": escalated / total if total else None,
                    "cost_saved": 1 - cost / teacher_only if teacher_only else None,
                }
            )
        return rows

    # -- refits --------------------------------------------------------------------------------
    def refit(self, version: str) -> dict[str, Any]:
        samples = self.samples(self.settings.tuning.window_hours, version=version)
        labels = [self.acceptable(s) for s in samples]
        weights = [self.weight(s) for s in samples]
        report: dict[str, Any] = {"version": version, "samples": len(samples), "at": time.time()}
        if self.settings.tuning.calibrate:
            raw = [float(s.features.get("raw_confidence", s.confidence or 0.0)) for s in samples]
            calibrator = fit_calibrator(raw, labels, weights)
            state = self.registry.routing_state(version)
            if calibrator.method == "identity" and state.calibrator.method != "identity":
                calibrator = state.calibrator  # too little live traffic yet: keep the one fitted at promotion
            self.router.calibrator = calibrator
            report["calibrator"] = calibrator.to_json()
            new = dataclasses.replace(state, calibrator=calibrator)
            floor = new.floor_for(self.settings.distill.quality_target, z_for(self.settings.distill.quality_confidence))
            if floor is not None and self.settings.distill.quality_target > 0:
                # The floor is a threshold in the calibrated confidence: refit it with the calibrator.
                new = dataclasses.replace(new, floor=max(floor.threshold, state.floor or 0.0))
            self.registry.save_routing_state(version, new)
        if self.settings.tuning.learned_router:
            prompts = [next((m.content for m in reversed(s.messages) if m.role == "user"), "") for s in samples]
            learned = fit_learned_router([s.features for s in samples], prompts, [not x for x in labels], weights)
            if learned is not None:
                self.router.learned = learned
            report["learned_router"] = learned is not None
        if self.settings.tuning.prefix:
            report["prefix"] = self._refit_prefix(version, samples)
        self.last_refit = report
        return report

    def _refit_prefix(self, version: str, samples: Sequence[Sample]) -> dict[str, Any] | None:
        """Fit the version's prefix scorer on its full drafts (a draft an early decision cut
        short says nothing about where a whole one ends), against their confidence under the
        calibrator routing now. Saved in the version's routing state; None with too few drafts."""
        full = [
            s for s in samples if s.features.get("full_draft", 1.0) and s.student is not None and s.student.logprobs
        ]
        calibrator = self.router.calibrator
        cfg = self.settings.router
        scorer = fit_prefix_scorer(
            [[t.logprob for t in s.student.logprobs] for s in full if s.student is not None],
            [calibrator(float(s.features.get("raw_confidence", s.confidence or 0.0))) for s in full],
            [self.weight(s) for s in full],
            lengths=range(cfg.min_prefix_tokens, cfg.decide_after_tokens + 1),
        )
        if scorer is None:
            return None
        self.router.prefix = scorer
        state = self.registry.routing_state(version)
        self.registry.save_routing_state(version, dataclasses.replace(state, prefix=scorer))
        return scorer.to_json()

    @property
    def registry(self) -> Registry:
        """Where versions' routing state lives (opened on first use: a gateway that never
        refits or swaps never creates the folder)."""
        if self._registry is None:
            self._registry = open_registry(self.settings.distill, self.settings.signal)
        return self._registry

    def routing_states(self) -> dict[str, RoutingState]:
        """Every kept version's routing state, base included (blocking)."""
        registry = self.registry
        return {name: registry.routing_state(name) for name in (BASE, *registry.versions())}

    async def on_serving(self, version: str, swapped: bool) -> None:
        """Route `version` by its routing state: every version's floor, and its calibrator.
        After a swap (not at start-up), reset target-rate policies and refit."""
        states = await asyncio.to_thread(self.routing_states)  # one read of each version's state
        self.policies.floors = {name: st.floor for name, st in states.items() if st.floor is not None}
        z = z_for(self.settings.distill.quality_confidence)
        self.policies.floor_curves = {name: _floor_curve(st, z) for name, st in states.items() if st.evidence}
        if self.settings.tuning.calibrate:
            self.router.calibrator = states.get(version, RoutingState()).calibrator
        self.router.prefix = states.get(version, RoutingState()).prefix
        if swapped:
            self.policies.reset()
            await asyncio.to_thread(self.refit, version)

    async def run(self, current_version: Callable[[], str]) -> None:
        """Refit on a schedule (`tuning.refit_s`) until stopped."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=self.settings.tuning.refit_s)
            if self._stop.is_set():
                return
            try:
                await asyncio.to_thread(self.refit, current_version())
            except Exception:  # noqa: BLE001 - a failed refit keeps the current models
                log.exception("tuning refit failed")

    def start(self, current_version: Callable[[], str]) -> None:
        if self.settings.tuning.calibrate or self.settings.tuning.learned_router or self.settings.tuning.prefix:
            self._task = asyncio.create_task(self.run(current_version), name="tuning-refit")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _floor_curve(state: RoutingState, z: float) -> Callable[[float], float]:
    """Target -> the version's floor for it, computed once per target (tenants share a few)."""
    return functools.lru_cache(maxsize=16)(lambda target: _threshold(state.floor_for(target, z)))


def _threshold(floor: Floor | None) -> float:
    return 1.0 if floor is None else floor.threshold


def _unit(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1]") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def _weighted_quantile(obs: Sequence[Observation], q: float) -> float:
    expanded = [o.confidence for o in obs for _ in range(max(1, round(o.weight)))]
    return quantile(expanded, q)
