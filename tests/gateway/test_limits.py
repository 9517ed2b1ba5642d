"""The limiter on its own, with its clocks in the test's hands: buckets, headers, the teacher
budget, how a key's limits are resolved, runtime changes in real SQLite, the memory bound, and
replicas sharing usage through a real PostgreSQL database."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.errors import InvalidRequest, RateLimited, TeacherBudgetExceeded
from gateway.limits import DAY, Bucket, Limiter, duration, estimate_tokens
from gateway.metrics import Metrics
from gateway.settings import LimitsConfig, TenantLimits, TierPrice
from gateway.usage import SharedUsage, Totals
from router import AuditedTable

PRICE = TierPrice(input_per_mtok=1_000_000, output_per_mtok=2_000_000)  # $1 per prompt token, $2 per completion token


class Clock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def limiter(clock: Clock, wall: Clock | None = None, metrics: Metrics | None = None, **limits: object) -> Limiter:
    config = LimitsConfig(default=TenantLimits.model_validate(limits))
    return Limiter(config, PRICE, clock=clock, wall=wall or Clock(10 * DAY + 100), metrics=metrics)


def test_bucket_refills_continuously_up_to_one_minute_and_carries_debt() -> None:
    b = Bucket(60, now=0.0)  # one a second
    assert b.take(60, 0.0) == 0.0 and b.level == 0.0
    assert b.take(1, 0.0) == pytest.approx(1.0)  # refused: one second until one is back
    assert b.take(1, 0.5) == pytest.approx(0.5) and b.level == pytest.approx(0.5)  # nothing taken
    assert b.take(1, 1.0) == 0.0
    b.give(-10, 1.0)  # used 10 more than charged: debt
    assert b.level == pytest.approx(-10.0) and b.reset_s(1.0) == pytest.approx(70.0)
    assert b.take(1, 11.0) == pytest.approx(1.0) and b.take(1, 12.0) == 0.0  # the debt repaid first
    assert b.refill(1000.0) == 60.0  # never above one minute's worth
    b.give(5, 1000.0)
    assert b.level == 60.0 and b.full(1000.0)


def test_duration_reads_like_openais_reset_headers() -> None:
    assert [duration(s) for s in (0, 0.0004, 0.25, 1, 1.5, 59.9994, 60, 360.5)] == [
        "0ms",
        "0ms",
        "250ms",
        "1s",
        "1.5s",
        "59.999s",
        "1m0s",
        "6m0.5s",
    ]


def test_no_limit_anywhere_leaves_the_limiter_inactive() -> None:
    lim = limiter(Clock())
    assert not lim.active
    assert lim.admit("key-a") is None  # callers skip it when inactive; even so nothing is limited
    assert lim.admit_teacher("key-a", 400, 10, "request") is None


def test_requests_per_minute_refuses_with_retry_after_and_headers() -> None:
    clock, metrics = Clock(), Metrics()
    lim = limiter(clock, metrics=metrics, requests_per_minute=3)
    assert lim.active
    for _ in range(3):
        state = lim.admit("key-a")
    assert state is not None
    assert lim.headers(state) == {
        "x-ratelimit-limit-requests": "3",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1m0s",
    }
    with pytest.raises(RateLimited) as refused:
        lim.admit("key-a")
    assert refused.value.limit == "requests" and refused.value.retry_after == pytest.approx(20.0)
    assert refused.value.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert metrics.registry.get_sample_value("tiergate_rate_limited_total", {"limit": "requests"}) == 1
    assert lim.admit("key-b") is not None  # another key has its own bucket
    clock.t += 20.0
    assert lim.admit("key-a") is not None


def test_tokens_are_estimated_charged_and_settled_to_real_usage() -> None:
    clock = Clock()
    lim = limiter(clock, requests_per_minute=10, tokens_per_minute=100)
    state = lim.admit("key-a")
    assert state is not None
    assert estimate_tokens(41, 30) == 40
    charged = lim.charge_tokens(state, 41, 30)  # 10 + 30
    assert charged == 40 and state.tokens is not None and state.tokens.level == 60
    lim.settle_tokens(state, charged, 25)
    assert state.tokens.level == 75
    lim.charge_tokens(state, 0, 75)
    assert lim.admit("key-a") is state and state.requests is not None and state.requests.level == 8
    with pytest.raises(RateLimited) as refused:
        lim.charge_tokens(state, 0, 10)
    assert refused.value.limit == "tokens" and refused.value.retry_after == pytest.approx(6.0)
    assert set(refused.value.headers) == {
        f"x-ratelimit-{what}-{name}" for what in ("limit", "remaining", "reset") for name in ("requests", "tokens")
    }
    # A request refused for its tokens is not counted against the request limit either.
    assert state.requests.level == 9
    with pytest.raises(InvalidRequest):  # could never fit, so retrying cannot help
        lim.charge_tokens(state, 0, 101)


def test_teacher_usd_per_day_holds_the_estimate_then_the_real_cost_and_renews_at_midnight() -> None:
    clock, wall, metrics = Clock(), Clock(10 * DAY + 3600), Metrics()
    lim = limiter(clock, wall, metrics, teacher_usd_per_day=100.0)
    grant = lim.admit_teacher("key-a", 40, 20, "request")  # 10 prompt tokens ($10) + 20 completion ($40)
    assert grant is not None and grant.usd == 50.0
    assert lim.usage("key-a")["teacher_usd_today"] == 50.0
    with pytest.raises(TeacherBudgetExceeded) as over:  # 50 held + 60 > 100
        lim.admit_teacher("key-a", 40, 25, "audit")
    assert over.value.limit == "usd" and over.value.retry_after == pytest.approx(DAY - 3600)
    assert metrics.registry.get_sample_value("tiergate_teacher_budget_denials_total", {"call": "audit", "limit": "usd"})
    lim.settle_teacher(grant, 30.0)  # the real cost replaces the estimate
    lim.settle_teacher(grant, 0.0)  # settled once
    assert lim.usage("key-a")["teacher_usd_today"] == 30.0
    assert lim.admit_teacher("key-a", 40, 25, "request") is not None  # 30 + 60 fits
    cut = lim.admit_teacher("key-a", 0, 5, "request")  # 10 more: 100
    lim.settle_teacher(cut, None)  # a stream cut short keeps its estimate
    assert lim.usage("key-a")["teacher_usd_today"] == 100.0
    with pytest.raises(TeacherBudgetExceeded):
        lim.admit_teacher("key-a", 0, 1, "request")
    wall.t = 11 * DAY + 1  # a new UTC day
    assert lim.admit_teacher("key-a", 0, 1, "request") is not None
    assert lim.usage("key-a")["teacher_usd_today"] == 2.0


def test_teacher_calls_per_minute() -> None:
    clock = Clock()
    lim = limiter(clock, teacher_calls_per_minute=2)
    lim.admit_teacher("key-a", 0, 1, "request")
    lim.admit_teacher("key-a", 0, 1, "label")
    with pytest.raises(TeacherBudgetExceeded) as over:
        lim.admit_teacher("key-a", 0, 1, "request")
    assert over.value.limit == "calls" and over.value.retry_after == pytest.approx(30.0)
    clock.t += 30.0
    assert lim.admit_teacher("key-a", 0, 1, "request") is not None


@pytest.mark.anyio
async def test_limits_resolve_default_then_tenant_entry_then_runtime_override_which_persists(tmp_path: Path) -> None:
    config = LimitsConfig(
        default=TenantLimits(requests_per_minute=60, tokens_per_minute=1000),
        tenants={"key-b": TenantLimits.model_validate({"tokens_per_minute": 50})},
    )
    table = AuditedTable(tmp_path / "policy.db", "limits")
    lim = Limiter(config, PRICE, table=table, clock=Clock())
    lim.open()
    assert lim.limits("key-a") == TenantLimits(requests_per_minute=60, tokens_per_minute=1000)
    assert lim.limits("key-b") == TenantLimits(requests_per_minute=60, tokens_per_minute=50)  # only what differs
    state = lim.admit("key-b")
    assert state is not None and state.tokens is not None and state.tokens.per_minute == 50
    old, new = await lim.set("key-b", {"requests_per_minute": 2}, "key-admin")
    assert (old.requests_per_minute, new.requests_per_minute, new.tokens_per_minute) == (60, 2, 50)
    assert state.requests is not None and (state.requests.per_minute, state.requests.level) == (2, 1.0)  # 1 used
    await lim.set("*", {"teacher_usd_per_day": 5.0}, "key-admin")
    assert lim.limits("key-a").teacher_usd_per_day == 5.0
    assert lim.limits("key-b").teacher_usd_per_day == 0.0  # key-b's own limits are complete
    row = lim.audit()[1]  # newest first: the default's change, then key-b's
    assert row["tenant"] == "key-b" and row["actor"] == "key-admin"
    assert row["old"]["requests_per_minute"] == 60 and row["new"]["requests_per_minute"] == 2

    again = Limiter(config, PRICE, table=AuditedTable(tmp_path / "policy.db", "limits"))
    again.open()
    assert again.limits("key-b").requests_per_minute == 2 and again.limits("key-a").teacher_usd_per_day == 5.0
    assert set(again.configured()) == {"*", "key-b"}
    # The policy book's tables live in the same file, untouched.
    assert AuditedTable(tmp_path / "policy.db", "policy").open() == {}


def test_idle_tenants_are_forgotten_and_the_count_is_bounded() -> None:
    clock, wall = Clock(), Clock(10 * DAY)
    config = LimitsConfig(default=TenantLimits(requests_per_minute=60, teacher_usd_per_day=100.0))
    lim = Limiter(config, PRICE, clock=clock, wall=wall, max_tenants=50)
    for i in range(40):
        lim.admit(f"key-{i}")
    lim.admit_teacher("key-0", 0, 1, "request")  # key-0 spent today: remembered
    assert lim.tracked() == 40
    clock.t += 61.0  # every bucket is full again
    lim.admit("key-new")  # a new tenant after a minute sweeps
    assert lim.tracked() == 2 and lim.usage("key-0")["teacher_usd_today"] == 2.0
    for i in range(100):  # never more than max_tenants, even when none is idle
        lim.admit(f"key-burst-{i}")
    assert lim.tracked() <= 50


def test_replicas_on_one_database_share_each_keys_limits_and_spend(postgres_url: str) -> None:
    """Two limiters with their own `SharedUsage` on a real PostgreSQL database, as two replicas:
    what one admits comes out of the other's buckets and budget at the next exchange, a replica
    that starts later only takes what the others do from then on (it cannot tell what of their
    totals is recent), and one that restarts finds its former self's spend today."""
    clock, wall = Clock(), Clock(10 * DAY + 3600)
    opened: list[SharedUsage] = []

    def replica() -> tuple[Limiter, SharedUsage]:
        opened.append(SharedUsage(postgres_url))
        return limiter(clock, wall, requests_per_minute=60, teacher_usd_per_day=100.0), opened[-1]

    def exchange(lim: Limiter, shared: SharedUsage) -> None:
        lim.take_others(shared.exchange(lim.changes(), lim.today()))

    try:
        _share(replica, exchange, wall, clock)
    finally:
        for shared in opened:
            shared.close()


