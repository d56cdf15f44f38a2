"""Fail-open / fail-closed behind a circuit breaker, for limiters whose store can fail (Redis).

A limiter must not become the outage: when its store errs or is slow, the request gets a policy answer
(`fail_open=True` admits, `False` refuses) flagged `degraded=True`, within `timeout_s`. After
`failure_threshold` consecutive failures the breaker opens and the store is not called at all for
`reset_timeout_s` (a down Redis is not hammered by every request, and requests do not each wait a
timeout); then one trial call is let through, and its success closes the breaker.

Which policy: fail open where a brief lack of limiting costs little (browsing, reads); fail closed where
abuse is the bigger risk than a short refusal (login, password reset, payments attempts).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import TypeVar

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.health import Degraded
from mercato.kit.ratelimit.algorithms import ALGORITHMS, check_cost
from mercato.kit.ratelimit.base import BackendError, RateLimiter
from mercato.kit.ratelimit.limit import Decision, Limit
from mercato.kit.ratelimit.metrics import NoMetrics, RateLimitMetrics

__all__ = ["BreakerState", "ConsecutiveFailureBreaker", "ResilientLimiter"]

T = TypeVar("T")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class ConsecutiveFailureBreaker:
    """The smallest breaker that does the job: opens after `failure_threshold` consecutive failures.

    closed --N failures in a row--> open --`reset_timeout_s` later, one trial call--> half-open
    half-open --trial succeeds--> closed; --trial fails--> open again (for another `reset_timeout_s`).
    Kept private to the rate limiter on purpose; it can be swapped for `kit.resilience`'s breaker once that
    exists, since the limiter only uses `allow()`, `record_success()`, `record_failure()` and `state`.
    """

    def __init__(
        self, *, failure_threshold: int = 5, reset_timeout_s: float = 5.0, clock: Clock | None = None
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if reset_timeout_s <= 0:
            raise ValueError("reset_timeout_s must be > 0")
        self._threshold = failure_threshold
        self._reset_timeout_s = reset_timeout_s
        self._clock: Clock = clock or SystemClock()
        self._failures = 0
        self._opened_at_s = 0.0
        self._state = BreakerState.CLOSED

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def retry_after_s(self) -> float:
        """Seconds until the next trial call may be made (0 unless open)."""
        if self._state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at_s + self._reset_timeout_s - self._clock.monotonic())

    def allow(self) -> bool:
        """May the protected call be made now? In half-open, only the one trial call may."""
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN and self.retry_after_s() <= 0:
            self._state = BreakerState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def abandon_trial(self) -> None:
        """A half-open trial ended without a verdict (cancelled): let the next call be the trial."""
        if self._state is BreakerState.HALF_OPEN:
            self._state = BreakerState.OPEN
            self._opened_at_s = self._clock.monotonic() - self._reset_timeout_s

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self._state = BreakerState.OPEN
            self._opened_at_s = self._clock.monotonic()


class ResilientLimiter:
    """Wraps a limiter so that store failures become degraded policy decisions.

    Per call: breaker open -> policy answer without calling the store; otherwise the inner call runs under
    `asyncio.timeout(timeout_s)` (a backstop to the client's own socket timeout, left out when the inner
    limiter's `call_bound_s` already fits within `timeout_s`), and `BackendError`,
    `OSError` or a timeout count as a failure and return the policy answer. Caller bugs (`ValueError` for an
    impossible cost) are not failures and propagate.
    """

    def __init__(
        self,
        inner: RateLimiter,
        *,
        fail_open: bool,
        timeout_s: float = 0.25,
        failure_threshold: int = 5,
        reset_timeout_s: float = 5.0,
        clock: Clock | None = None,
        metrics: RateLimitMetrics | None = None,
    ) -> None:
        self._inner = inner
        self._fail_open = fail_open
        self._timeout_s = timeout_s
        self._metrics: RateLimitMetrics = metrics or NoMetrics()
        self._breaker = ConsecutiveFailureBreaker(
            failure_threshold=failure_threshold, reset_timeout_s=reset_timeout_s, clock=clock
        )
        self._reported_degraded = False
        self._metrics.degraded(algorithm=inner.algorithm, backend=inner.backend, active=False)
        # A timer per decision costs ~5 µs on uvloop (a tenth of an empty request): skip it when the inner
        # limiter already bounds every call within our budget (the pipelined connection's watchdog).
        bound_s = getattr(inner, "call_bound_s", None)
        self._timer_needed = not (isinstance(bound_s, int | float) and bound_s <= timeout_s)

    @property
    def algorithm(self) -> str:
        return self._inner.algorithm

    @property
    def backend(self) -> str:
        return self._inner.backend

    @property
    def inner(self) -> RateLimiter:
        return self._inner

    @property
    def fail_open(self) -> bool:
        return self._fail_open

    @property
    def breaker(self) -> ConsecutiveFailureBreaker:
        return self._breaker

    @property
    def timer_needed(self) -> bool:
        """Whether each call runs under our own `asyncio.timeout` (the inner one does not bound itself)."""
        return self._timer_needed

    def healthy(self) -> bool:
        """False while decisions come from the policy rather than the store (the breaker is not closed)."""
        return self._breaker.state is BreakerState.CLOSED

    async def readiness_check(self) -> None:
        """For `HealthRegistry.add_check`: while the store is down, `Degraded` when failing open (every
        request is still served: the node stays ready) and `BackendError` when failing closed."""
        if not self.healthy():
            if self._fail_open:
                raise Degraded("rate limiter store unavailable; failing open")
            raise BackendError("rate limiter store unavailable; failing closed")

    async def hit(self, key: str, limit: Limit, *, cost: int = 1) -> Decision:
        check_cost(cost, capacity=self._capacity(limit))
        decision = await self._guarded(lambda: self._inner.hit(key, limit, cost=cost))
        return decision if decision is not None else self._policy_decision(limit, cost=cost)

    async def peek(self, key: str, limit: Limit) -> Decision:
        decision = await self._guarded(lambda: self._inner.peek(key, limit))
        return decision if decision is not None else self._policy_decision(limit, cost=1, count=False)

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T | None:
        """The inner call's result, or None when the policy must answer (breaker open, or the call failed)."""
        if not self._breaker.allow():
            return None
        try:
            if self._timer_needed:
                async with asyncio.timeout(self._timeout_s):
                    result = await call()
            else:
                result = await call()
        except (BackendError, OSError, TimeoutError) as exc:
            self._failed(exc)
            return None
        except BaseException:
            # Cancelled, or a caller bug: not the store's fault, but a half-open trial must not stay pending.
            self._breaker.abandon_trial()
            raise
        self._succeeded()
        return result

    def _policy_decision(self, limit: Limit, *, cost: int, count: bool = True) -> Decision:
        capacity = self._capacity(limit)
        if count:
            outcome = "degraded_allowed" if self._fail_open else "degraded_limited"
            self._metrics.decision(algorithm=self.algorithm, backend=self.backend, outcome=outcome)
        if self._fail_open:
            return Decision(True, capacity, max(0, capacity - cost), 0.0, 0.0, degraded=True)
        # Refuse until the breaker's next trial: the earliest moment an answer could change.
        wait_s = max(self._breaker.retry_after_s(), self._timeout_s)
        return Decision(False, capacity, 0, wait_s, wait_s, degraded=True)

    def _capacity(self, limit: Limit) -> int:
        core = ALGORITHMS.get(self.algorithm)
        return core.capacity(limit) if core is not None else limit.capacity

    def _failed(self, exc: BaseException) -> None:
        self._metrics.backend_error(algorithm=self.algorithm, backend=self.backend, error=type(exc).__name__)
        self._breaker.record_failure()
        self._report_degraded()

    def _succeeded(self) -> None:
        self._breaker.record_success()
        self._report_degraded()

    def _report_degraded(self) -> None:
        degraded = not self.healthy()
        if degraded != self._reported_degraded:
            self._reported_degraded = degraded
            self._metrics.degraded(algorithm=self.algorithm, backend=self.backend, active=degraded)
