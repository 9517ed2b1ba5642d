"""Per-key fair limits: token buckets on requests and tokens per minute, and a teacher budget
(teacher calls per minute, US dollars per UTC day).

`Limiter` keeps a small state per tenant, made on first use and evicted once it has nothing to
remember (its buckets full again, nothing spent today); both clocks are injected, so tests drive
time. It raises `RateLimited` and `TeacherBudgetExceeded` and builds OpenAI's `x-ratelimit-*`
headers; turning those into responses is gateway/errors.py's, and what a refused teacher call
becomes is the service's. With no limit set anywhere `active` is False, and callers skip it
altogether. Owned by the event loop: no locks. Where replicas share a database, `changes` and
`take_others` carry each key's usage to and from the others (gateway/usage.py), so its limits
hold across all of them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from gateway.errors import InvalidRequest, RateLimited, TeacherBudgetExceeded
from gateway.settings import LimitsConfig, TenantLimits, TierPrice
from gateway.usage import Totals
from models import ChatMessage
from router import DEFAULT_TENANT, AuditedTable

if TYPE_CHECKING:
    from gateway.metrics import Metrics

MINUTE = 60.0
DAY = 86_400.0
SWEEP_S = 60.0  # at most one sweep of idle tenants a minute, when a new tenant arrives
MAX_TENANTS = 100_000  # past this, the least recently seen tenants are forgotten first
REQUESTS, TOKENS, CALLS = 0, 1, 2  # `TenantState.used`, and the buckets, in this order
# Another replica's key whose totals started this long before the previous look still counts
# whole when first seen: its first write may have come just after that look (and clocks differ).
BORN_SLACK_S = 5.0


def prompt_chars(messages: Iterable[ChatMessage]) -> int:
    return sum(len(m.content) for m in messages)


def estimate_tokens(chars: int, max_tokens: int) -> int:
    """What a request is charged on arrival: a token per 4 prompt characters (OpenAI's rule of
    thumb for English) plus the whole completion it may ask for. Settled to the real usage after."""
    return chars // 4 + max_tokens


def duration(seconds: float) -> str:
    """OpenAI's reset format: `250ms`, `1.5s`, `6m0s`."""
    ms = max(0, round(seconds * 1000))
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms / 1000, 60)
    text = f"{round(rest, 3):g}s"
    return f"{int(minutes)}m{text}" if minutes else text


class Bucket:
    """A token bucket holding one minute's worth of `per_minute`, refilled continuously. Its level
    goes below zero when a request used more than it was charged: debt that the refill repays."""

    __slots__ = ("level", "per_minute", "stamp")

    def __init__(self, per_minute: int, now: float) -> None:
        self.per_minute = per_minute
        self.level = float(per_minute)
        self.stamp = now

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.level = min(float(self.per_minute), self.level + (now - self.stamp) * self.per_minute / MINUTE)
            self.stamp = now
        return self.level

    def take(self, n: float, now: float) -> float:
        """Take `n` if the bucket holds it and return 0.0; otherwise take nothing and return the
        seconds until it will hold `n`."""
        level = self.refill(now)
        if level >= n:
            self.level = level - n
            return 0.0
        return (n - level) * MINUTE / self.per_minute

    def give(self, n: float, now: float) -> None:
        """Put back `n` (negative: take more, into debt), never above one minute's worth."""
        self.level = min(float(self.per_minute), self.refill(now) + n)

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        return (self.per_minute - self.refill(now)) * MINUTE / self.per_minute

    def full(self, now: float) -> bool:
        return self.refill(now) >= self.per_minute


def _bucket(old: Bucket | None, per_minute: int, now: float) -> Bucket | None:
    """A bucket for a changed limit that keeps what the tenant had used of the old one."""
    if per_minute <= 0:
        return None
    if old is None:
        return Bucket(per_minute, now)
    old.refill(now)
    used = old.per_minute - old.level
    old.per_minute = per_minute
    old.level = per_minute - used
    return old


