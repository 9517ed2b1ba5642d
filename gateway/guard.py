"""What stands in front of each tier: admission, a deadline, retries on a budget, a circuit breaker.

`TierGuard.lease()` is the one way the service reaches a backend. A lease is granted only if
the tier's breaker lets the call through and there is room: at most `max_inflight` calls run,
at most `max_queue` wait, none longer than `server.queue_timeout_s`. Past that the caller gets
`TierOverloaded` at once (a 503 with Retry-After), so overload is shed instead of queued, and
the service can tell the gateway's own overload from a tier that is really failing
(`TierCircuitOpen`, or a backend error). The breaker opens on consecutive failures or on an
error ratio over a window, and lets one half-open probe through per `open_s`. Retries follow
Envoy's model: only before the first byte, only on connection errors and 5xx, and only while
retries stay within `retry_budget` of the calls made.

It does not decide what a failure means for a request (escalate, serve the draft, or answer
503): `service.py` does. Per-tenant rate limits are not here either.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from typing import Literal

from gateway.errors import TierCircuitOpen, TierOverloaded
from gateway.settings import BreakerConfig, TierGuardConfig
from models import BackendError, BackendResponseError, BackendTimeout, BackendUnavailable, InvalidGenerationRequest

log = logging.getLogger(__name__)
BreakerState = Literal["closed", "half_open", "open"]


def counts_as_failure(exc: BaseException) -> bool:
    """Whether an error says the tier is unwell. A bad request, or a 429 (the tier is busy and
    says so), is not; neither is our own refusal."""
    if isinstance(exc, (InvalidGenerationRequest, TierOverloaded, TierCircuitOpen)):
        return False
    if isinstance(exc, BackendResponseError):
        return exc.status_code is None or exc.status_code >= 500
    return isinstance(exc, BackendError)


def retryable(exc: BaseException) -> bool:
    """Connection errors and 5xx, before the first byte. Not a timeout: the deadline covers
    every try, so a timed-out call has none left (Envoy: per-try timeout unset)."""
    if isinstance(exc, (TierOverloaded, TierCircuitOpen, BackendTimeout)):
        return False
    if isinstance(exc, BackendUnavailable):
        return True
    return isinstance(exc, BackendResponseError) and exc.status_code is not None and exc.status_code >= 500


class _Window:
    """Counts over the last `span` seconds in one-second buckets: memory is O(span), not O(calls)."""

    def __init__(self, span: float, clock: Callable[[], float]) -> None:
        self._n = max(1, int(span))
        self._clock = clock
        self._slots: deque[list[int]] = deque()  # [second, a, b]

    def add(self, a: int = 0, b: int = 0) -> None:
        now = int(self._clock())
        if not self._slots or self._slots[-1][0] != now:
            self._slots.append([now, 0, 0])
        slot = self._slots[-1]
        slot[1] += a
        slot[2] += b

    def totals(self) -> tuple[int, int]:
        cutoff = int(self._clock()) - self._n
        while self._slots and self._slots[0][0] <= cutoff:
            self._slots.popleft()
        return sum(s[1] for s in self._slots), sum(s[2] for s in self._slots)

    def clear(self) -> None:
        self._slots.clear()


class Breaker:
    """Closed → open on failures; open → half-open after `open_s`; one probe decides."""

    def __init__(
        self,
        config: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState], None] | None = None,
    ) -> None:
        self.config = config
        self._clock = clock
        self._on_change = on_change
        self.state: BreakerState = "closed"
        self._consecutive = 0
        self._calls = _Window(config.window_s, clock)  # (calls, failures)
        self._opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a call may go to the tier now; a True in half-open is the probe."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self._opened_at < self.config.open_s:
                return False
            self._set("half_open")
        if self._probing:
            return False
        self._probing = True
        return True

    def retry_in(self) -> float:
        """Seconds until an open breaker lets a probe through."""
        return max(0.0, self.config.open_s - (self._clock() - self._opened_at)) if self.state == "open" else 0.0

    def record(self, outcome: Literal["ok", "failed", "ignored"]) -> None:
        """The outcome of a call `allow` let through. `ignored`: it says nothing about the
        tier's health (cancelled by the client, a bad request); a probe slot is freed."""
        probe, self._probing = self._probing, False
        if outcome == "ignored":
            return
        if outcome == "ok":
            self._consecutive = 0
            self._calls.add(1, 0)
            if self.state == "half_open" and probe:
                self._calls.clear()
                self._set("closed")
            return
        self._consecutive += 1
        self._calls.add(1, 1)
        if self.state == "half_open" or self._tripped():
            self._opened_at = self._clock()
            self._set("open")

    def trip(self) -> None:
        """Open a closed breaker without a failed call (a tier that answers nothing)."""
        if self.state == "closed":
            self._opened_at = self._clock()
            self._set("open")

    def _tripped(self) -> bool:
        if self.state != "closed":
            return False
        if self._consecutive >= self.config.consecutive_failures:
            return True
        calls, failures = self._calls.totals()
        return calls >= self.config.min_calls and failures >= self.config.failure_ratio * calls

    def _set(self, state: BreakerState) -> None:
        if state != self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)


