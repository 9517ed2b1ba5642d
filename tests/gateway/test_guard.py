"""The guard's parts on a fake clock: breaker states, admission bounds, the retry budget, log throttling."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from gateway import Settings, create_app
from gateway.errors import TierCircuitOpen, TierOverloaded
from gateway.guard import Admission, Breaker, LogThrottle, RetryBudget, TierGuard, counts_as_failure, retryable
from gateway.settings import BreakerConfig, GuardConfig, TierGuardConfig
from models import (
    BackendRateLimited,
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    InvalidGenerationRequest,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_breaker_opens_on_consecutive_failures_and_one_probe_closes_it() -> None:
    clock, changes = Clock(), []
    b = Breaker(BreakerConfig(consecutive_failures=3, open_s=5), clock=clock, on_change=changes.append)
    for _ in range(2):
        assert b.allow()
        b.record("failed")
    assert b.state == "closed"
    assert b.allow()
    b.record("failed")
    assert b.state == "open" and not b.allow() and b.retry_in() == 5
    clock.t += 5
    assert b.allow() and b.state == "half_open"  # the probe
    assert not b.allow()  # only one at a time
    b.record("ok")
    assert b.state == "closed" and changes == ["open", "half_open", "closed"]


def test_a_failed_probe_reopens_for_another_interval() -> None:
    clock = Clock()
    b = Breaker(BreakerConfig(consecutive_failures=1, open_s=2), clock=clock)
    b.allow()
    b.record("failed")
    clock.t += 2
    assert b.allow()
    b.record("failed")
    assert b.state == "open" and b.retry_in() == 2


def test_an_ignored_outcome_frees_the_probe_without_deciding() -> None:
    clock = Clock()
    b = Breaker(BreakerConfig(consecutive_failures=1, open_s=1), clock=clock)
    b.allow()
    b.record("failed")
    clock.t += 1
    assert b.allow()
    b.record("ignored")  # the client went away mid-probe
    assert b.state == "half_open" and b.allow()


def test_breaker_opens_on_the_error_ratio_over_its_window() -> None:
    clock = Clock()
    b = Breaker(BreakerConfig(consecutive_failures=100, failure_ratio=0.5, min_calls=10, window_s=10), clock=clock)
    for i in range(9):
        b.allow()
        b.record("failed" if i % 2 else "ok")
    assert b.state == "closed"  # 4 of 9: under min_calls and under the ratio
    b.allow()
    b.record("failed")
    assert b.state == "open"  # 5 of 10
    # Old calls leave the window.
    b2 = Breaker(BreakerConfig(consecutive_failures=100, min_calls=4, window_s=10), clock=clock)
    for outcome in ("ok", "ok", "ok", "failed"):
        b2.record(outcome)  # type: ignore[arg-type]
    clock.t += 11
    for _ in range(3):
        b2.record("failed")
    assert b2.state == "closed"  # 3 of 3 in the window, under min_calls; 4 of 7 had it been kept


def test_what_counts_as_a_failure_and_what_is_retried() -> None:
    assert counts_as_failure(BackendUnavailable("refused")) and retryable(BackendUnavailable("refused"))
    assert counts_as_failure(BackendTimeout("slow")) and not retryable(BackendTimeout("slow"))
    assert counts_as_failure(BackendResponseError("x", status_code=502)) and retryable(
        BackendResponseError("x", status_code=502)
    )
    assert not counts_as_failure(BackendRateLimited("busy")) and not retryable(BackendRateLimited("busy"))
    assert not counts_as_failure(BackendResponseError("x", status_code=400))
    assert not counts_as_failure(InvalidGenerationRequest("too long"))
    assert not counts_as_failure(TierOverloaded("full")) and not retryable(TierOverloaded("full"))
    assert not counts_as_failure(asyncio.CancelledError())


def test_retry_budget_allows_a_share_of_calls_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(0.2, clock)
    assert [budget.try_retry() for _ in range(4)] == [True, True, True, False]  # the floor of 3
    for _ in range(50):
        budget.called()
    assert sum(budget.try_retry() for _ in range(20)) == 10  # 3 + 20 % of 50, less the 3 spent
    clock.t += 11
    assert budget.try_retry()  # the window moved on


@pytest.mark.anyio
async def test_admission_bounds_running_and_waiting_and_times_out_waiters() -> None:
    adm = Admission(limit=2, max_queue=1, timeout=0.2)
    assert await adm.acquire("student") == 0.0
    assert await adm.acquire("student") == 0.0
    waiter = asyncio.create_task(adm.acquire("student"))
    await asyncio.sleep(0.01)
    assert adm.queued == 1
    with pytest.raises(TierOverloaded, match="capacity"):
        await adm.acquire("student")  # the queue is full: refused at once
    adm.release()  # hands the slot to the waiter
    assert await waiter >= 0.0 and adm.inflight == 2 and adm.queued == 0
    with pytest.raises(TierOverloaded, match="queue timeout"):
        await adm.acquire("student")
    assert adm.queued == 0
    adm.release()
    adm.release()
    assert adm.inflight == 0


@pytest.mark.anyio
async def test_a_cancelled_waiter_leaves_the_line_and_loses_no_slot() -> None:
    adm = Admission(limit=1, max_queue=4, timeout=5)
    await adm.acquire("t")
    waiter = asyncio.create_task(adm.acquire("t"))
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert adm.queued == 0
    adm.release()
    assert adm.inflight == 0 and adm.try_acquire()


@pytest.mark.anyio
async def test_an_open_breaker_refuses_a_lease_with_retry_after() -> None:
    guard = TierGuard(
        "teacher", TierGuardConfig(breaker=BreakerConfig(consecutive_failures=1, open_s=3)), capacity=4,
        queue_timeout_s=1,
    )  # fmt: skip
    lease, _ = await guard.lease()
    lease.done(BackendUnavailable("refused"))
    with pytest.raises(TierCircuitOpen) as err:
        await guard.lease()
    assert err.value.http_status == 503 and 2 < err.value.retry_after <= 3
    assert guard.admission.inflight == 0


@pytest.mark.anyio
async def test_calls_a_client_waits_on_are_told_from_background_ones(tmp_path: Path) -> None:
    """The signal writer holds a batch open for acknowledged records on their way, and only
    escalations (leased waiting) are: an audit or a label in flight (leased without waiting)
    must not hold an escalation's commit (`signal.ack_linger_s`)."""
    guard = TierGuard("teacher", TierGuardConfig(), capacity=4, queue_timeout_s=1)
    audit, _ = await guard.lease(wait=False)
    assert (guard.admission.inflight, guard.foreground) == (1, 0)
    escalation, _ = await guard.lease()
    assert (guard.admission.inflight, guard.foreground) == (2, 1)
    audit.done(BackendUnavailable("refused"))
    audit.done()  # once only
    assert (guard.admission.inflight, guard.foreground) == (1, 1)
    escalation.done()
    assert (guard.admission.inflight, guard.foreground) == (0, 0)
    # The service tells its store exactly that.
    settings = Settings(student={"kind": "fake"}, teacher={"kind": "fake"}, signal={"path": tmp_path / "s.db"})
    service = create_app(settings).state.service
    teacher = service.guards["teacher"]
    background, _ = await teacher.lease(wait=False)
    assert service.store._coming() == 0
    waited, _ = await teacher.lease()
    assert service.store._coming() == 1
    background.done()
    waited.done()


