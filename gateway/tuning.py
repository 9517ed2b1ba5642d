"""Threshold tuning for product teams: per-tenant policies with an audit trail, calibration and
learned-router refits, and what-if curves over logged traffic.

Policies live in a small SQLite file (`tuning.policy_db`): one row per tenant ("*" is the
default) and an append-only audit table (who, when, old, new). Refits read the signal store,
judge each student draft against the teacher's answer with the gate's metric, weight audits by
1/audit fraction, and replace the router's calibrator / learned model whole. A swap resets
target-rate controllers and refits, since a new student moves the confidence distribution.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distill_loop import METRICS, Registry, Sample, read_samples
from gateway.settings import Settings
from router import (
    ConfidenceRouter,
    FixedThreshold,
    Observation,
    Policy,
    TargetRate,
    curve,
    fit_calibrator,
    fit_learned_router,
    point,
    policy_from_json,
    quantile,
    threshold_for_quality,
)

log = logging.getLogger(__name__)
DEFAULT_TENANT = "*"


class PolicyBook:
    """Per-tenant escalation policies, owned by the event loop, persisted with an audit trail."""

    def __init__(self, path: Path, default_threshold: float) -> None:
        self.path = path
        self._policies: dict[str, Policy] = {DEFAULT_TENANT: FixedThreshold(default_threshold)}

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute("CREATE TABLE IF NOT EXISTS policy (tenant TEXT PRIMARY KEY, body TEXT NOT NULL)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS policy_audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,"
                " actor TEXT NOT NULL, tenant TEXT NOT NULL, old TEXT, new TEXT NOT NULL)"
            )
            rows = conn.execute("SELECT tenant, body FROM policy").fetchall()
        default = self._policies[DEFAULT_TENANT].current()
        for tenant, body in rows:
            self._policies[tenant] = policy_from_json(json.loads(body), initial=default)

    def policy(self, tenant: str) -> Policy:
        return self._policies.get(tenant) or self._policies[DEFAULT_TENANT]

    def threshold(self, tenant: str) -> float:
        return self.policy(tenant).current()

    def observe(self, tenant: str, confidence: float) -> None:
        self.policy(tenant).observe(confidence)

    def reset(self) -> None:
        for p in self._policies.values():
            p.reset()

    def all(self) -> dict[str, dict[str, Any]]:
        return {tenant: p.to_json() for tenant, p in self._policies.items()}

    def set(self, tenant: str, policy: Policy, actor: str) -> dict[str, Any] | None:
        """Apply a policy now and record who changed what. Returns the old policy's JSON."""
        old = self._policies.get(tenant)
        old_json = old.to_json() if old is not None else None
        new_json = policy.to_json()
        with contextlib.closing(sqlite3.connect(self.path)) as conn, conn:
            conn.execute("INSERT OR REPLACE INTO policy (tenant, body) VALUES (?, ?)", (tenant, json.dumps(new_json)))
            conn.execute(
                "INSERT INTO policy_audit (at, actor, tenant, old, new) VALUES (?, ?, ?, ?, ?)",
                (time.time(), actor, tenant, json.dumps(old_json) if old_json else None, json.dumps(new_json)),
            )
        self._policies[tenant] = policy
        return old_json

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        with contextlib.closing(sqlite3.connect(self.path)) as conn:
            rows = conn.execute(
                "SELECT seq, at, actor, tenant, old, new FROM policy_audit ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        return [
            {"seq": s, "at": at, "actor": a, "tenant": t, "old": json.loads(o) if o else None, "new": json.loads(n)}
            for s, at, a, t, o, n in rows
        ]


