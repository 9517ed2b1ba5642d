"""The tiered request flow: draft with the student, score, escalate or keep, audit, record.

Everything here is transport-free: it takes a parsed `ChatCall` and returns a `Route` plus a
`Generation` or a stream of deltas; `routes.py` turns those into HTTP. Every backend call goes
through its tier's guard (`guard.py`: admission, deadline, retries, breaker). A failing, busy or
open-circuit teacher degrades to the student's draft at once, and so does a key whose teacher
budget is spent (`limits.py` decides; here the refused call becomes a degraded answer). A failing
student escalates, but an overloaded one is shed (503), so overload never turns into teacher
traffic. A failing signal store never fails a request. Which confident answers get an active
label is `labels.py`'s choice; asking the teacher and recording is here.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from distill_loop import Redactor, Sample, SignalStore, StoreClosed
from gateway.errors import TeacherBudgetExceeded, TierCircuitOpen, TierOverloaded
from gateway.guard import BreakerState, Lease, LogThrottle, TierGuard
from gateway.limits import Limiter, TeacherGrant, prompt_chars
from gateway.metrics import Metrics
from gateway.settings import Settings
from models import (
    Backend,
    BackendConfig,
    BackendError,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    DraftScorer,
    Generation,
    GenerationDelta,
    InvalidGenerationRequest,
    SamplingParams,
    collect,
)
from router import DEFAULT_TENANT, DecidedBy, Decision, PolicyBook, PrefixVerdict, Router, RouteReason

if TYPE_CHECKING:
    from gateway.cache import Layer as CacheLayer
    from gateway.cache import Probe, TeacherCache
    from gateway.labels import ActiveLabeler, LabelReason

log = logging.getLogger(__name__)

Tier = Literal["student", "teacher"]
R = TypeVar("R")
Alias = Literal["tiered", "student", "teacher"]


@dataclass(frozen=True, slots=True)
class ChatCall:
    request_id: str  # the gateway's own, new per request: the signal record's key
    tenant: str
    alias: Alias
    messages: tuple[ChatMessage, ...]
    params: SamplingParams  # as the client asked; top_logprobs is the client's k
    want_logprobs: bool
    metadata: dict[str, str]
    started: float  # time.perf_counter() at arrival
    # The client's `x-request-id`, if it sent a usable one: echoed and stored, never a key.
    client_request_id: str | None = None


@dataclass(frozen=True, slots=True)
class Route:
    """Which tier answers and why. Fixed before the first byte goes out."""

    tier: Tier
    escalated: bool
    reason: RouteReason
    threshold: float
    student_version: str
    decision: Decision | None = None
    degraded: bool = False
    cache: CacheLayer | None = None  # the teacher cache layer the answer came from; None: not from it
    decided_by: DecidedBy | None = None  # None: not routed (a forced tier, or the student failed)

    @property
    def confidence(self) -> float | None:
        return self.decision.confidence if self.decision else None

    def headers(self, request_id: str, client_request_id: str | None = None) -> dict[str, str]:
        """`x-request-id` echoes the client's id where it sent one; `x-tiergate-request-id` is
        always the gateway's own (the signal record's id, and the response body's)."""
        conf = self.confidence
        return {
            "x-request-id": client_request_id or request_id,
            "x-tiergate-request-id": request_id,
            "x-tiergate-tier": self.tier,
            "x-tiergate-escalated": "true" if self.escalated else "false",
            "x-tiergate-reason": self.reason,
            "x-tiergate-confidence": f"{conf:.4f}" if conf is not None else "none",
            "x-tiergate-threshold": f"{self.threshold:.4f}",
            "x-tiergate-student-version": self.student_version,
            "x-tiergate-cache": "hit" if self.cache else "miss",
            "x-tiergate-decided-by": self.decided_by or "none",
        }

    def body(self, request_id: str, decision: Decision | None = None) -> dict[str, object]:
        d = decision or self.decision
        return {
            "tier": self.tier,
            "escalated": self.escalated,
            "reason": self.reason,
            "confidence": d.confidence if d else None,
            "threshold": self.threshold,
            "student_version": self.student_version,
            "scorer": d.scorer if d else None,
            "degraded": self.degraded,
            "cache": self.cache,
            "decided_by": self.decided_by,
            "request_id": request_id,
        }


class AnswerStream:
    """A route plus its deltas. `decision` is filled in at the end of a forced-student stream."""

    def __init__(self, route: Route, deltas: AsyncIterator[GenerationDelta] | None = None) -> None:
        self.route = route
        self.deltas: AsyncIterator[GenerationDelta] = deltas if deltas is not None else _empty()
        self.decision: Decision | None = route.decision


class _Hedge:
    """A teacher stream started while a draft's prefix was unsure, read into a buffer as it
    comes (by `TieredService._run_hedge`), so an escalation takes it over where it has got to:
    streamed on from its first delta, or awaited whole."""

    def __init__(self, run: Callable[[_Hedge], Coroutine[Any, Any, Generation]], name: str, prompt_tokens: int) -> None:
        self.deltas: list[GenerationDelta] = []
        self.prompt_tokens = prompt_tokens  # estimated: what a cut hedge is priced at
        self._more = asyncio.Event()
        self.task = asyncio.create_task(run(self), name=name)
        self.task.add_done_callback(lambda _: self._more.set())

    def push(self, delta: GenerationDelta) -> None:
        self.deltas.append(delta)
        self._more.set()

    @property
    def received(self) -> int:
        """Tokens received so far (a delta with text is one token from a streaming server)."""
        return sum(max(1, len(d.logprobs)) for d in self.deltas if d.text)

    async def first(self) -> None:
        """Wait for the first delta; raises what the hedge failed with before it."""
        while not self.deltas and not self.task.done():
            self._more.clear()
            if not self.deltas and not self.task.done():
                await self._more.wait()
        if not self.deltas:
            await self.task  # raises its error

    async def follow(self) -> AsyncIterator[GenerationDelta]:
        """Every delta, those already buffered first, until the last; raises the hedge's error."""
        i = 0
        while True:
            while i < len(self.deltas):
                delta = self.deltas[i]
                i += 1
                yield delta
                if delta.finish_reason is not None:
                    return
            if self.task.done():
                await self.task  # raises its error; a finished one ended on its last delta above
                return
            self._more.clear()
            if i == len(self.deltas) and not self.task.done():
                await self._more.wait()


@dataclass(eq=False)
class _Early:
    """What an early (prefix) decision leaves running. Kept: the deltas held while deciding and
    the student's stream, still generating, on its lease. Escalated: a hedge (the teacher asked
    while the prefix was unsure) and, for the audited slice, the draft running on to its end."""

    verdict: PrefixVerdict
    threshold: float
    held: list[GenerationDelta]
    source: AsyncIterator[GenerationDelta] | None = None
    lease: Lease | None = None
    hedge: _Hedge | None = None
    drain: asyncio.Task[Generation | None] | None = None

    def prefix_features(self) -> dict[str, float]:
        v = self.verdict
        return {"prefix_p_escalate": v.p_escalate, "prefix_confidence": v.confidence, "prefix_tokens": float(v.tokens)}