def test_log_throttle_keeps_one_line_per_interval_and_counts_the_rest(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle, logger = LogThrottle(10, clock), logging.getLogger("t")
    with caplog.at_level(logging.WARNING):
        for _ in range(100):
            throttle.warning(logger, "k", "teacher failed: %s", "boom")
        clock.t += 10
        throttle.warning(logger, "k", "teacher failed: %s", "boom")
    assert [r.getMessage() for r in caplog.records] == [
        "teacher failed: boom",
        "teacher failed: boom (and 99 more like it since the last line)",
    ]


@pytest.mark.anyio
async def test_a_tier_that_finishes_nothing_for_stall_s_opens_its_breaker() -> None:
    """A hung tier fails no call until the deadline; with default deadlines that is a minute
    of escalations waiting. Calls running and none finished for stall_s opens the breaker."""
    clock = Clock()
    config = TierGuardConfig(breaker=BreakerConfig(stall_s=10, open_s=5))
    guard = TierGuard("teacher", config, capacity=8, queue_timeout_s=1, clock=clock)
    hung, _ = await guard.lease()
    clock.t += 9
    busy, _ = await guard.lease()  # 9 s without a finish: not yet
    busy.done()  # a finish is progress
    clock.t += 9
    await guard.lease()
    clock.t += 10
    with pytest.raises(TierCircuitOpen):
        await guard.lease()
    assert guard.breaker.state == "open"
    # An idle tier never stalls, however long it waits for traffic.
    idle = TierGuard("student", config, capacity=8, queue_timeout_s=1, clock=clock)
    clock.t += 100
    lease, _ = await idle.lease()
    clock.t += 9
    await idle.lease()
    assert idle.breaker.state == "closed"
    lease.done()
    hung.done()


def test_stall_detection_is_on_for_a_tier_served_over_http_and_off_in_process(tmp_path: Path) -> None:
    """An in-process model is slow only when its CPU is busy (a training run beside it); opening
    its breaker then would serve degraded answers for nothing."""
    settings = Settings(
        student={"kind": "fake"},
        teacher={"kind": "remote", "url": "http://127.0.0.1:9/v1", "model": "t"},
        signal={"path": tmp_path / "s.db"},
    )
    guards = create_app(settings).state.service.guards
    assert (guards["student"].stall_s, guards["teacher"].stall_s) == (0.0, 20.0)
    explicit = settings.model_copy(update={"guard": GuardConfig(student=TierGuardConfig(breaker={"stall_s": 7}))})
    assert create_app(explicit).state.service.guards["student"].stall_s == 7
