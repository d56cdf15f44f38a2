"""One dependency's resilience, composed in the right order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from random import Random
from typing import TypeVar

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.breaker import BreakerConfig, CircuitBreaker
from mercato.kit.resilience.budget import RetryBudget
from mercato.kit.resilience.bulkhead import Bulkhead
from mercato.kit.resilience.deadline import current_deadline, deadline_scope
from mercato.kit.resilience.errors import DeadlineExceeded, ResilienceError
from mercato.kit.resilience.hedging import hedged
from mercato.kit.resilience.hooks import Outcome, ResilienceHooks, RetryHooks
from mercato.kit.resilience.latency import LatencyTracker
from mercato.kit.resilience.registry import BreakerRegistry
from mercato.kit.resilience.retry import RetryPolicy, retry_call

__all__ = ["HedgeConfig", "ResiliencePolicy"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, kw_only=True)
class HedgeConfig:
    """Hedge after the tracker's `quantile`, or `fallback_delay_s` while it is cold; at most `max_hedges`."""

    quantile: float = 0.95
    fallback_delay_s: float | None = None
    max_hedges: int = 1


def _default_is_failure(exc: BaseException) -> bool:
    return isinstance(exc, Exception) and not isinstance(exc, ResilienceError)


class ResiliencePolicy:
    """Deadline, retries, hedging, breaker, bulkhead and per-attempt timeout for one dependency.

    Order, outermost first, and why::

        deadline scope      total budget for the logical call; everything below reads it
        retry (+ budget)    idempotent only; backoff never sleeps past the deadline; budget per retry
          hedging           reads only; a backup is a budgeted extra attempt
            breaker         per attempt: each attempt is a health sample, and an open breaker cuts
                            the remaining retries short (CircuitOpen is never retried)
              bulkhead      per attempt: limits what is really in flight at the dependency, hedges
                            included, and holds no slot during a backoff pause
                timeout     per attempt, min(timeout_s, deadline left); inside the breaker so a
                            timeout is recorded as the failure it is
                  call

    The breaker sits inside the retry loop (as in Resilience4j's recommended Retry(CircuitBreaker(...))
    rather than outside it: outside, three failed attempts would register as one failure and the breaker
    would trip three times later. It sits outside the bulkhead so an open circuit refuses in
    nanoseconds without queueing; a permit whose bulkhead wait fails is released as IGNORED.
    A timeout caused by the deadline (not by the dependency) is IGNORED by the breaker and surfaces
    as `DeadlineExceeded`.
    """

    def __init__(
        self,
        name: str,
        *,
        retry: RetryPolicy | None = None,
        total_timeout_s: float | None = None,
        breaker: CircuitBreaker | None = None,
        bulkhead: Bulkhead | None = None,
        budget: RetryBudget | None = None,
        latency: LatencyTracker | None = None,
        hedge: HedgeConfig | None = None,
        is_failure: Callable[[BaseException], bool] = _default_is_failure,
        clock: Clock | None = None,
        rng: Random | None = None,
        sleep: Sleep = asyncio.sleep,
        hooks: Sequence[RetryHooks] = (),
    ) -> None:
        self.name = name
        self.retry = retry or RetryPolicy()
        self.total_timeout_s = total_timeout_s
        self.breaker = breaker
        self.bulkhead = bulkhead
        self.budget = budget
        self.latency = latency
        self.hedge = hedge
        self._is_failure = is_failure
        self._clock: Clock = clock or SystemClock()
        self._rng = rng or Random()
        self._sleep = sleep
        self._hooks = tuple(hooks)

    @classmethod
    def for_dependency(
        cls,
        name: str,
        *,
        p95_s: float,
        margin_s: float = 0.05,
        max_attempts: int = 3,
        max_concurrent: int = 64,
        total_timeout_s: float | None = None,
        breakers: BreakerRegistry | None = None,
        hooks: Sequence[ResilienceHooks] = (),
        clock: Clock | None = None,
        rng: Random | None = None,
        sleep: Sleep = asyncio.sleep,
    ) -> ResiliencePolicy:
        """The guide's defaults, derived from the dependency's observed p95.

        - per-attempt `timeout_s = p95_s + max(margin_s, 0.25 * p95_s)` ("slightly above p95");
        - `max_attempts` 3 with full-jitter backoff from 50 ms, capped at 1 s;
        - a retry budget of 10 % of calls plus 1 retry/s;
        - a breaker tripping at 50 % failures or 50 % of calls slower than `p95_s` (normally 5 % are),
          over 10 s with at least 20 calls, or on 8 failures in a row (a dependency that went dead
          trips one timeout after it did, not once the window's successes slid out); open for 5 s,
          doubled per failed probe up to 60 s and jittered down by up to 20 %, then 1 probe;
        - a bulkhead of `max_concurrent` with a queue as long and a 100 ms queue wait;
        - hedging (for reads that ask for it) after the observed p95, `p95_s` while cold.
        """
        clock = clock or SystemClock()
        timeout_s = p95_s + max(margin_s, 0.25 * p95_s)
        config = BreakerConfig(
            slow_call_duration_s=p95_s, slow_call_rate_threshold=0.5, consecutive_failures=8
        )
        if breakers is not None:
            breaker = breakers.get(name, config=config)
        else:
            breaker = CircuitBreaker(name, config=config, clock=clock, hooks=hooks)
        return cls(
            name,
            retry=RetryPolicy(max_attempts=max_attempts, timeout_s=timeout_s, base_s=0.05, cap_s=1.0),
            total_timeout_s=total_timeout_s,
            breaker=breaker,
            bulkhead=Bulkhead(
                name,
                max_concurrent=max_concurrent,
                max_queue=max_concurrent,
                queue_timeout_s=0.1,
                hooks=hooks,
            ),
            budget=RetryBudget(ratio=0.1, min_retries_per_s=1.0, clock=clock),
            latency=LatencyTracker(),
            hedge=HedgeConfig(fallback_delay_s=p95_s),
            clock=clock,
            rng=rng,
            sleep=sleep,
            hooks=hooks,
        )

    async def call(
        self,
        fn: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        hedge: bool = False,
        result_is_failure: Callable[[T], bool] | None = None,
        retry_on_result: Callable[[T], bool] | None = None,
        extra_retry_on: tuple[type[BaseException], ...] = (),
    ) -> T:
        """Run `fn()` (a fresh awaitable per attempt) under the whole policy.

        `result_is_failure` marks returned values the breaker should count as failures (HTTP 5xx);
        `retry_on_result` marks those worth retrying (defaults to `result_is_failure`).
        `hedge` is honoured only for idempotent calls and when the policy has a `HedgeConfig`.
        """
        retry_policy = replace(
            self.retry,
            timeout_s=None,  # applied per attempt inside the breaker, below
            retry_on=self.retry.retry_on + extra_retry_on,
            retry_on_result=retry_on_result or result_is_failure or self.retry.retry_on_result,
        )
        hedge_config = self.hedge if hedge and idempotent else None

        async def attempt() -> T:
            if hedge_config is None:
                return await self._guarded(fn, result_is_failure)
            return await hedged(
                lambda: self._guarded(fn, result_is_failure),
                idempotent=True,
                delay_s=hedge_config.fallback_delay_s,
                tracker=self.latency,
                quantile=hedge_config.quantile,
                max_hedges=hedge_config.max_hedges,
                budget=self.budget,
                name=self.name,
                hooks=self._hooks,
                sleep=self._sleep,
            )

        with deadline_scope(timeout_s=self.total_timeout_s, clock=self._clock):
            return await retry_call(
                attempt,
                idempotent=idempotent,
                policy=retry_policy,
                name=self.name,
                budget=self.budget,
                clock=self._clock,
                rng=self._rng,
                sleep=self._sleep,
                hooks=self._hooks,
            )

    async def _guarded(
        self, fn: Callable[[], Awaitable[T]], result_is_failure: Callable[[T], bool] | None
    ) -> T:
        permit = self.breaker.acquire() if self.breaker is not None else None
        if self.bulkhead is not None:
            try:
                await self.bulkhead.acquire()
            except BaseException:
                if permit is not None:
                    permit.ignore()
                raise
        try:
            timeout_s = self.retry.timeout_s
            deadline = current_deadline()
            clipped = False
            if deadline is not None and (timeout_s is None or deadline.remaining_s() < timeout_s):
                timeout_s, clipped = deadline.remaining_s(), True
            started_s = self._clock.monotonic()
            try:
                with deadline_scope(timeout_s=timeout_s, clock=self._clock):
                    async with asyncio.timeout(timeout_s):
                        result = await fn()
            except TimeoutError as exc:
                if clipped:
                    if permit is not None:
                        permit.ignore()
                    raise DeadlineExceeded(
                        "the request deadline passed during the call", dependency=self.name
                    ) from exc
                if permit is not None:
                    permit.failure(duration_s=self._clock.monotonic() - started_s)
                raise
            except asyncio.CancelledError:
                if permit is not None:
                    permit.ignore()
                raise
            except BaseException as exc:
                if permit is not None:
                    outcome = Outcome.FAILURE if self._is_failure(exc) else Outcome.SUCCESS
                    permit.record(outcome, duration_s=self._clock.monotonic() - started_s)
                raise
            duration_s = self._clock.monotonic() - started_s
            failed = result_is_failure is not None and result_is_failure(result)
            if permit is not None:
                permit.record(Outcome.FAILURE if failed else Outcome.SUCCESS, duration_s=duration_s)
            if not failed and self.latency is not None:
                self.latency.record(duration_s)
            return result
        finally:
            if self.bulkhead is not None:
                self.bulkhead.release()