def _share(
    replica: Callable[[], tuple[Limiter, SharedUsage]],
    exchange: Callable[[Limiter, SharedUsage], None],
    wall: Clock,
    clock: Clock,
) -> None:
    (a, sa), (b, sb) = replica(), replica()
    for lim, shared in ((a, sa), (b, sb)):
        exchange(lim, shared)  # each takes its first look (nothing there yet)
    for _ in range(40):
        a.admit("key-a")
    grant = a.admit_teacher("key-a", 40, 20, "request")  # $50 held against the day's $100
    a.settle_teacher(grant, 60.0)  # it cost $60
    b.admit("key-b")  # another key: untouched by key-a's use
    exchange(a, sa)
    exchange(b, sb)
    for _ in range(20):  # what a left of the minute's 60
        b.admit("key-a")
    with pytest.raises(RateLimited):
        b.admit("key-a")
    with pytest.raises(TeacherBudgetExceeded):  # 60 spent through a + 50 more > 100
        b.admit_teacher("key-a", 40, 20, "request")
    assert b.usage("key-a")["teacher_usd_today"] == 60.0
    assert b.admit_teacher("key-a", 0, 10, "request") is not None  # $20 fits: 80
    exchange(b, sb)
    exchange(a, sa)
    with pytest.raises(RateLimited):  # b's 20 came out of a's bucket
        a.admit("key-a")
    with pytest.raises(TeacherBudgetExceeded):  # 80 + 30
        a.admit_teacher("key-a", 0, 15, "request")
    assert a.usage("key-a")["teacher_usd_today"] == 80.0
    state = b.admit("key-b")
    assert state is not None and state.requests is not None and state.requests.level == 58  # only its own two

    # A third replica starting a minute later takes a's and b's totals as a baseline (full
    # buckets), but the day's spend counts in full.
    wall.t += 60
    c, sc = replica()
    exchange(c, sc)
    assert c.admit("key-a") is not None
    assert c.usage("key-a")["teacher_usd_today"] == 80.0
    # a restarts (a new replica id): its former self's $60 still counts.
    sa.close()
    a2, sa2 = replica()
    exchange(a2, sa2)
    with pytest.raises(TeacherBudgetExceeded):
        a2.admit_teacher("key-a", 0, 15, "request")
    # An hour on, the buckets are full again everywhere, and tomorrow the budget renews.
    clock.t += 3600
    wall.t += DAY
    for lim, shared in ((a2, sa2), (b, sb), (c, sc)):
        exchange(lim, shared)
        assert lim.admit("key-a") is not None and lim.admit_teacher("key-a", 0, 15, "request") is not None


