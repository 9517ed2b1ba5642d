"""The background distillation loop: trigger, assemble data, train, gate, register, roll back.

A run starts after `trigger_records` new records or once records have waited
`max_staleness_s`; runs never overlap, and a run without enough held-out items for the gate is
skipped before training. A passing candidate becomes a new immutable registry
version and CURRENT moves to it (the gateway's publisher then hot-swaps). The loop also
watches live audits and rolls back when the new version's agreement with the teacher falls
below the previous version's by `rollback_margin`. It runs inside the gateway or alone
(`python -m distill_loop run`); the same code either way. It never serves requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import math
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill_loop.buffer import Example, build_run_data
from distill_loop.config import DistillConfig
from distill_loop.db import SignalDB, signal_db
from distill_loop.gate import GateReport, Measured, Paired, decide, sign_test
from distill_loop.lease import FileLease, TrainerLease, trainer_lease
from distill_loop.loss import LossWeights, dynamic_weights
from distill_loop.metrics import METRICS
from distill_loop.registry import Registry, RoutingState, VersionMeta, open_registry
from distill_loop.settings import training_student
from distill_loop.store import pending_since, read_samples, set_critique
from models import (
    Backend,
    BackendConfig,
    BackendError,
    ChatMessage,
    SamplingParams,
    resolve_model_dir,
)
from router import (
    IDENTITY,
    Calibrator,
    Floor,
    JudgeSource,
    Observation,
    Routed,
    effective_threshold,
    fit_calibrator,
    fit_threshold,
    point,
    quality_floor,
    route_at,
    served_ranks,
    threshold_for_quality,
    z_for,
)

if TYPE_CHECKING:
    from distill_loop.settings import SharedSettings
    from distill_loop.trainer import EvalResult

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]
Transform = Callable[[Sequence[Example]], Sequence[Example]]
CRITIQUE_PROMPT = (
    "A customer asked: {question}\nA junior agent answered: {draft}\nThe correct answer is: {answer}\n"
    "In one or two sentences, say what was wrong in the junior agent's answer and why."
)


def _gate_line(gate: GateReport) -> str:
    parts = []
    if gate.paired is not None:
        p = gate.paired
        parts.append(f"items better/worse {p.wins}/{p.losses} (sign test p={p.p_value:.3f})")
    if gate.routed_serving is None or gate.routed_candidate is None:
        parts.append("routing not replayed")
    else:
        rs, rc = gate.routed_serving, gate.routed_candidate
        parts.append(
            f"routed: served agreement {rs.served_quality:.3f} -> {rc.served_quality:.3f}, "
            f"escalation {rs.escalation_rate:.2f} -> {rc.escalation_rate:.2f} (n={rs.n})"
        )
    return "; ".join(parts)


@dataclass(frozen=True, slots=True)
class Replay:
    """The gate's routing replay: both students routed, the candidate's threshold, and (with a
    quality target) both floors and the routing state the candidate is promoted with."""

    routed: tuple[Routed, Routed] | None = None
    threshold: float | None = None
    configured: float | None = None
    floors: tuple[Floor, Floor] | None = None
    state: RoutingState | None = None
    # With a quality target: per item, which cascade serves better (`router.served_ranks`).
    served: Paired | None = None


def release_memory() -> None:
    """Hand the heap a training run freed back to the OS.

    A run allocates gigabytes (a float32 student, optimizer state, [B, T, V] logits) in a worker
    thread; glibc keeps what is freed in that thread's arena. Measured on the bundled student,
    three 12-step runs in a row left the process at 1.8-3.4 GB instead of 0.4 GB, and the stream
    benchmark's gateway grew from 1.8 to 10.5 GB over two runs; with a collection and
    `malloc_trim` after each, it went back to 0.46 GB every time. Other C libraries lack the
    call, and then this only collects."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class RunCancelled(Exception):
    """The run was abandoned because the process is shutting down."""


@dataclass
class LoopState:
    last_cut: float = 0.0  # records up to here have been offered to a run
    last_run_at: float = 0.0
    runs: int = 0

    @classmethod
    def load(cls, path: Path) -> LoopState:
        return cls(**json.loads(path.read_text())) if path.exists() else cls()

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.__dict__))
        tmp.replace(path)