async def _chain(held: list[GenerationDelta], source: AsyncIterator[GenerationDelta]) -> AsyncIterator[GenerationDelta]:
    """The held deltas, then the live stream; closing this closes the stream (stops its generation)."""
    try:
        for delta in held:
            yield delta
        async for delta in source:
            yield delta
    finally:
        await _aclose(source)


async def _next_delta(tier: str, source: AsyncIterator[GenerationDelta], lease: Lease) -> GenerationDelta:
    """The stream's next delta within the call's deadline: a stream that ends before its last
    delta, or runs past the deadline, is the tier's error."""
    try:
        async with asyncio.timeout_at(lease.deadline):
            return await anext(source)
    except StopAsyncIteration:
        raise BackendResponseError(f"{tier} stream ended without a finish_reason") from None
    except TimeoutError:
        raise BackendTimeout(f"{tier} stream did not finish within its deadline") from None


async def _empty() -> AsyncIterator[GenerationDelta]:
    return
    yield  # pragma: no cover - makes this an async generator


async def _aclose(source: AsyncIterator[GenerationDelta]) -> None:
    """Close a backend stream early (cancels its generation); backends return async generators."""
    aclose = getattr(source, "aclose", None)
    if aclose is not None:
        await aclose()


def error_class(exc: BaseException) -> str:
    if isinstance(exc, TierOverloaded):
        return "overloaded"
    if isinstance(exc, TierCircuitOpen):
        return "circuit_open"
    if isinstance(exc, BackendTimeout):
        return "timeout"
    if isinstance(exc, BackendUnavailable):
        return "unavailable"
    if isinstance(exc, InvalidGenerationRequest):
        return "invalid"
    if isinstance(exc, BackendError):
        return "upstream"
    return "internal"


def _backend_error(tier: str, exc: BaseException) -> BackendError | None:
    """The backend error a call ended with: the deadline's TimeoutError becomes a
    `BackendTimeout`; None for anything else that is not one (cancellation, a bug)."""
    if isinstance(exc, BackendError):
        return exc
    if isinstance(exc, TimeoutError):
        return BackendTimeout(f"{tier} tier did not answer within its deadline")
    return None


REMOTE_STALL_S = 20.0  # guard.<tier>.breaker.stall_s when unset, for a tier served over HTTP


def tier_capacity(config: BackendConfig) -> int:
    """Calls a tier takes at once when guard.<tier>.max_inflight is unset: an in-process model
    its batch, a server its connection limit."""
    if config.kind == "local":
        return config.max_batch_size
    if config.kind == "remote":
        return config.max_connections
    return 256