class TenantState:
    __slots__ = ("born", "calls", "day", "limits", "moved", "requests", "seen", "spent_usd", "tenant", "tokens", "used")

    def __init__(
        self,
        limits: TenantLimits,
        now: float,
        day: int,
        born: float = 0.0,
        tenant: str = "",
        moved: set[str] | None = None,
    ) -> None:
        self.requests: Bucket | None = None
        self.tokens: Bucket | None = None
        self.calls: Bucket | None = None  # teacher calls
        self.day = day  # the UTC day `spent_usd` belongs to
        self.spent_usd = 0.0  # teacher spend that day: real costs, plus estimates of calls in flight
        self.seen = now
        self.limits = limits
        # What this process admitted (requests, tokens net of settlement, teacher calls) since
        # the state was made (`born`, wall time); `moved` collects the tenants whose usage or
        # spend moved since they were last shared.
        self.born = born
        self.used = [0.0, 0.0, 0.0]
        self.tenant = tenant
        self.moved: set[str] = set() if moved is None else moved
        self.apply(limits, now)

    def apply(self, limits: TenantLimits, now: float) -> None:
        self.limits = limits
        self.requests = _bucket(self.requests, limits.requests_per_minute, now)
        self.tokens = _bucket(self.tokens, limits.tokens_per_minute, now)
        self.calls = _bucket(self.calls, limits.teacher_calls_per_minute, now)

    def use(self, kind: int, n: float) -> None:
        """Count `n` admitted (negative: handed back) of REQUESTS, TOKENS or CALLS."""
        self.used[kind] += n
        self.moved.add(self.tenant)

    def spent(self, day: int) -> float:
        if self.day != day:
            self.day, self.spent_usd = day, 0.0
        return self.spent_usd

    def idle(self, now: float, day: int) -> bool:
        """Nothing worth remembering: forgetting it changes no later decision."""
        buckets = (self.requests, self.tokens, self.calls)
        return all(b is None or b.full(now) for b in buckets) and self.spent(day) == 0.0


class TeacherGrant:
    """One admitted teacher call: its estimated cost is held against the day's budget until
    `Limiter.settle_teacher` replaces it with the real one."""

    __slots__ = ("day", "open", "state", "usd")

    def __init__(self, state: TenantState, usd: float, day: int) -> None:
        self.state, self.usd, self.day, self.open = state, usd, day, True


def _any(limits: TenantLimits) -> bool:
    return bool(
        limits.requests_per_minute
        or limits.tokens_per_minute
        or limits.teacher_calls_per_minute
        or limits.teacher_usd_per_day
    )