@dataclass(frozen=True)
class RunOutcome:
    result: str  # promoted | rejected | skipped
    reason: str
    version: str | None = None
    gate: GateReport | None = None
    train: dict[str, Any] = field(default_factory=dict)


class DistillLoop:
    def __init__(
        self,
        config: DistillConfig,
        signal: SignalDB | Path,
        student: BackendConfig,
        *,
        cache_dir: Path | None = None,
        listener: Listener | None = None,
        critic: Backend | None = None,
        judging: JudgeSource | None = None,
        lease: TrainerLease | None = None,
        registry: Registry | None = None,
    ) -> None:
        """`signal`: the signal database (or a SQLite file's path). `judging`: how the gate
        replays the gateway's routing (None: it does not). `lease`: shared with the other loops
        on this store (default: a lock file in the registry folder)."""
        self.config = config
        self.signal = signal_db(signal)
        self.student = student
        self.cache_dir = cache_dir
        self.registry = registry or Registry(config.registry_dir, keep=config.keep_versions)
        self._state_path = config.registry_dir / "loop_state.json"
        self.state = LoopState.load(self._state_path)
        self.lease = lease or FileLease.in_registry(config.registry_dir)
        self._emit = listener or (lambda _e, _d: None)
        self.critic = critic
        self.judging = judging
        self._running = asyncio.Lock()
        self._cancel = threading.Event()

    @classmethod
    def from_settings(
        cls, settings: SharedSettings, *, listener: Listener | None = None, critic: Backend | None = None
    ) -> DistillLoop | None:
        """The loop for these settings, built the same way inside the gateway and in
        `python -m distill_loop run`; None when the student cannot be trained here."""
        student = training_student(settings.student, settings.distill)
        if student is None:
            return None
        return cls(
            settings.distill,
            signal_db(settings.signal),
            student,
            cache_dir=settings.runtime.cache_dir,
            listener=listener,
            critic=critic,
            judging=settings.judge_source(),
            lease=trainer_lease(settings.signal, settings.distill.registry_dir),
            registry=open_registry(settings.distill, settings.signal),
        )

    def cancel(self) -> None:
        """Abandon a run in progress at its next training step (shutdown)."""
        self._cancel.set()

    # -- triggers ----------------------------------------------------------------------------
    def pending(self) -> int:
        return self._pending()[0]

    def _pending(self) -> tuple[int, float | None]:
        if not self.signal.exists():
            return 0, None
        return pending_since(self.signal, self.state.last_cut)

    def due(self, now: float | None = None) -> bool:
        """Enough new records, or the oldest new record has waited `max_staleness_s`."""
        now = time.time() if now is None else now
        pending, oldest = self._pending()
        if pending >= self.config.trigger_records:
            return True
        return oldest is not None and now - oldest >= self.config.max_staleness_s

    async def run_forever(self, stop: asyncio.Event) -> None:
        """Check triggers and the rollback rule every `poll_s` until `stop` is set; act only
        while holding the trainer lease (another loop on this store may hold it)."""
        while not stop.is_set():
            try:
                self._emit("pending", {"records": self.pending()})
                with self.lease.held() as mine:
                    if mine:
                        await asyncio.to_thread(self.check_quality)
                        await asyncio.to_thread(self.check_rollback)
                        await self.arun_once(if_due=True)
            except RunCancelled:
                return
            except Exception:  # noqa: BLE001 - a failed run must not end the loop or the gateway
                log.exception("distillation run failed")
                self._emit("run", {"result": "failed", "reason": "error"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self.config.poll_s)

    async def arun_once(self, transform: Transform | None = None, *, if_due: bool = False) -> RunOutcome:
        """One run, never overlapping another here or in another process (the trainer lease):
        critiques first (async), then training in a thread. `if_due`: only if still due once
        the lease is held (another trainer may have taken these records meanwhile)."""
        async with self._running:
            with self.lease.held() as mine:
                if not mine:
                    return RunOutcome("skipped", "another_trainer")
                # Another loop may have run since this one last looked: its cut is the truth.
                self.state = LoopState.load(self._state_path)
                if if_due and not self.due():
                    return RunOutcome("skipped", "not_due")
                return await self._run_leased(transform)

    async def _run_leased(self, transform: Transform | None) -> RunOutcome:
        if self.config.losses.critique and self.critic is not None:
            await self.enrich_critiques()
        try:
            return await asyncio.to_thread(self.run_once, transform)
        finally:
            await asyncio.to_thread(release_memory)

    # -- one run -----------------------------------------------------------------------------
    def run_once(self, transform: Transform | None = None) -> RunOutcome:
        """Train, gate and maybe promote one candidate. `transform` rewrites the training
        examples (ablations, fault injection in tests); production runs pass None."""
        import torch

        from distill_loop.trainer import StudentTrainer

        torch.set_num_threads(self.config.torch_threads)
        until = time.time()
        data = build_run_data(self.signal, self.config, self.state.last_cut, until, seed=self.state.runs)
        self.state.last_run_at = until
        self._data_dropped(data.window)
        from_records = sum(e.kind != "anchor" for e in data.train)  # the anchor set is always there
        skip = None if from_records else "no_training_data"
        if skip is None and len(data.heldout) < self.config.gate.min_heldout:
            # The gate would refuse any candidate: do not spend a training run to learn that.
            # The records stay in the store, for replay and for later runs' held-out sets.
            skip = "too_few_heldout"
        if skip is not None:
            self.state.last_cut = until
            self.state.save(self._state_path)
            log.info("distillation run skipped: %s (%d train, %d held-out)", skip, from_records, len(data.heldout))
            return self._done(RunOutcome("skipped", skip))
        serving = self.registry.current()
        trainer = StudentTrainer(
            resolve_model_dir(self.student.model, self.cache_dir),
            self.registry.adapter_dir(serving),
            self.student,
            self.config,
        )
        log.info("distillation run on %d examples (%s), serving %s", len(data.train), data.window, serving)
        h_serving = trainer.evaluate("serving", data.heldout)
        self._floor_unmeasured(serving, h_serving)
        weights = self._weights(h_serving.agreement if data.heldout else None)
        examples = transform(data.train) if transform else data.train

        def progress(step: int, total: int, loss: float) -> None:
            if self._cancel.is_set():
                raise RunCancelled("distillation run abandoned at shutdown")
            if step == 1 or step == total or step % 10 == 0:
                log.info("distill step %d/%d loss %.4f", step, total, loss)
            self._emit("step", {"step": step, "total": total, "loss": loss})

        report = trainer.train(examples, weights, progress)
        h_cand = trainer.evaluate("candidate", data.heldout)
        a_serving = trainer.evaluate("serving", data.anchor)
        a_cand = trainer.evaluate("candidate", data.anchor)
        replay = self._replay_routing(serving, h_serving, h_cand)
        routed, fitted, configured = replay.routed, replay.threshold, replay.configured
        sources: dict[str, int] = {}
        for e in data.heldout:
            sources[e.source] = sources.get(e.source, 0) + 1
        gate = decide(
            self.config.gate,
            (Measured(h_serving.nll, h_serving.agreement), Measured(h_cand.nll, h_cand.agreement)),
            (Measured(a_serving.nll, a_serving.agreement), Measured(a_cand.nll, a_cand.agreement)),
            len(data.heldout),
            len(data.anchor),
            routed,
            fitted,
            configured,
            sign_test(h_serving.scores, h_cand.scores) if h_cand.scores else None,
            sources=sources,
            floors=replay.floors,
            quality_target=self.config.quality_target or None,
            served=replay.served,
        )
        train_info = {
            "steps": report.steps,
            "examples": report.examples,
            "kd_examples": report.kd_examples,
            "first_loss": report.first_loss,
            "last_loss": report.last_loss,
            "seconds": round(report.seconds, 2),
            "weights": dataclasses.asdict(report.weights),
        }
        self._emit("trained", {"examples": report.examples, "loss": report.last_loss})
        self.state.last_cut = until
        self.state.runs += 1
        self.state.save(self._state_path)
        if not gate.passed:
            log.warning(
                "candidate rejected by the gate: %s (held-out NLL %.3f -> %.3f, agreement %.3f -> %.3f, n=%d; "
                "anchor agreement %.3f -> %.3f; %s)",
                gate.reason, h_serving.nll, h_cand.nll, h_serving.agreement, h_cand.agreement, len(data.heldout),
                a_serving.agreement, a_cand.agreement, _gate_line(gate),
            )  # fmt: skip
            return self._done(RunOutcome("rejected", gate.reason, gate=gate, train=train_info))
        name = self.registry.new_name()
        with tempfile.TemporaryDirectory() as tmp:
            adapter = trainer.save_candidate(Path(tmp))
            self.registry.add(
                name,
                adapter,
                VersionMeta(
                    name=name,
                    parent=serving,
                    created_at=time.time(),
                    data_window=dict(data.window),
                    gate=gate.to_json(),
                    base_model=self.student.model,
                ),
            )
        if replay.state is not None:  # saved first: the version is routed at its floor from its first request
            self.registry.save_routing_state(name, replay.state)
        self.registry.set_current(name, "promoted")
        log.info("promoted %s (held-out NLL %.3f -> %.3f; %s)", name, h_serving.nll, h_cand.nll, _gate_line(gate))
        return self._done(RunOutcome("promoted", "passed", version=name, gate=gate, train=train_info))

    def _data_dropped(self, window: dict[str, float | int]) -> None:
        """Log and report what the run's data left out against poisoning: near-duplicates (each
        counted once, in the run where it is new) and what the tenant cap dropped."""
        near, capped = int(window["near_duplicates_new"]), int(window["tenant_capped_train"])
        capped_heldout = int(window["tenant_capped_heldout"])
        if near or capped or capped_heldout:
            log.info(
                "run data: %d new near-duplicate records collapsed (%d in all); tenant cap (%.2f, %d tenants) "
                "dropped %d training records and %d held-out items",
                near, window["near_duplicates"], self.config.max_tenant_share, window["tenants"], capped,
                capped_heldout,
            )  # fmt: skip
        self._emit("data", {"near_duplicate": near, "tenant_cap": capped + capped_heldout})

    def _replay_routing(self, serving: str, h_serving: EvalResult, h_cand: EvalResult) -> Replay:
        """The gateway's routing on the held-out drafts.

        With a quality target: the candidate's calibrator is refitted on its own held-out drafts
        (when routing is calibrated), then each student's floor is fitted on the same items and
        each is routed at max(configured threshold, its floor). Without one: the serving student
        at its threshold (raised to its own floor), the candidate at the lowest threshold, not
        below the configured one, that keeps the serving student's served quality.
        """
        if self.judging is None or not h_serving.drafts:
            return Replay()
        state = self.registry.routing_state(serving)
        judge = self.judging.judge(state.calibrator)
        s_conf = [judge(d)[0] for d in h_serving.drafts]
        configured = judge.threshold
        target = self.config.quality_target
        if target > 0:
            s_agree = [x >= self.config.gate.agree_at for x in h_serving.scores]
            fs = quality_floor(s_conf, s_agree, target, z_for(self.config.quality_confidence))
            fc, new_state = self._fit_floor(h_cand)
            c_conf = [new_state.calibrator(c) for c, _ in new_state.evidence]
            c_agree = [a for _, a in new_state.evidence]
            at_s, at_c = effective_threshold(configured, fs.threshold), effective_threshold(configured, fc.threshold)
            rs, rc = route_at(at_s, s_conf, h_serving.scores), route_at(at_c, c_conf, h_cand.scores)
            served = sign_test(served_ranks(at_s, s_conf, s_agree), served_ranks(at_c, c_conf, c_agree))
            return Replay((rs, rc), fc.threshold, configured, (fs, fc), new_state, served)
        judge_c = self.judging.judge(state.calibrator)
        c_conf = [judge_c(d)[0] for d in h_cand.drafts]
        rs = route_at(effective_threshold(configured, state.floor), s_conf, h_serving.scores)
        keep = rs.served_quality - self.config.gate.max_served_quality_drop
        fitted, rc = fit_threshold(c_conf, h_cand.scores, configured, keep)
        return Replay((rs, rc), fitted if math.isfinite(fitted) else None, configured)

    def _fit_floor(self, h: EvalResult) -> tuple[Floor, RoutingState]:
        """A student's quality-target floor on its held-out drafts, and the routing state it is
        served with: its calibrator refitted on those drafts (when routing is calibrated) before
        the floor, which is a threshold in calibrated confidence, is fitted."""
        assert self.judging is not None
        agree = [x >= self.config.gate.agree_at for x in h.scores]
        raw_judge = self.judging.judge(IDENTITY)
        raw = [raw_judge(d)[0] for d in h.drafts]
        calibrator: Calibrator = IDENTITY
        if self.judging.calibrated:
            calibrator = fit_calibrator(raw, agree)  # per version, before its floor
        floor = quality_floor(
            [calibrator(c) for c in raw], agree, self.config.quality_target, z_for(self.config.quality_confidence)
        )
        return floor, RoutingState(
            floor=floor.threshold, calibrator=calibrator, evidence=tuple(zip(raw, agree, strict=True))
        )

    def _floor_unmeasured(self, serving: str, h_serving: EvalResult) -> None:
        """Give the serving version a floor if it has never been measured against the quality
        target: the base model (a promoted version got its floor at its gate). The first gated
        run's held-out drafts are that measurement. Without it the base serves at the configured
        threshold, whatever its answers are worth: on the stream benchmark the base student kept
        half the traffic and none of its kept answers held a key fact."""
        if self.config.quality_target <= 0 or self.judging is None or not h_serving.drafts:
            return
        state = self.registry.routing_state(serving)
        if state.evidence:
            return
        floor, fitted = self._fit_floor(h_serving)
        new = dataclasses.replace(fitted, floor=max(fitted.floor or 0.0, state.floor or 0.0))
        self.registry.save_routing_state(serving, new)
        log.info(
            "serving %s had no quality-target floor: %.3f on %d held-out items (served agreement %.3f, bound %.3f)",
            serving, new.floor, floor.n, floor.quality, floor.quality_lower,
        )  # fmt: skip
        self._emit("floor", {"version": serving, "floor": new.floor, "quality": floor.quality})

    def _weights(self, agreement: float | None) -> LossWeights:
        ls = self.config.losses
        early, late = LossWeights(*ls.early), LossWeights(*ls.late)
        if not ls.dynamic_weights:
            return early
        return dynamic_weights(agreement, low=ls.agreement_low, high=ls.agreement_high, base=early, late=late)

    def _done(self, outcome: RunOutcome) -> RunOutcome:
        self._emit(
            "run",
            {
                "result": outcome.result,
                "reason": outcome.reason,
                "version": outcome.version,
                "examples": outcome.train.get("examples", 0),
                "loss": outcome.train.get("last_loss"),
            },
        )
        return outcome

    # -- critiques (d) -----------------------------------------------------------------------
    async def enrich_critiques(self, limit: int = 16) -> int:
        """Ask the teacher, in the background, why rejected drafts were wrong; store the answer."""
        assert self.critic is not None
        todo = [
            s
            for s in read_samples(self.signal, since=self.state.last_cut, kind="escalation")
            if s.critique is None
            and s.student is not None
            and s.features.get("full_draft", 1.0)  # an early decision cut this draft short: nothing to critique
            and not self.config.gate.agrees(s.student.text, s.teacher.text)
        ][:limit]
        done = 0
        for s in todo:
            assert s.student is not None
            question = next((m.content for m in reversed(s.messages) if m.role == "user"), "")
            prompt = CRITIQUE_PROMPT.format(question=question, draft=s.student.text, answer=s.teacher.text)
            try:
                gen = await self.critic.generate(
                    (ChatMessage("user", prompt),), SamplingParams(max_tokens=64, temperature=0)
                )
            except BackendError as exc:
                log.warning("critique for %s failed: %s", s.id, exc)
                continue
            if gen.text.strip():
                await asyncio.to_thread(set_critique, self.signal, s.id, gen.text.strip())
                done += 1
        return done

    # -- rollback ----------------------------------------------------------------------------
    def audit_agreement(self, version: str) -> tuple[float, int]:
        """Live agreement of a version's served drafts with the teacher, from audit records."""
        metric = METRICS[self.config.gate.metric]
        scores = [
            metric(s.student.text, s.teacher.text)
            for s in read_samples(self.signal, kind="audit")
            if s.student is not None and s.student.version == version
        ]
        return (sum(scores) / len(scores), len(scores)) if scores else (float("nan"), 0)

    def check_quality(self) -> str | None:
        """Hold the serving version to the quality target on its live traffic.

        Its escalations (all logged) and audits (each standing for 1/audit fraction of its
        confident requests) estimate the served agreement at its current floor, as what-if
        does. Once `rollback_min_samples` audits show it below the target, the floor rises to
        the lowest threshold whose lower bound meets the target; if none below 1 does, the
        version rolls back to the previous one (or, with none, answers nothing on its own).
        Active labels are not a random sample and are left out. Returns what was done.
        """
        target = self.config.quality_target
        if target <= 0 or not self.signal.exists() or self.judging is None:
            return None
        current = self.registry.current()
        obs, audits = [], 0
        # Its records are written after it began serving: read only those, not the whole store.
        since = next((float(h["time"]) for h in reversed(self.registry.history()) if h["to"] == current), 0.0)
        for s in read_samples(self.signal, since=since):
            if s.kind == "label" or s.student is None or s.confidence is None or s.student.version != current:
                continue
            audits += s.kind == "audit"
            weight = s.sampling_weight if s.sampling_weight is not None else 1.0
            ok = self.config.gate.agrees(s.student.text, s.teacher.text)
            obs.append(Observation(s.confidence, ok, weight, 0.0, 0.0))
        if audits < self.config.rollback_min_samples:
            return None
        state = self.registry.routing_state(current)
        configured = self.judging.judge(state.calibrator).threshold
        serving_at = effective_threshold(configured, state.floor)
        now = point(obs, serving_at)
        if now.quality >= target:
            return None
        z = z_for(self.config.quality_confidence)
        better = threshold_for_quality(obs, target, z)
        # A floor above every confidence seen answers nothing on this traffic: that is not enough.
        if better is not None and better.escalation_rate < 1.0 and serving_at < better.threshold < 1.0:
            floor = better.threshold
            self.registry.save_routing_state(current, dataclasses.replace(state, floor=floor))
            log.warning(
                "live audits put %s at agreement %.3f < target %.2f (%d audits): floor %.3f -> %.3f",
                current, now.quality, target, audits, serving_at, floor,
            )  # fmt: skip
            self._emit("floor", {"version": current, "floor": floor, "quality": now.quality})
            return "floor_raised"
        previous = self.registry.previous()
        if previous is not None and previous != current:
            self.registry.set_current(previous, f"auto_rollback: audited agreement {now.quality:.3f} < target {target}")
            log.warning("auto-rollback %s -> %s: no floor below 1 meets the target", current, previous)
            self._emit("rollback", {"from": current, "to": previous, "trigger": "quality_target"})
            return "rolled_back"
        if state.floor is None or state.floor < 1.0:
            self.registry.save_routing_state(current, dataclasses.replace(state, floor=1.0))
            log.warning("live audits put %s below the target at every threshold: it answers nothing alone", current)
            self._emit("floor", {"version": current, "floor": 1.0, "quality": now.quality})
            return "floor_raised"
        return None

    def check_rollback(self) -> str | None:
        """Roll back when the current version's live agreement fell below the previous one's."""
        if not self.signal.exists():
            return None
        current, previous = self.registry.current(), self.registry.previous()
        if previous is None or previous == current:
            return None
        cur, n_cur = self.audit_agreement(current)
        prev, n_prev = self.audit_agreement(previous)
        need = self.config.rollback_min_samples
        if n_cur < need or n_prev < need or cur >= prev - self.config.rollback_margin:
            return None
        self.registry.set_current(previous, f"auto_rollback: audit agreement {cur:.3f} < {prev:.3f}")
        log.warning("auto-rollback %s -> %s (agreement %.3f vs %.3f)", current, previous, cur, prev)
        self._emit("rollback", {"from": current, "to": previous, "trigger": "auto"})
        return previous