class Tuning:
    """Builds observations from the signal store, refits models, answers what-if questions."""

    def __init__(self, settings: Settings, router: ConfidenceRouter, policies: PolicyBook) -> None:
        self.settings = settings
        self.router = router
        self.policies = policies
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_refit: dict[str, Any] = {}

    # -- data ----------------------------------------------------------------------------------
    def samples(self, hours: float | None = None, version: str | None = None) -> list[Sample]:
        path = self.settings.signal.path
        if not path.exists():
            return []
        since = time.time() - hours * 3600 if hours else 0.0
        return [
            s
            for s in read_samples(path, since=since)
            if s.student is not None and s.confidence is not None and (version is None or s.student.version == version)
        ]

    def acceptable(self, s: Sample) -> bool:
        gate = self.settings.distill.gate
        assert s.student is not None
        return METRICS[gate.metric](s.student.text, s.teacher.text) >= gate.agree_at

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
        obs = self.observations(self.samples(hours))
        current = self.policies.threshold(tenant)
        return {
            "samples": len(obs),
            "current": point(obs, current).to_json() if obs else None,
            "policy": self.policies.policy(tenant).to_json(),
            "curve": [p.to_json() for p in curve(obs)] if obs else [],
        }

    def resolve(self, body: dict[str, Any], hours: float | None = None) -> tuple[Policy, dict[str, Any] | None]:
        """Turn an admin request into a policy, and predict its effect on logged traffic."""
        kind = body.get("kind")
        obs = self.observations(self.samples(hours))
        if kind == "fixed":
            policy: Policy = FixedThreshold(_unit(body.get("threshold"), "threshold"))
        elif kind == "target_rate":
            rate = _unit(body.get("rate"), "rate")
            policy = TargetRate(rate, window=int(body.get("window", 500)), initial=_weighted_quantile(obs, rate))
        elif kind == "target_quality":
            quality = _unit(body.get("quality"), "quality")
            best = threshold_for_quality(obs, quality)
            if best is None:
                raise ValueError(f"no threshold reaches quality {quality} (lower bound) on the logged traffic")
            policy = FixedThreshold(best.threshold)
        else:
            raise ValueError("kind must be fixed, target_rate or target_quality")
        predicted = point(obs, policy.current()).to_json() if obs else None
        return policy, predicted

    def timeline(self, hours: float | None = None, bucket_s: float = 3600.0) -> list[dict[str, Any]]:
        """Escalation rate and cost saved per time bucket and student version."""
        buckets: dict[tuple[float, str], list[Sample]] = defaultdict(list)
        for s in self.samples(hours):
            assert s.student is not None
            buckets[(s.created_at // bucket_s * bucket_s, s.student.version)].append(s)
        rows = []
        for (start, version), group in sorted(buckets.items()):
            obs = self.observations(group)
            total = sum(o.weight for o in obs)
            escalated = sum(self.weight(s) for s in group if s.kind == "escalation")
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
            self.router.calibrator = calibrator
            report["calibrator"] = calibrator.to_json()
            self._store_calibrator(version, calibrator.to_json())
        if self.settings.tuning.learned_router:
            prompts = [next((m.content for m in reversed(s.messages) if m.role == "user"), "") for s in samples]
            learned = fit_learned_router([s.features for s in samples], prompts, [not x for x in labels], weights)
            if learned is not None:
                self.router.learned = learned
            report["learned_router"] = learned is not None
        self.last_refit = report
        return report

    def _store_calibrator(self, version: str, data: dict[str, Any]) -> None:
        registry = Registry(self.settings.distill.registry_dir)
        folder = registry.root / "versions" / version
        if not folder.is_dir():  # "base", or a student without a registry: keep it beside the registry
            folder = registry.root / "calibration" / version
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "calibrator.json").write_text(json.dumps(data))

    async def on_swap(self, version: str) -> None:
        self.policies.reset()
        await asyncio.to_thread(self.refit, version)

    async def run(self, current_version: Any) -> None:
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

    def start(self, current_version: Any) -> None:
        if self.settings.tuning.calibrate or self.settings.tuning.learned_router:
            self._task = asyncio.create_task(self.run(current_version), name="tuning-refit")

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)


def _unit(value: Any, name: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in [0, 1]") from None
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {x}")
    return x


def _weighted_quantile(obs: Sequence[Observation], q: float) -> float:
    if not obs:
        return 0.35
    expanded = [o.confidence for o in obs for _ in range(max(1, round(o.weight)))]
    return quantile(expanded, q)