class Limiter:
    """Limits per tenant from `limits.*` and runtime overrides (persisted in `table`, audited).

    A key's limits: its runtime override if it has one (complete limits); else its entry in
    `limits.tenants` over the default; the default is `limits.default`, or its runtime override
    (tenant "*").
    """

    def __init__(
        self,
        config: LimitsConfig,
        teacher_price: TierPrice,
        *,
        table: AuditedTable | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        max_tenants: int = MAX_TENANTS,
        spent_since: Callable[[float], dict[str, float]] | None = None,
    ) -> None:
        self.config = config
        self._price = teacher_price
        self._table = table
        self._metrics = metrics
        self._clock, self._wall = clock, wall
        self._max_tenants = max_tenants
        self._overrides: dict[str, TenantLimits] = {}
        self._stamp = 0  # the table's stamp when the overrides were last loaded
        self._default = config.default
        self._states: dict[str, TenantState] = {}
        # What each tenant had spent on the teacher today when this process started (from the
        # signal store): a restart must not hand every key its day's budget again.
        self._spent_since = spent_since
        self._seeded: tuple[int, dict[str, float]] = (-1, {})
        self._next_sweep = clock() + SWEEP_S
        # Other replicas' usage (take_others): their teacher spend per key on `_others_day`,
        # and the totals each of their rows had when last seen.
        self._others_usd: dict[str, float] = {}
        self._others_day = -1
        self._seen: dict[tuple[str, str], Totals] = {}
        self._moved: set[str] = set()  # keys whose usage moved since `changes` last took it
        self._unsent: dict[str, Totals] = {}  # taken by `changes`, not yet `sent`
        self._looked = wall()  # when they were last taken (wall time)
        self.active = False
        self._refresh()

    # -- configuration -----------------------------------------------------------------------
    def open(self) -> None:
        """Load the runtime overrides, and today's teacher spend so far (blocking: call in a thread)."""
        self.reload()
        if self._spent_since is not None:
            day = self.today()
            self._seeded = (day, self._spent_since(day * DAY))

    def reload(self) -> None:
        """Load the runtime overrides again: another replica may have changed them (blocking)."""
        if self._table is not None:
            bodies, self._stamp = self._table.load()
            self._overrides = {t: TenantLimits.model_validate(b) for t, b in bodies.items()}
            self._refresh()

    def stale(self) -> bool:
        """Whether another process changed a key's limits since they were last loaded (blocking)."""
        return self._table is not None and self._table.stamp() != self._stamp

    def close(self) -> None:
        if self._table is not None:
            self._table.close()

    def limits(self, tenant: str) -> TenantLimits:
        if tenant in self._overrides:
            return self._overrides[tenant]
        entry = self.config.tenants.get(tenant) if tenant != DEFAULT_TENANT else None
        return self._default if entry is None else self._default.model_copy(update=entry.model_dump(exclude_unset=True))

    def configured(self) -> dict[str, dict[str, Any]]:
        """Every tenant with limits of its own, and the default ("*")."""
        tenants = {DEFAULT_TENANT, *self.config.tenants, *self._overrides}
        return {t: self.limits(t).model_dump() for t in sorted(tenants)}

    async def set(self, tenant: str, changes: dict[str, Any], actor: str) -> tuple[TenantLimits, TenantLimits]:
        """Change some of a tenant's limits at runtime: persist its complete new limits with who
        changed what (in a thread), then apply them. Returns (old, new)."""
        old = self.limits(tenant)
        new = TenantLimits.model_validate({**old.model_dump(), **changes})
        if self._table is not None:
            await asyncio.to_thread(self._table.write, tenant, old.model_dump(), new.model_dump(), actor)
        self._overrides[tenant] = new
        self._refresh()
        return old, new

    def audit(self, limit: int = 100) -> list[dict[str, Any]]:
        """The newest changes first (blocking: call in a thread)."""
        return self._table.audit(limit) if self._table is not None else []

    def _refresh(self) -> None:
        self._default = self._overrides.get(DEFAULT_TENANT, self.config.default)
        now = self._clock()
        for tenant, state in self._states.items():
            state.apply(self.limits(tenant), now)
        self.active = any(_any(self.limits(t)) for t in (DEFAULT_TENANT, *self.config.tenants, *self._overrides))

    # -- per-tenant state --------------------------------------------------------------------
    def today(self) -> int:
        """The UTC day number (days since the epoch) budgets are kept for."""
        return int(self._wall() // DAY)

    def _state(self, tenant: str, now: float) -> TenantState:
        state = self._states.get(tenant)
        if state is None:
            if now >= self._next_sweep or len(self._states) >= self._max_tenants:
                self._sweep(now)
            day = self.today()
            state = TenantState(self.limits(tenant), now, day, self._wall(), tenant, self._moved)
            self._states[tenant] = state
            if self._seeded[0] == day:
                state.spent_usd = self._seeded[1].get(tenant, 0.0)
        state.seen = now
        return state

    def _sweep(self, now: float) -> None:
        """Forget idle tenants; past `max_tenants`, the least recently seen ones too."""
        self._next_sweep = now + SWEEP_S
        day = self.today()
        for tenant in [t for t, s in self._states.items() if s.idle(now, day)]:
            del self._states[tenant]
        excess = len(self._states) - self._max_tenants + 1
        if excess > 0:
            for tenant in sorted(self._states, key=lambda t: self._states[t].seen)[:excess]:
                del self._states[tenant]

    def tracked(self) -> int:
        """How many tenants have state now (the memory bound's measure)."""
        return len(self._states)

    def _count(self, limit: str) -> None:
        if self._metrics is not None:
            self._metrics.rate_limited.labels(limit).inc()

    # -- requests and tokens -----------------------------------------------------------------
    def admit(self, tenant: str) -> TenantState | None:
        """Charge one request to the tenant. Returns its state when a request or token limit
        applies to it (for `charge_tokens` and `headers`), None when none does. Raises
        RateLimited when its request bucket is empty."""
        now = self._clock()
        state = self._state(tenant, now)
        requests = state.requests
        if requests is None:
            return state if state.tokens is not None else None
        wait = requests.take(1, now)
        if wait:
            self._count("requests")
            raise RateLimited(
                f"rate limit reached for requests per minute: limit {requests.per_minute}; retry in {duration(wait)}",
                limit="requests",
                retry_after=wait,
                headers=self.headers(state),
            )
        state.use(REQUESTS, 1)
        return state

    def charge_tokens(self, state: TenantState, chars: int, max_tokens: int) -> int:
        """Charge a parsed request's estimated tokens; returns the charge, for `settle_tokens`.
        Raises RateLimited when the bucket lacks them (the request is then not counted either),
        and InvalidRequest when no full bucket could ever hold them."""
        tokens = state.tokens
        if tokens is None:
            return 0
        need = estimate_tokens(chars, max_tokens)
        now = self._clock()
        if need > tokens.per_minute:
            self._refund_request(state, now)
            raise InvalidRequest(
                f"this request's estimated {need} tokens (prompt characters / 4 + max_tokens) exceed this key's "
                f"limit of {tokens.per_minute} tokens per minute; send a shorter prompt or a lower max_tokens",
                param="max_tokens",
            )
        wait = tokens.take(need, now)
        if wait:
            self._refund_request(state, now)
            self._count("tokens")
            raise RateLimited(
                f"rate limit reached for tokens per minute: limit {tokens.per_minute}, requested {need}; "
                f"retry in {duration(wait)}",
                limit="tokens",
                retry_after=wait,
                headers=self.headers(state),
            )
        state.use(TOKENS, need)
        return need

    def _refund_request(self, state: TenantState, now: float) -> None:
        if state.requests is not None:
            state.requests.give(1, now)
            state.use(REQUESTS, -1)

    def settle_tokens(self, state: TenantState, charged: int, used: int) -> None:
        """Replace a request's estimate with the tokens it really used (0 when it failed)."""
        if state.tokens is not None and charged:
            state.tokens.give(charged - used, self._clock())
            state.use(TOKENS, used - charged)

    def headers(self, state: TenantState) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` headers for the limits that apply to the tenant."""
        now = self._clock()
        out: dict[str, str] = {}
        for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                out[f"x-ratelimit-limit-{name}"] = str(bucket.per_minute)
                out[f"x-ratelimit-remaining-{name}"] = str(max(0, int(bucket.refill(now))))
                out[f"x-ratelimit-reset-{name}"] = duration(bucket.reset_s(now))
        return out

    # -- the teacher budget ------------------------------------------------------------------
    def admit_teacher(self, tenant: str, chars: int, max_tokens: int, call: str) -> TeacherGrant | None:
        """Admit one teacher call for `tenant` (`call`: request, audit or label, for the count).

        Holds its estimated cost (prompt characters / 4 input tokens, `max_tokens` output
        tokens at `pricing.teacher`) against the day's budget and takes one teacher call.
        Returns None when the tenant has no teacher budget; raises TeacherBudgetExceeded when
        the call would go over either limit.
        """
        now = self._clock()
        state = self._state(tenant, now)
        limits = state.limits
        if state.calls is None and not limits.teacher_usd_per_day:
            return None
        day = self.today()
        usd = self._price.cost(chars // 4, max_tokens)
        spent = state.spent(day) + self._others_spent(tenant, day)
        if limits.teacher_usd_per_day and spent + usd > limits.teacher_usd_per_day:
            self._deny(call, "usd")
            raise TeacherBudgetExceeded(
                f"this key's teacher budget of {limits.teacher_usd_per_day} USD per day is spent "
                f"({spent:.6f} used, {usd:.6f} needed); it renews at 00:00 UTC",
                limit="usd",
                retry_after=(day + 1) * DAY - self._wall(),
            )
        if state.calls is not None:
            wait = state.calls.take(1, now)
            if wait:
                self._deny(call, "calls")
                raise TeacherBudgetExceeded(
                    f"this key's limit of {state.calls.per_minute} teacher calls per minute is reached; "
                    f"retry in {duration(wait)}",
                    limit="calls",
                    retry_after=wait,
                )
            state.use(CALLS, 1)
        state.spent_usd += usd
        state.moved.add(state.tenant)
        return TeacherGrant(state, usd, day)

    def settle_teacher(self, grant: TeacherGrant | None, usd: float | None) -> None:
        """Replace a call's estimate with its real cost; None keeps the estimate as the cost (a
        stream cut short: it cost something, and the estimate prices its whole `max_tokens`)."""
        if grant is None or not grant.open:
            return
        grant.open = False
        state = grant.state
        if usd is not None and state.day == grant.day:
            state.spent_usd = max(0.0, state.spent_usd + usd - grant.usd)
            state.moved.add(state.tenant)

    def _deny(self, call: str, limit: str) -> None:
        if self._metrics is not None:
            self._metrics.teacher_budget.labels(call, limit).inc()

    def usage(self, tenant: str) -> dict[str, Any]:
        """What the tenant has left now, and its teacher spend today (0 when not tracked)."""
        state = self._states.get(tenant)
        if state is None:
            return {"tracked": False}
        now = self._clock()
        left = {
            name: int(b.refill(now))
            for name, b in (("requests", state.requests), ("tokens", state.tokens), ("teacher_calls", state.calls))
            if b is not None
        }
        day = self.today()
        spent = state.spent(day) + self._others_spent(tenant, day)  # through every replica
        return {"tracked": True, "remaining": left, "teacher_usd_today": spent}

    # -- sharing with other replicas (gateway/usage.py) ----------------------------------------
    def _others_spent(self, tenant: str, day: int) -> float:
        return self._others_usd.get(tenant, 0.0) if self._others_day == day else 0.0

    def changes(self) -> dict[str, Totals]:
        """This process's totals for each key whose usage moved since they were last `sent`
        (a failed exchange's are still here: the totals are running sums, the newest wins)."""
        day = self.today()
        for tenant in self._moved:
            if (state := self._states.get(tenant)) is not None:
                requests, tokens, calls = state.used
                self._unsent[tenant] = Totals(requests, tokens, calls, day, state.spent(day), state.born)
        self._moved.clear()
        return dict(self._unsent)

    def sent(self, totals: dict[str, Totals]) -> None:
        """`totals` (from `changes`) are written: they need not go again unless they move."""
        for tenant, written in totals.items():
            if self._unsent.get(tenant) == written:
                del self._unsent[tenant]

    def take_others(self, rows: dict[tuple[str, str], Totals]) -> None:
        """Apply the other replicas' totals (`SharedUsage.exchange`): what each admitted since
        its row was last seen comes out of this process's buckets for the key, into debt if
        need be; their spend today counts against the key's daily budget. A row not seen before
        counts whole if its totals started after the previous look (a key new to that replica),
        and is only a baseline if they started earlier (this process has just started, and
        cannot tell what of them is recent)."""
        now, day, looked = self._clock(), self.today(), self._looked
        self._looked = self._wall()
        usd: dict[str, float] = {}
        for (replica, tenant), totals in rows.items():
            if totals.day == day and totals.usd > 0:
                usd[tenant] = usd.get(tenant, 0.0) + totals.usd
            before = self._seen.get((replica, tenant))
            self._seen[(replica, tenant)] = totals
            if before is None or before.born != totals.born:  # that replica's totals restarted
                if totals.born < looked - BORN_SLACK_S:
                    continue
                before = Totals(0.0, 0.0, 0.0, day, 0.0, totals.born)
            if not _any(self.limits(tenant)):
                continue
            state = None
            for kind in (REQUESTS, TOKENS, CALLS):
                delta = totals[kind] - before[kind]
                if delta > 0:
                    state = state or self._state(tenant, now)
                    bucket = (state.requests, state.tokens, state.calls)[kind]
                    if bucket is not None:
                        bucket.give(-delta, now)
        self._others_usd, self._others_day = usd, day
        if len(self._seen) > 2 * self._max_tenants:  # replicas and keys long gone
            self._seen = {k: v for k, v in self._seen.items() if k in rows}