class TieredService:
    def __init__(
        self,
        settings: Settings,
        student: Backend,
        teacher: Backend,
        router: Router,
        store: SignalStore,
        metrics: Metrics,
        *,
        policies: PolicyBook | None = None,
        rng: random.Random | None = None,
        labeler: ActiveLabeler | None = None,
        limits: Limiter | None = None,
        cache: TeacherCache | None = None,
    ) -> None:
        self.settings = settings
        self.policies = policies or PolicyBook(settings.policy_store, settings.router.threshold)
        self.tiers: dict[Tier, Backend] = {"student": student, "teacher": teacher}
        self.router = router
        self.store = store
        self.metrics = metrics
        self._rng = rng or random.Random()
        self.labeler = labeler  # None: active labels are off (budget 0)
        self.cache = cache  # None: teacher answers are not reused
        self.limits = limits or Limiter(settings.limits, settings.pricing.teacher, metrics=metrics)
        self._background: set[asyncio.Task[None]] = set()
        self._spent = 0.0
        self._teacher_only = 0.0
        self.guards: dict[Tier, TierGuard] = {
            tier: TierGuard(
                tier,
                getattr(settings.guard, tier),
                capacity=tier_capacity(getattr(settings, tier)),
                default_stall_s=REMOTE_STALL_S if getattr(settings, tier).kind == "remote" else 0.0,
                queue_timeout_s=settings.server.queue_timeout_s,
                on_change=lambda state, tier=tier: self._breaker_changed(tier, state),  # type: ignore[misc]
            )
            for tier in ("student", "teacher")
        }
        # Each teacher call a client waits on is an acknowledged record on its way: the writer
        # lets it share the fsync of the records already queued (`signal.ack_linger_s`). An
        # audit's or a label's record is not acknowledged: none of those is waited for.
        teacher_guard = self.guards["teacher"]
        store.expect_from(lambda: teacher_guard.foreground)
        # Escalations the draft answered while the teacher was out: asked again once it is back.
        self._backlog: deque[tuple[ChatCall, Route, Generation]] = deque(maxlen=settings.guard.backlog_max)
        self._draining: asyncio.Task[None] | None = None
        self._logs = LogThrottle()
        self._teacher_redactor = Redactor() if settings.signal.redact_teacher_requests else None

    # -- public ------------------------------------------------------------------------------
    def student_version(self) -> str:
        return self.tiers["student"].info.version

    def concrete_model(self, tier: Tier, version: str | None = None) -> str:
        info = self.tiers[tier].info
        return f"{info.name}@{version or info.version}" if tier == "student" else info.name

    async def complete(self, call: ChatCall) -> tuple[Route, Generation]:
        route, draft, early = await self._route(call, streaming=False)
        if route.tier == "student":
            if early is not None:  # kept on a prefix: the rest of the draft, to its end
                handle = self._kept_stream(call, route, early)
                draft = collect([d async for d in handle.deltas], model=self.tiers["student"].info.name,
                                version=route.student_version)  # fmt: skip
                return replace(route, decision=handle.decision), draft
            assert draft is not None
            self._finish(call, route, draft)
            self._maybe_audit(call, route, draft)
            return route, draft
        return await self._teacher_answer(call, route, draft, early)

    async def _teacher_answer(
        self, call: ChatCall, route: Route, draft: Generation | None, early: _Early | None, probe: Probe | None = None
    ) -> tuple[Route, Generation]:
        """The teacher's whole answer for an escalated (or `model: teacher`) call: from the cache,
        from the hedge already under way, or asked now; degraded to the draft when it fails."""
        hedge = early.hedge if early is not None else None
        if early is not None:
            early.hedge = None  # consumed here, whatever it gives: not cancelled later
        probe = probe or await self._cache_lookup(call)
        if probe is not None and probe.answer is not None:
            self._cancel_early_hedge(early)
            return await self._cached(call, route, draft, probe)
        try:
            if hedge is not None:
                answer = await hedge.task
                self._hedge_used(answer)
            else:
                answer = await self._ask_teacher(call, "request")
        except TeacherBudgetExceeded as exc:
            return await self._over_budget(call, route, await self._whole_draft(call, route, draft, early), exc)
        except BackendError as exc:
            return self._fallback(call, route, await self._whole_draft(call, route, draft, early), exc)
        self._cache_remember(probe, answer)
        self._finish(call, route, answer)
        if route.escalated:
            draft, decision = await self._record_draft(route, draft, early)
            record = self._record(call, "escalation", route.reason, draft, decision, answer)
            await self._acknowledge(call, record)
        return route, answer

    async def open_stream(self, call: ChatCall) -> AnswerStream:
        """Do all the work that must precede the first byte; return the route and the deltas.

        Errors before the first delta raise here, so they become proper HTTP statuses.
        A forced-student stream is live (real time to first token). A routed one is decided on
        the one decision path (`_route`) before any byte, since headers name the tier: on a
        prefix of the draft (early), then streamed as the student generates the rest; or on the
        whole draft (full), then replayed.
        """
        if call.alias == "student":
            return await self._open_live("student", call, self._routeless(call, "student"))
        route, draft, early = await self._route(call, streaming=True)
        if route.tier == "student":
            if early is not None:
                return self._kept_stream(call, route, early)
            assert draft is not None
            self._maybe_audit(call, route, draft)
            return AnswerStream(route, self._replay(call, route, draft))
        probe = await self._cache_lookup(call)
        if (probe is None or probe.answer is None) and early is not None and early.hedge is not None:
            # The hedge already under way: streamed on from its first delta.
            hedge, early.hedge = early.hedge, None
            try:
                await hedge.first()
            except TeacherBudgetExceeded as exc:
                whole = await self._whole_draft(call, route, draft, early)
                route, answer = await self._over_budget(call, route, whole, exc)
                return AnswerStream(route, self._replay(call, route, answer, already_finished=True))
            except BackendError as exc:
                route, answer = self._fallback(call, route, await self._whole_draft(call, route, draft, early), exc)
                return AnswerStream(route, self._replay(call, route, answer, already_finished=True))
            return AnswerStream(route, self._follow_hedge(call, route, draft, early, hedge, probe))
        if probe is not None and probe.answer is not None:
            # From the cache (a hedge, if any, is cancelled there): whole before the first byte.
            route, answer = await self._teacher_answer(call, route, draft, early, probe)
            return AnswerStream(route, self._replay(call, route, answer, already_finished=True))
        try:
            grant = self._admit_teacher(call, "request")
        except TeacherBudgetExceeded as exc:
            route, answer = await self._over_budget(
                call, route, await self._whole_draft(call, route, draft, early), exc
            )
            return AnswerStream(route, self._replay(call, route, answer, already_finished=True))
        try:
            # An audited draft running on beside the teacher (`early.drain`) is awaited before
            # the teacher's last delta leaves, so the record holds both; the teacher streams live.
            return await self._open_live("teacher", call, route, draft, grant, probe, early)
        except BackendError as exc:
            self.limits.settle_teacher(grant, 0.0)
            route, answer = self._fallback(call, route, await self._whole_draft(call, route, draft, early), exc)
            return AnswerStream(route, self._replay(call, route, answer, already_finished=True))
        except BaseException:
            if early is not None and early.drain is not None:
                early.drain.cancel()
            raise

    async def drain(self, timeout: float) -> None:
        """Wait for background audits and labels so their records are written before shutdown."""
        if self._background:
            await asyncio.wait(set(self._background), timeout=timeout)
        for task in self._background:
            task.cancel()

    # -- routing -----------------------------------------------------------------------------
    def _routeless(self, call: ChatCall, tier: Tier) -> Route:
        version = self.student_version()
        return Route(tier, False, "forced", self.policies.effective_threshold(call.tenant, version), version)

    async def _route(self, call: ChatCall, *, streaming: bool) -> tuple[Route, Generation | None, _Early | None]:
        """The one decision path: before generation (the learned router's prompt model), on a
        prefix of the draft (early), or on the whole draft (full). Returns the route, the draft
        (a prefix, if a prefix escalated) and what an early decision left running.

        A non-streaming request is decided early only when the student runs in-process, where
        its stream is the way it generates anyway: a remote student's draft streamed over HTTP
        costs the gateway a parse per token, more CPU than the student time an early
        escalation saves it."""
        if call.alias == "teacher":
            return self._routeless(call, "teacher"), None, None
        threshold = self.policies.effective_threshold(call.tenant, self.student_version())
        prompt = next((m.content for m in reversed(call.messages) if m.role == "user"), "")
        learned = self.router.learned
        if (
            call.alias == "tiered"
            and self.settings.tuning.learned_router
            and learned is not None
            and learned.p_hard_prompt(prompt) >= self.settings.tuning.skip_student_above
        ):
            # Rated hard before generation: skip the student's draft altogether.
            self.metrics.escalations.labels("predicted_hard").inc()
            self.metrics.decisions.labels("prompt", "teacher").inc()
            route = Route("teacher", True, "predicted_hard", threshold, self.student_version(), decided_by="prompt")
            return route, None, None
        early = (
            call.alias == "tiered"
            and (streaming or self.settings.student.kind != "remote")
            and self.policies.decision(call.tenant, self.settings.router.decision) == "early"
        )
        try:
            if early:
                return await self._route_early(call, threshold, prompt)
            draft = await self._generate("student", call.messages, call.params)
        except BackendError as exc:
            # An overloaded student is the gateway's own overload: shed it (503), never pass it
            # on to the teacher. Only a student that really fails (or whose breaker is open) escalates.
            if call.alias == "student" or isinstance(exc, (InvalidGenerationRequest, TierOverloaded)):
                raise
            return self._student_failed(threshold), None, None
        return self._route_draft(call, draft, prompt), draft, None

    def _student_failed(self, threshold: float) -> Route:
        """The escalation of a request whose draft failed (counted as `student_error`)."""
        self.metrics.escalations.labels("student_error").inc()
        return Route("teacher", True, "student_error", threshold, self.student_version())

    def _route_draft(self, call: ChatCall, draft: Generation, prompt: str) -> Route:
        """Decide on a whole draft."""
        decision = self.router.decide(draft, self.policies.effective_threshold(call.tenant, draft.version), prompt)
        self.metrics.confidence.observe(decision.confidence)
        if call.alias == "tiered":
            self.policies.observe(call.tenant, decision.confidence)
        if call.alias == "student":
            return Route("student", False, "forced", decision.threshold, draft.version, decision)
        tier: Tier = "teacher" if decision.escalate else "student"
        self.metrics.decisions.labels("full_draft", tier).inc()
        if decision.escalate:
            self.metrics.escalations.labels(decision.reason).inc()
            return Route(
                "teacher", True, decision.reason, decision.threshold, draft.version, decision, decided_by="full_draft"
            )
        return Route(
            "student", False, "confident", decision.threshold, draft.version, decision, decided_by="full_draft"
        )

    async def _route_early(
        self, call: ChatCall, threshold: float, prompt: str
    ) -> tuple[Route, Generation | None, _Early | None]:
        """Stream the student's draft and judge each prefix (router/prefix.py) from
        `router.min_prefix_tokens` on, until it is decisive or reaches `decide_after_tokens`.
        Kept: the held deltas and the live stream go back to be sent. Escalated: the draft
        stops at once (its stream is closed), except for an audited slice that runs on so the
        early decision can be checked against the whole one. A draft that ends first is
        decided whole. While an undecided prefix looks unsure (`router.hedge_below`), the
        teacher starts in parallel."""
        cfg = self.settings.router
        student = self.tiers["student"]
        delta, source, lease = await self._open_source("student", call.messages, call.params)
        held: list[GenerationDelta] = []
        lps: list[float] = []
        hedge: _Hedge | None = None
        handed_on = False
        try:
            while True:
                held.append(delta)
                lps.extend(t.logprob for t in delta.logprobs)
                if delta.finish_reason is not None:  # the whole draft came first: decide on it
                    lease.done()
                    draft = collect(held, model=student.info.name, version=student.info.version)
                    self._account("student", draft.usage.prompt_tokens, draft.usage.completion_tokens)
                    route = self._route_draft(call, draft, prompt)
                    if route.tier == "teacher" and hedge is not None:
                        handed_on = True
                        verdict = self.router.judge_prefix(lps, threshold, final=True)
                        return (
                            route,
                            draft,
                            _Early(verdict, threshold, held, hedge=hedge),
                        )
                    return route, draft, None
                so_far = self.router.judge_so_far(lps, threshold)
                if so_far is not None:
                    if so_far.verdict != "undecided":
                        handed_on = True
                        early = _Early(so_far, threshold, held, source, lease, hedge)
                        return self._decided_early(call, early)
                    if hedge is None and so_far.confidence < cfg.hedge_below:
                        system = self.settings.teacher.system_prompt or ""
                        estimate = (prompt_chars(call.messages) + len(system)) // 4
                        run = functools.partial(self._run_hedge, call)
                        hedge = _Hedge(run, f"hedge-{call.request_id}", estimate)
                delta = await _next_delta("student", source, lease)
        except BackendError as exc:
            lease.done(exc)
            self.metrics.errors.labels("student", error_class(exc)).inc()
            if hedge is None or isinstance(exc, (InvalidGenerationRequest, TierOverloaded)):
                raise  # `_route` escalates it (or sheds it) as for a draft that failed whole
            # The draft failed with the teacher already under way: the hedge answers, as
            # `_route` would have asked the teacher anew.
            handed_on = True
            await _aclose(source)
            verdict = self.router.judge_prefix(lps, threshold, final=True)
            return self._student_failed(threshold), None, _Early(verdict, threshold, held, hedge=hedge)
        except BaseException as exc:
            lease.done(exc)
            raise
        finally:
            if not handed_on:
                self._cancel_hedge(hedge)
                await _aclose(source)

    def _decided_early(self, call: ChatCall, early: _Early) -> tuple[Route, Generation | None, _Early]:
        version = self.student_version()
        verdict, threshold, held, source, lease = early.verdict, early.threshold, early.held, early.source, early.lease
        assert source is not None and lease is not None
        escalate = verdict.verdict == "escalate"
        features = {**early.prefix_features(), "full_draft": 0.0}
        decision = Decision(escalate, verdict.confidence, threshold, "low_confidence" if escalate else "confident",
                            "prefix", features)  # fmt: skip
        self.metrics.decisions.labels("prefix", "teacher" if escalate else "student").inc()
        if not escalate:
            self._cancel_early_hedge(early)
            return (
                Route("student", False, "prefix_confident", threshold, version, decision, decided_by="prefix"),
                None,
                early,
            )
        self.metrics.escalations.labels("prefix_unsure").inc()
        # A target-rate policy must see the unsure ones too, or its quantile drifts up: the
        # prefix's predicted confidence (below the threshold) stands in for the whole draft's.
        self.policies.observe(call.tenant, verdict.confidence)
        route = Route("teacher", True, "prefix_unsure", threshold, version, decision, decided_by="prefix")
        prefix = collect(held, model=self.tiers["student"].info.name, version=version)
        fraction = self.settings.signal.audit_fraction
        if fraction > 0 and self._rng.random() < fraction:
            # Audited: the draft runs on beside the teacher, so the record holds the whole draft
            # and both decisions (what-if and the prefix refit learn from these).
            early.drain = asyncio.create_task(self._run_on(early), name=f"draft-{call.request_id}")
        else:
            early.lease = None
            self._spawn(self._stop_draft(source, lease, len(prefix.logprobs), call), call.request_id)
        return route, replace(prefix, finish_reason="length"), early

    async def _stop_draft(
        self, source: AsyncIterator[GenerationDelta], lease: Lease, tokens: int, call: ChatCall
    ) -> None:
        """Close a draft a prefix escalated (its generation stops) and account what it cost:
        the tokens made, and its prompt estimated at 4 characters a token (no usage came)."""
        try:
            await _aclose(source)
        finally:
            lease.done()
            self._account("student", prompt_chars(call.messages) // 4, tokens)

    async def _run_on(self, early: _Early) -> Generation | None:
        """The rest of an escalated draft, for the audited slice; None if it failed."""
        assert early.source is not None and early.lease is not None
        deltas = list(early.held)
        try:
            async with asyncio.timeout_at(early.lease.deadline):
                async for delta in early.source:
                    deltas.append(delta)
                    if delta.finish_reason is not None:
                        break
        except (BackendError, TimeoutError) as exc:
            early.lease.done(_backend_error("student", exc))
            return None
        finally:
            await _aclose(early.source)
        early.lease.done()
        draft = collect(deltas, model=self.tiers["student"].info.name, version=self.student_version())
        self._account("student", draft.usage.prompt_tokens, draft.usage.completion_tokens)
        return draft

    async def _run_hedge(self, call: ChatCall, hedge: _Hedge) -> Generation:
        """Stream the teacher's answer into `hedge`, through the guard and the key's budget, and
        account it once whole. Cancelled when the draft is kept: the grant keeps its estimate."""
        grant = self._admit_teacher(call, "request")
        source: AsyncIterator[GenerationDelta] | None = None
        lease: Lease | None = None
        try:
            messages, params = self._for_teacher(call.messages), self._teacher_params(call)
            delta, source, lease = await self._open_source("teacher", messages, params)
            while True:
                hedge.push(delta)
                if delta.finish_reason is not None:
                    break
                delta = await _next_delta("teacher", source, lease)
        except BaseException as exc:
            if lease is not None:
                lease.done(exc)
            if isinstance(exc, BackendError):
                self.metrics.errors.labels("teacher", error_class(exc)).inc()
            self.limits.settle_teacher(grant, None if isinstance(exc, asyncio.CancelledError) else 0.0)
            raise
        finally:
            if source is not None:
                await _aclose(source)
        lease.done()
        info = self.tiers["teacher"].info
        answer = collect(hedge.deltas, model=info.name, version=info.version)
        self._account("teacher", answer.usage.prompt_tokens, answer.usage.completion_tokens)
        self._settle(grant, answer)
        return answer

    async def _follow_hedge(
        self, call: ChatCall, route: Route, draft: Generation | None, early: _Early, hedge: _Hedge, probe: Probe | None
    ) -> AsyncIterator[GenerationDelta]:
        """An escalation answered by its hedge, streamed from where the hedge has got to; the
        record is written (and acknowledged) before the last delta leaves, as for a live one."""
        finished = False
        try:
            async for delta in hedge.follow():
                if delta.finish_reason is not None:
                    answer = await hedge.task
                    finished = True
                    self._hedge_used(answer)
                    self._cache_remember(probe, answer)
                    self._finish(call, route, answer)
                    whole, decision = await self._record_draft(route, draft, early)
                    record = self._record(call, "escalation", route.reason, whole, decision, answer)
                    await self._acknowledge(call, record)
                yield delta
        finally:
            if not finished:
                hedge.task.cancel()  # the client left, or the hedge failed: nothing more is generated
                if early.drain is not None:
                    early.drain.cancel()

    def _hedge_used(self, answer: Generation) -> None:
        self.metrics.hedges.labels("used").inc()
        self.metrics.hedge_tokens.labels("used").inc(answer.usage.prompt_tokens + answer.usage.completion_tokens)

    def _cancel_early_hedge(self, early: _Early | None) -> None:
        if early is not None and early.hedge is not None:
            hedge, early.hedge = early.hedge, None
            self._cancel_hedge(hedge)

    def _cancel_hedge(self, hedge: _Hedge | None) -> None:
        """Cancel a hedge no longer needed, and price what it cost: one that had answered is
        accounted already; a cut one, its prompt (estimated) and the tokens it had sent."""
        if hedge is None:
            return
        self.metrics.hedges.labels("cancelled").inc()
        task = hedge.task
        if task.done() and not task.cancelled() and task.exception() is None:
            usage = task.result().usage
            self.metrics.hedge_tokens.labels("cancelled").inc(usage.prompt_tokens + usage.completion_tokens)
            return
        task.cancel()
        if not task.done():
            received = hedge.received
            self._account("teacher", hedge.prompt_tokens, received)
            self.metrics.hedge_tokens.labels("cancelled").inc(hedge.prompt_tokens + received)

    async def _whole_draft(
        self, call: ChatCall, route: Route, draft: Generation | None, early: _Early | None
    ) -> Generation | None:
        """The draft to serve in the teacher's place. A prefix decision cut it short: the
        audited slice's ran on; any other is drafted again (or None if the student fails)."""
        self._cancel_early_hedge(early)
        if route.decided_by != "prefix" or early is None:
            return draft
        if early.drain is not None:
            whole = await early.drain
            early.drain = None
            if whole is not None:
                return whole
        try:
            return await self._generate("student", call.messages, call.params)
        except BackendError:
            return None

    async def _record_draft(
        self, route: Route, draft: Generation | None, early: _Early | None
    ) -> tuple[Generation | None, Decision | None]:
        """The draft and decision an escalation's record keeps: for the audited slice of
        prefix escalations, the whole draft and both decisions (checked against each other)."""
        if early is None or early.drain is None or route.decision is None:
            return draft, route.decision
        whole = await early.drain
        if whole is None:
            return draft, route.decision
        full = self.router.decide(whole, early.threshold)
        self.metrics.early_agreement.labels("true" if full.escalate else "false").inc()
        features = {**full.features, **early.prefix_features(), "full_draft": 1.0}
        return whole, replace(full, features=features)

    def _for_teacher(self, messages: tuple[ChatMessage, ...]) -> tuple[ChatMessage, ...]:
        """The prompt as the teacher gets it: redacted under `signal.redact_teacher_requests`,
        numbered as the stored record will be (prompt first), so the answer's placeholders match."""
        return self._teacher_redactor.messages(messages) if self._teacher_redactor is not None else messages

    def _teacher_params(self, call: ChatCall) -> SamplingParams:
        k = max(call.params.top_logprobs, self.settings.signal.teacher_top_logprobs)
        return replace(call.params, top_logprobs=k)

    def _fallback(
        self, call: ChatCall, route: Route, draft: Generation | None, exc: BackendError
    ) -> tuple[Route, Generation]:
        if draft is None or not route.escalated or isinstance(exc, InvalidGenerationRequest):
            raise exc
        reason: RouteReason = "teacher_busy" if isinstance(exc, TierOverloaded) else "teacher_unavailable"
        self._logs.warning(log, f"fallback:{reason}", "teacher %s on %s (%s); answering with the student's draft",
                           reason.removeprefix("teacher_"), call.request_id, exc)  # fmt: skip
        self.metrics.fallbacks.labels(reason).inc()
        degraded = replace(route, tier="student", reason=reason, degraded=True)
        self._finish(call, degraded, draft)
        if call.alias == "tiered":
            self._defer(call, route, draft)
        return degraded, draft

    # -- the teacher budget ------------------------------------------------------------------
    def _admit_teacher(self, call: ChatCall, kind: Literal["request", "audit", "label"]) -> TeacherGrant | None:
        """Admit one teacher call against the tenant's budget; raises TeacherBudgetExceeded (counted)."""
        if not self.limits.active:
            return None
        # The teacher's own system prompt goes before every conversation: it is paid for too.
        chars = prompt_chars(call.messages) + len(self.settings.teacher.system_prompt or "")
        return self.limits.admit_teacher(call.tenant, chars, call.params.max_tokens, kind)

    async def _ask_teacher(
        self, call: ChatCall, kind: Literal["request", "audit", "label"], *, wait: bool = True
    ) -> Generation:
        """One non-streamed teacher call for `call`: admitted against the key's budget (raises
        TeacherBudgetExceeded), made through the guard, and settled at its real cost, or at
        nothing when it failed."""
        grant = self._admit_teacher(call, kind)
        try:
            answer = await self._generate(
                "teacher", self._for_teacher(call.messages), self._teacher_params(call), wait=wait
            )
        except BackendError:
            self.limits.settle_teacher(grant, 0.0)
            raise
        self._settle(grant, answer)
        return answer

    def _settle(self, grant: TeacherGrant | None, answer: Generation) -> None:
        if grant is not None:
            cost = self.settings.pricing.teacher.cost(answer.usage.prompt_tokens, answer.usage.completion_tokens)
            self.limits.settle_teacher(grant, cost)

    async def _over_budget(
        self, call: ChatCall, route: Route, draft: Generation | None, exc: TeacherBudgetExceeded
    ) -> tuple[Route, Generation]:
        """Serve the student's draft instead of the teacher's answer, degraded and counted. No
        escalation record is written: there is no teacher answer to learn from. A prompt the
        learned router sent straight to the teacher gets its student draft now; a request with
        no draft at all (the student failed, or `model: teacher`) gets the 429."""
        if draft is None and route.reason == "predicted_hard":
            draft = await self._generate("student", call.messages, call.params)
        if draft is None:
            raise exc
        self.metrics.fallbacks.labels("teacher_budget").inc()
        degraded = replace(route, tier="student", reason="teacher_budget", degraded=True)
        self._finish(call, degraded, draft)
        return degraded, draft

    # -- backend calls with accounting -------------------------------------------------------
    async def _generate(
        self, tier: Tier, messages: tuple[ChatMessage, ...], params: SamplingParams, *, wait: bool = True
    ) -> Generation:
        """One call through the tier's guard. `wait=False` (background work) takes a slot only
        if one is free now."""
        gen, lease = await self._guarded(tier, lambda: self.tiers[tier].generate(messages, params), wait)
        lease.done()
        self._account(tier, gen.usage.prompt_tokens, gen.usage.completion_tokens)
        return gen

    async def _guarded(self, tier: Tier, attempt: Callable[[], Awaitable[R]], wait: bool = True) -> tuple[R, Lease]:
        """`attempt()` on a lease of the tier, under one deadline for every try, retried while
        the guard allows (the attempt must end before any byte reaches the client). Returns
        the result and the lease, still held: the caller ends it."""
        guard = self.guards[tier]
        deadline: float | None = None
        tries = 0
        while True:
            lease = await self._lease(tier, wait)
            deadline = deadline or lease.deadline
            try:
                async with asyncio.timeout_at(deadline):
                    return await attempt(), lease
            except BaseException as raised:
                exc = _backend_error(tier, raised)
                lease.done(exc or raised)
                if exc is None:
                    raise  # cancelled, or a bug: neither says anything about the tier
                self.metrics.errors.labels(tier, error_class(exc)).inc()
                if guard.may_retry(exc, tries):
                    self.metrics.retries.labels(tier).inc()
                    tries += 1
                    await guard.backoff(tries)
                    continue
                if exc is raised:
                    raise
                raise exc from raised

    async def _lease(self, tier: Tier, wait: bool = True) -> Lease:
        """A slot on the tier, or the guard's refusal (counted as an error of the tier)."""
        try:
            lease, waited = await self.guards[tier].lease(wait=wait)
        except (TierOverloaded, TierCircuitOpen) as exc:
            self.metrics.errors.labels(tier, error_class(exc)).inc()
            if isinstance(exc, TierOverloaded):
                self.metrics.shed.labels(tier).inc()
            raise
        if waited:
            self.metrics.queue_wait.labels(tier).observe(waited)
        return lease

    def _account(self, tier: Tier, prompt_tokens: int, completion_tokens: int) -> None:
        price = getattr(self.settings.pricing, tier)
        cost = price.cost(prompt_tokens, completion_tokens)
        self.metrics.add_usage(tier, prompt_tokens, completion_tokens, cost)
        self._spent += cost

    def _finish(self, call: ChatCall, route: Route, served: Generation) -> None:
        """Count one answered request: tier, latency and the teacher-only counterfactual."""
        self.metrics.answered(route.tier, time.perf_counter() - call.started)
        counterfactual = self.settings.pricing.teacher.cost(served.usage.prompt_tokens, served.usage.completion_tokens)
        self._teacher_only += counterfactual
        self.metrics.teacher_only_cost.inc(counterfactual)
        self.metrics.cost_saved.set(self._teacher_only - self._spent)

    # -- streaming ---------------------------------------------------------------------------
    async def _open_live(
        self,
        tier: Tier,
        call: ChatCall,
        route: Route,
        draft: Generation | None = None,
        grant: TeacherGrant | None = None,
        probe: Probe | None = None,
        early: _Early | None = None,
    ) -> AnswerStream:
        """Open the tier's stream and take its first delta; retried (within the budget) only
        until that first delta, since after it bytes may have reached the client."""
        params = self._teacher_params(call) if tier == "teacher" else call.params
        messages = self._for_teacher(call.messages) if tier == "teacher" else call.messages
        first, source, lease = await self._open_source(tier, messages, params)
        handle = AnswerStream(route)
        handle.deltas = self._relay(tier, call, route, first, source, draft, handle, lease, grant, probe, early)
        return handle

    def _kept_stream(self, call: ChatCall, route: Route, early: _Early) -> AnswerStream:
        """A draft kept on its prefix: the held deltas, then the rest as the student makes it."""
        assert early.source is not None and early.lease is not None
        handle = AnswerStream(route)
        rest = _chain(early.held[1:], early.source)
        handle.deltas = self._relay("student", call, route, early.held[0], rest, None, handle, early.lease, None, None)
        return handle

    async def _open_source(
        self, tier: Tier, messages: tuple[ChatMessage, ...], params: SamplingParams
    ) -> tuple[GenerationDelta, AsyncIterator[GenerationDelta], Lease]:
        """Open the tier's stream and take its first delta, through the guard: retried (within
        the budget) only until that first delta, since after it bytes may reach the client.
        Returns the delta, the stream and its lease, still held."""

        async def first_delta() -> tuple[GenerationDelta, AsyncIterator[GenerationDelta]]:
            source = self.tiers[tier].stream(messages, params)
            try:
                return await anext(source), source
            except StopAsyncIteration:
                return GenerationDelta(finish_reason="stop"), source
            except BaseException:
                await _aclose(source)
                raise

        (first, source), lease = await self._guarded(tier, first_delta)
        return first, source, lease

    async def _relay(
        self,
        tier: Tier,
        call: ChatCall,
        route: Route,
        first: GenerationDelta,
        source: AsyncIterator[GenerationDelta],
        draft: Generation | None,
        handle: AnswerStream,
        lease: Lease,
        grant: TeacherGrant | None,
        probe: Probe | None,
        early: _Early | None = None,
    ) -> AsyncIterator[GenerationDelta]:
        """Pass the deltas on, under the call's deadline; the tier's slot is held until the end.
        `early` with a drain: the audited draft that ran on, awaited for the record at the end."""
        deltas: list[GenerationDelta] = []
        delta = first
        outcome: BaseException | None = None
        try:
            while True:
                deltas.append(delta)
                if delta.finish_reason is not None:
                    lease.done()  # the tier's part is over; the record's commit is not its concern
                    if early is not None and early.drain is not None:
                        draft, decision = await self._record_draft(route, draft, early)
                        route = replace(route, decision=decision)
                    # Account and score before the last delta leaves, so the final chunk carries it.
                    committed = self._complete_live(tier, call, route, deltas, draft, handle, grant, probe)
                    await self._acknowledge(call, committed)
                    yield delta
                    return
                yield delta
                delta = await _next_delta(tier, source, lease)
        except BackendError as exc:
            outcome = exc
            self.metrics.errors.labels(tier, error_class(exc)).inc()
            raise  # a partial answer is never recorded as signal
        except BaseException as exc:  # the client went away (GeneratorExit, cancellation)
            outcome = exc
            raise
        finally:
            lease.done(outcome)
            self.limits.settle_teacher(grant, None)  # cut short: the estimate stands; settled already otherwise
            await _aclose(source)
            if outcome is not None and early is not None and early.drain is not None:
                early.drain.cancel()  # the answer was cut short: no record, so no draft to wait for

    def _complete_live(
        self,
        tier: Tier,
        call: ChatCall,
        route: Route,
        deltas: list[GenerationDelta],
        draft: Generation | None,
        handle: AnswerStream,
        grant: TeacherGrant | None,
        probe: Probe | None,
    ) -> asyncio.Future[bool] | asyncio.Task[None] | None:
        """Account a finished live stream; returns what its escalation record's commit awaits."""
        info = self.tiers[tier].info
        gen = collect(deltas, model=info.name, version=info.version)
        self._account(tier, gen.usage.prompt_tokens, gen.usage.completion_tokens)
        self._finish(call, route, gen)
        if tier == "teacher":
            self._settle(grant, gen)
            self._cache_remember(probe, gen)
        if tier == "student":
            # A forced-student stream is scored after the fact, for metrics and the last chunk.
            threshold = self.policies.effective_threshold(call.tenant, gen.version)
            handle.decision = full = self.router.decide(gen, threshold)
            self.metrics.confidence.observe(full.confidence)
            if route.decided_by == "prefix" and route.decision is not None:
                # Kept on its prefix: check that against the whole draft, keep both, and audit it.
                self.metrics.early_agreement.labels("false" if full.escalate else "true").inc()
                prefix = {k: v for k, v in route.decision.features.items() if k.startswith("prefix_")}
                handle.decision = replace(full, features={**full.features, **prefix, "full_draft": 1.0})
                self.policies.observe(call.tenant, full.confidence)
                self._maybe_audit(call, replace(route, decision=handle.decision), gen)
        elif route.escalated:
            return self._record(call, "escalation", route.reason, draft, route.decision, gen)
        return None

    async def _replay(
        self, call: ChatCall, route: Route, gen: Generation, *, already_finished: bool = False
    ) -> AsyncIterator[GenerationDelta]:
        """Stream an answer generated in full before the first byte, one token per chunk."""
        if not already_finished:
            self._finish(call, route, gen)
        pieces = [t.token for t in gen.logprobs]
        if gen.logprobs and "".join(pieces) == gen.text:
            for i, lp in enumerate(gen.logprobs):
                yield GenerationDelta(text=pieces[i], logprobs=(lp,))
        elif gen.text or gen.logprobs:
            yield GenerationDelta(text=gen.text, logprobs=gen.logprobs)
        yield GenerationDelta(finish_reason=gen.finish_reason, usage=gen.usage)

    # -- the teacher cache ---------------------------------------------------------------------
    def _cache_probe(self, call: ChatCall) -> Probe | None:
        """The call's cache key, as its client asked it, or None: no cache, or not cacheable."""
        if self.cache is None:
            return None
        teacher = self.tiers["teacher"].info.name
        return self.cache.probe_for(call.tenant, call.messages, call.params, teacher, logprobs=call.want_logprobs)

    async def _cache_lookup(self, call: ChatCall) -> Probe | None:
        """Look a teacher-bound call up in the cache, before its budget or breaker is asked:
        a hit costs the teacher nothing. Counts the outcome."""
        if self.cache is None:
            return None
        probe = self._cache_probe(call)
        if probe is None:
            self.metrics.teacher_cache.labels("bypass", "none").inc()
            return None
        await self.cache.lookup(probe)
        if probe.layer is None:
            self.metrics.teacher_cache.labels("miss", "none").inc()
        else:
            self.metrics.teacher_cache.labels("hit", probe.layer).inc()
        return probe

    def _cache_remember(self, probe: Probe | None, answer: Generation) -> None:
        if self.cache is not None and probe is not None:
            self.cache.remember(probe, answer)

    async def _cached(
        self, call: ChatCall, route: Route, draft: Generation | None, probe: Probe
    ) -> tuple[Route, Generation]:
        """Serve a cached teacher answer: no teacher call and no teacher cost (so the whole
        counterfactual counts as saved). An escalation still leaves its signal record, as kind
        `cache_hit`: training sees the demand, and what the student drafted for it."""
        assert probe.answer is not None and probe.layer is not None
        answer = probe.answer
        route = replace(route, tier="teacher", cache=probe.layer)
        self._finish(call, route, answer)
        if route.escalated:
            await self._acknowledge(call, self._record(call, "cache_hit", route.reason, draft, route.decision, answer))
        return route, answer

    # -- signal ------------------------------------------------------------------------------
    def _maybe_audit(self, call: ChatCall, route: Route, draft: Generation) -> None:
        """Audit a random share of confident tiered answers; offer the rest for an active label."""
        if call.alias != "tiered":
            return
        fraction = self.settings.signal.audit_fraction
        if fraction > 0 and self._rng.random() < fraction:
            self._spawn(self._second_opinion(call, route, draft, "audit", "audit"), call.request_id)
        elif self.labeler is not None:
            self.labeler.offer(call, route, draft)

    def label(self, call: ChatCall, route: Route, draft: Generation, reason: LabelReason) -> None:
        """Ask the teacher about a served answer the labeler picked, in the background."""
        self._spawn(self._second_opinion(call, route, draft, "label", reason), call.request_id)

    async def _second_opinion(
        self, call: ChatCall, route: Route, draft: Generation, kind: Literal["audit", "label"], reason: str
    ) -> None:
        """Ask the teacher about a confident answer already served (an audit or an active
        label), count the outcome, and record the pair."""
        outcomes = self.metrics.audits if kind == "audit" else self.metrics.active_labels
        labels = () if kind == "audit" else (reason,)
        try:
            # Background work takes a free teacher slot or none: it never queues ahead of escalations.
            answer = await self._ask_teacher(call, kind, wait=False)
        except TeacherBudgetExceeded as exc:
            log.debug("%s of %s skipped: %s", kind, call.request_id, exc)  # counted by the limiter
            return
        except BackendError as exc:
            outcomes.labels(*labels, "failed").inc()
            what = "audit" if kind == "audit" else f"active label ({reason})"
            self._logs.warning(log, f"{kind}:{error_class(exc)}", "%s of %s failed: %s", what, call.request_id, exc)
            return
        outcomes.labels(*labels, "ok").inc()
        self._cache_remember(self._cache_probe(call), answer)  # the next escalation of this prompt needs no teacher
        if kind == "label":
            # `_generate` counted this in the teacher's cost already; this is the labels' share of it.
            usage = answer.usage
            cost = self.settings.pricing.teacher.cost(usage.prompt_tokens, usage.completion_tokens)
            self.metrics.label_cost.inc(cost)
        self._record(call, kind, reason, draft, route.decision, answer)

    # -- escalations the teacher missed ---------------------------------------------------------
    def _defer(self, call: ChatCall, route: Route, draft: Generation) -> None:
        """Keep an escalation the draft answered because the teacher was out, to ask it later."""
        if self._backlog.maxlen:
            if len(self._backlog) == self._backlog.maxlen:
                self.metrics.teacher_backlog_dropped.inc()  # the oldest goes
            self._backlog.append((call, route, draft))
            self.metrics.teacher_backlog.set(len(self._backlog))
            self._drain_soon()

    def _breaker_changed(self, tier: Tier, state: BreakerState) -> None:
        self.metrics.breaker_state.labels(tier).set(BREAKER_VALUE[state])
        log.warning("%s tier circuit %s", tier, state.replace("_", "-"))
        if tier == "teacher" and state == "closed":
            self._drain_soon()

    def _drain_soon(self) -> None:
        if self._backlog and self.guards["teacher"].breaker.state == "closed" and self._draining is None:
            self._draining = self._spawn(self._drain(), "teacher-backlog")
            self._draining.add_done_callback(self._drained)

    def _drained(self, _: asyncio.Task[None]) -> None:
        self._draining = None

    async def _drain(self) -> None:
        """Ask the teacher, one at a time, about the escalations it missed; record the pairs.
        Starts one probe interval after it is asked to, so a teacher that just failed is not
        asked again at once; stops at the first failure (the next fallback or close resumes)."""
        await asyncio.sleep(self.guards["teacher"].breaker.config.open_s)
        while self._backlog and self.guards["teacher"].breaker.state == "closed":
            call, route, draft = self._backlog.popleft()
            self.metrics.teacher_backlog.set(len(self._backlog))
            try:
                answer = await self._ask_teacher(call, "request", wait=False)
            except TeacherBudgetExceeded:
                continue  # the key's budget is spent: this one is not asked again (counted by the limiter)
            except BackendError:
                self._backlog.appendleft((call, route, draft))
                self.metrics.teacher_backlog.set(len(self._backlog))
                return
            self.metrics.escalations_deferred.inc()
            self._record(call, "escalation", route.reason, draft, route.decision, answer)

    def _record(
        self,
        call: ChatCall,
        kind: Literal["escalation", "audit", "label", "cache_hit"],
        reason: str,
        draft: Generation | None,
        decision: Decision | None,
        answer: Generation,
    ) -> asyncio.Future[bool] | asyncio.Task[None] | None:
        """Record the pair. An escalation under `signal.durability: acknowledged` returns what
        its commit resolves, for the response to wait on (`_acknowledge`); otherwise None."""
        sample = Sample(
            id=call.request_id if kind in ("escalation", "cache_hit") else f"{call.request_id}-{kind}",
            created_at=time.time(),
            tenant=call.tenant,
            kind=kind,
            reason=reason,
            messages=call.messages,
            student=draft,
            # A draft a prefix decision cut short has no confidence of its own (only predicted).
            confidence=decision.confidence if decision and decision.features.get("full_draft") != 0.0 else None,
            features=dict(decision.features) if decision else {},
            teacher=answer,
            threshold=decision.threshold if decision else self.policies.threshold(DEFAULT_TENANT),
            metadata=dict(call.metadata),
            # Every escalation is logged; an audit stands for the 1/fraction confident requests
            # `_maybe_audit` drew it from. Stored, so a reader with another fraction weights it right.
            # A label was chosen, not drawn: 1.0, and what-if leaves it out.
            # So does a prefix escalation whose draft ran on: it was drawn from all of them.
            sampling_weight=1.0 / self.settings.signal.audit_fraction
            if kind == "audit" or _drawn(kind, decision)
            else 1.0,
            client_request_id=call.client_request_id,
        )
        if self.labeler is not None:
            self.labeler.covered(call.messages)
        acked = kind in ("escalation", "cache_hit") and self.settings.signal.durability == "acknowledged"
        teacher = self.tiers["teacher"]
        scored = self.settings.signal.score_drafts and kind != "cache_hit"  # a hit asks the teacher nothing
        if scored and draft is not None and draft.text and isinstance(teacher, DraftScorer):
            # The record is written once the teacher has scored the draft: off the client's path
            # when buffered; acknowledged, the response waits for both.
            return self._spawn(self._score_then_submit(sample, draft.text, teacher, acked), call.request_id)
        return self._submit(sample, acked)

    async def _score_then_submit(self, sample: Sample, draft: str, scorer: DraftScorer, acked: bool) -> None:
        try:
            # Redacted (if so set) as one text with the prompt, so both share the numbering.
            *messages, last = self._for_teacher((*sample.messages, ChatMessage("assistant", draft)))
            top_k = self.settings.signal.teacher_top_logprobs or 1
            scores = await scorer.score(tuple(messages), last.content, top_k=top_k)
            sample = replace(sample, draft_scores=tuple(scores))
        except BackendError as exc:  # the record matters more than its scores
            log.warning("teacher could not score draft %s: %s", sample.id, exc)
        committed = self._submit(sample, acked)
        if committed is not None:
            await committed

    async def _acknowledge(self, call: ChatCall, committed: asyncio.Future[bool] | asyncio.Task[None] | None) -> None:
        """Wait, at most `signal.ack_timeout_s`, until the request's record is committed. Past
        that the response goes out anyway and the wait is counted: a failing database never
        fails serving, and the record stays queued (written once it recovers, or spilled).

        The store's future (`submit_awaited`) is waited on with a bare timer, not `wait_for`
        (three more futures and callbacks a request in Python 3.11): expiring cancels it,
        which the store allows. A task (the draft scored first) is shielded: it must go on."""
        if committed is None:
            return
        timeout_s = self.settings.signal.ack_timeout_s
        if isinstance(committed, asyncio.Task):
            try:
                await asyncio.wait_for(asyncio.shield(committed), timeout_s)
            except TimeoutError:
                self._ack_timed_out(call)
            return
        timer = asyncio.get_running_loop().call_later(timeout_s, committed.cancel)
        try:
            await committed
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():  # the request itself was cancelled
                raise
            self._ack_timed_out(call)
        finally:
            timer.cancel()

    def _ack_timed_out(self, call: ChatCall) -> None:
        self.metrics.signal_ack_timeouts.inc()
        self._logs.warning(log, "ack_timeout", "signal record %s not committed within %.1f s; answering anyway",
                           call.request_id, self.settings.signal.ack_timeout_s)  # fmt: skip

    def _spawn(self, coro: Coroutine[Any, Any, None], request_id: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=f"signal-{request_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def _submit(self, sample: Sample, acked: bool = False) -> asyncio.Future[bool] | None:
        """Queue the record; acknowledged, return the future its commit resolves."""
        try:
            if acked:
                return self.store.submit_awaited(sample)
            self.store.submit(sample)
        except StoreClosed:
            self.metrics.signal_records.labels("failed").inc()
            log.error("signal store closed; record %s lost", sample.id)
        return None


BREAKER_VALUE: dict[BreakerState, int] = {"closed": 0, "half_open": 1, "open": 2}


def _drawn(kind: str, decision: Decision | None) -> bool:
    """An escalation decided on its prefix whose whole draft was kept: the audited slice."""
    return (
        kind == "escalation"
        and decision is not None
        and decision.features.get("full_draft") == 1.0
        and "prefix_tokens" in decision.features
    )


# Seeded from os.urandom once; 128 random bits per id, as uuid4 has, without a getrandom(2)
# syscall per request (4% of the gateway's CPU under load, bench/README.md). Request ids are
# signal-store keys, so they must not repeat across restarts or forked workers: both reseed.
_ids = random.Random()
os.register_at_fork(after_in_child=_ids.seed)


def new_request_id() -> str:
    return f"{_ids.getrandbits(128):032x}"