class Admission:
    """At most `limit` holders; at most `max_queue` waiters, each for at most `timeout` seconds."""

    def __init__(self, limit: int, max_queue: int, timeout: float) -> None:
        self.limit = limit
        self.max_queue = max_queue
        self.timeout = timeout
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.inflight < self.limit and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self, tier: str) -> float:
        """Take a slot, waiting in line if need be; returns the seconds waited."""
        if self.try_acquire():
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise TierOverloaded(f"{tier} tier is at capacity ({self.limit} running, {self.max_queue} waiting)")
        started = time.perf_counter()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter), self.timeout)
        except TimeoutError:
            if not waiter.done():
                self._waiters.remove(waiter)
                waiter.cancel()
                raise TierOverloaded(
                    f"{tier} tier is at capacity: no slot within the queue timeout of {self.timeout:g}s"
                ) from None
            # The slot was handed over just as the wait ran out: keep it.
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release()  # handed a slot while being cancelled: pass it on
            else:
                self._waiters.remove(waiter)
                waiter.cancel()
            raise
        return time.perf_counter() - started

    def release(self) -> None:
        """Hand the slot to the next waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        self.inflight -= 1


class RetryBudget:
    """Retries allowed while they stay under `ratio` of the calls in the last 10 s, plus 3."""

    MIN_RETRIES = 3

    def __init__(self, ratio: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.ratio = ratio
        self._window = _Window(10.0, clock)  # (calls, retries)

    def called(self) -> None:
        self._window.add(1, 0)

    def try_retry(self) -> bool:
        calls, retries = self._window.totals()
        if retries >= self.ratio * calls + self.MIN_RETRIES:
            return False
        self._window.add(0, 1)
        return True


class Lease:
    """One granted call on a tier: the slot is held until `done`, which also tells the breaker."""

    __slots__ = ("_guard", "background", "deadline", "_done")

    def __init__(self, guard: TierGuard, deadline: float, background: bool = False) -> None:
        self._guard = guard
        self.deadline = deadline  # loop.time() by which the call must have finished
        self.background = background  # taken without waiting: work no client waits on
        self._done = False

    def done(self, exc: BaseException | None = None) -> None:
        if self._done:
            return
        self._done = True
        if exc is None:
            self._guard.breaker.record("ok")
        else:
            self._guard.breaker.record("failed" if counts_as_failure(exc) else "ignored")
        self._guard.admission.release()
        if self.background:
            self._guard.background -= 1
        self._guard.progress()


class TierGuard:
    """Admission, breaker and retry budget for one tier."""

    def __init__(
        self,
        tier: str,
        config: TierGuardConfig,
        *,
        capacity: int,
        queue_timeout_s: float,
        default_stall_s: float = 0.0,
        on_change: Callable[[BreakerState], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tier = tier
        self.config = config
        self.admission = Admission(config.max_inflight or capacity, config.max_queue, queue_timeout_s)
        self.background = 0  # of the calls in flight, those leased without waiting (`lease`)
        self.breaker = Breaker(config.breaker, clock=clock, on_change=on_change)
        self.retries = RetryBudget(config.retry_budget, clock)
        self._clock = clock
        self.stall_s = config.breaker.stall_s if config.breaker.stall_s is not None else default_stall_s
        self._progress = clock()  # when a call last finished, or the tier last went from idle to busy

    async def lease(self, *, wait: bool = True) -> tuple[Lease, float]:
        """A slot on the tier and the seconds waited for it. Raises `TierCircuitOpen` while the
        breaker refuses, `TierOverloaded` when there is no room (at once if `wait` is False)."""
        self._check_stall()
        if not self.breaker.allow():
            raise TierCircuitOpen(
                f"{self.tier} tier is failing: circuit open, next probe in {self.breaker.retry_in():.1f}s",
                retry_after=self.breaker.retry_in(),
            )
        try:
            if wait:
                waited = await self.admission.acquire(self.tier)
            elif self.admission.try_acquire():
                waited = 0.0
            else:
                raise TierOverloaded(f"{self.tier} tier is at capacity")
        except BaseException:
            self.breaker.record("ignored")  # frees a half-open probe slot
            raise
        self.retries.called()
        if self.admission.inflight == 1:
            self._progress = self._clock()  # busy from idle: the stall clock starts now
        self.background += not wait
        return Lease(self, asyncio.get_running_loop().time() + self.config.deadline_s, not wait), waited

    @property
    def foreground(self) -> int:
        """Calls in flight that a client waits on (leased with `wait`): background work
        (audits, labels, the missed escalations' backlog) takes only a free slot, never waits."""
        return self.admission.inflight - self.background

    def progress(self) -> None:
        self._progress = self._clock()

    def _check_stall(self) -> None:
        """A hung tier fails no call until the deadline: open the breaker when calls are
        running and none has finished for `breaker.stall_s`."""
        stall = self.stall_s
        if stall and self.admission.inflight and self._clock() - self._progress >= stall:
            if self.breaker.state == "closed":
                log.warning("%s tier stalled: %d calls running, none finished in %.0fs", self.tier,
                            self.admission.inflight, stall)  # fmt: skip
            self.breaker.trip()

    def may_retry(self, exc: BaseException, attempt: int) -> bool:
        return attempt < self.config.max_retries and retryable(exc) and self.retries.try_retry()

    @staticmethod
    async def backoff(attempt: int) -> None:
        """Envoy's: 25 ms base, doubling, full jitter."""
        await asyncio.sleep(random.uniform(0, 0.025 * 2**attempt))


class LogThrottle:
    """At most one log line per key per `every_s`; the lines held back are counted in the next.
    A dead tier fails every call, and a line per call buried the logs (8,886 in 20 s)."""

    def __init__(self, every_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}

    def warning(self, logger: logging.Logger, key: str, msg: str, *args: object) -> None:
        now = self._clock()
        last, held = self._last.get(key, (-1e18, 0))
        if now - last < self.every_s:
            self._last[key] = (last, held + 1)
            return
        self._last[key] = (now, 0)
        if held:
            logger.warning(msg + " (and %d more like it since the last line)", *args, held, stacklevel=2)
        else:
            logger.warning(msg, *args, stacklevel=2)