@pytest.mark.anyio
async def test_usage_a_failed_exchange_could_not_write_goes_with_the_next_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The database away: the exchange fails (one warning, not one a second), the limits hold
    per replica meanwhile, and the totals it could not write go with the next exchange."""
    from gateway.app import _share_usage

    caplog.set_level(logging.INFO, logger="gateway.app")

    class Flaky:
        def __init__(self) -> None:
            self.calls: list[dict[str, Totals]] = []

        def exchange(self, mine: dict[str, Totals], today: int) -> dict[tuple[str, str], Totals]:
            self.calls.append(dict(mine))
            if len(self.calls) <= 3:
                raise OSError("connection refused")
            return {("other", "key-a"): Totals(5.0, 0.0, 0.0, today, 0.0, 0.0)}

    clock = Clock()
    lim = limiter(clock, requests_per_minute=60)
    lim.admit("key-a")
    flaky = Flaky()
    task = asyncio.create_task(_share_usage(lim, flaky, 0.01))  # type: ignore[arg-type]
    while len(flaky.calls) < 5:
        await asyncio.sleep(0.01)
        if len(flaky.calls) == 2 and lim.usage("key-b") == {"tracked": False}:
            lim.admit("key-b")  # used while the database is away
    task.cancel()
    assert flaky.calls[0]["key-a"].requests == 1
    assert set(flaky.calls[3]) == {"key-a", "key-b"}  # still unwritten after three failures
    assert flaky.calls[4] == {}  # written: nothing new since
    assert sum("exchange failed" in r.message for r in caplog.records) == 1
    assert any("exchanging again" in r.message for r in caplog.records)
