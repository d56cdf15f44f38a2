"""Retries: idempotent operations only, full-jitter backoff, inside the deadline and the budget."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from random import Random
from typing import Any, TypeVar

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.resilience.backoff import full_jitter_backoff_s
from mercato.kit.resilience.budget import RetryBudget
from mercato.kit.resilience.deadline import current_deadline, deadline_scope
from mercato.kit.resilience.errors import DeadlineExceeded, ResilienceError
from mercato.kit.resilience.hooks import RetryHooks

__all__ = ["RetryPolicy", "is_testing", "retry_call", "set_testing"]

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]


@dataclass(slots=True)
class _TestingMode:
    enabled: bool = False
    max_attempts: int | None = None


_TESTING = _TestingMode()


def set_testing(enabled: bool, *, max_attempts: int | None = None) -> None:
    """The test switch (stamina's idea): no backoff pauses, and optionally fewer attempts.

    For application tests that exercise code whose sleep is not injected; unit tests of the retry
    logic itself pass `sleep=` instead.
    """
    _TESTING.enabled = enabled
    _TESTING.max_attempts = max_attempts if enabled else None


def is_testing() -> bool:
    return _TESTING.enabled


def _default_retryable() -> tuple[type[BaseException], ...]:
    return (TimeoutError, ConnectionError)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How one dependency is retried.

    - `max_attempts`: total attempts including the first (the guide's default: 2-3).
    - `timeout_s`: per-attempt timeout, near the dependency's p95 plus a margin; None = only the deadline.
    - `base_s`, `cap_s`: the full-jitter backoff, `uniform(0, min(cap_s, base_s * 2**retry_index))`.
    - `retry_on`: exception types worth another attempt (transient by nature). Errors of this package
      (`CircuitOpen`, `BulkheadFull`, `DeadlineExceeded`) are never retried whatever this says.
    - `retry_on_result`: a predicate marking a *returned* value as a retryable failure (an HTTP 503);
      after the last attempt that value is returned, not raised.
    """

    max_attempts: int = 3
    timeout_s: float | None = 1.0
    base_s: float = 0.05
    cap_s: float = 1.0
    retry_on: tuple[type[BaseException], ...] = field(default_factory=_default_retryable)
    retry_on_result: Callable[[Any], bool] | None = None

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError("timeout_s must be > 0 or None")
        if self.base_s < 0 or self.cap_s < 0:
            raise ValueError("base_s and cap_s must be >= 0")

    def is_retryable(self, exc: BaseException) -> bool:
        return isinstance(exc, self.retry_on) and not isinstance(exc, ResilienceError)

    def backoff_s(self, retry_index: int, *, rng: Random) -> float:
        """The pause before retry `retry_index + 1` (0 for the first retry)."""
        if _TESTING.enabled:
            return 0.0
        return full_jitter_backoff_s(retry_index, base_s=self.base_s, cap_s=self.cap_s, rng=rng)

    def attempts(self) -> int:
        if _TESTING.enabled and _TESTING.max_attempts is not None:
            return max(1, min(self.max_attempts, _TESTING.max_attempts))
        return self.max_attempts


_SYSTEM_CLOCK = SystemClock()
_SYSTEM_RANDOM = Random()


async def retry_call(
    fn: Callable[[], Awaitable[T]],
    *,
    idempotent: bool,
    policy: RetryPolicy | None = None,
    name: str = "",
    budget: RetryBudget | None = None,
    clock: Clock | None = None,
    rng: Random | None = None,
    sleep: Sleep = asyncio.sleep,
    hooks: Sequence[RetryHooks] = (),
) -> T:
    """Call `fn()` and retry it on transient failures, but only if `idempotent` is declared True.

    Before each retry: the pause is `full_jitter_backoff_s`; the retry is abandoned (the last error
    re-raised, or the last result returned) when the pause would reach the current deadline or the
    `budget` refuses a token. Each attempt runs under `min(timeout_s, deadline remaining)`, and under a
    deadline scope of that size, so a downstream call sees the time this attempt really has.
    A first attempt deposits into the budget whether or not it is retried: it is the load the ratio
    is measured against.
    """
    policy = policy or RetryPolicy()
    clock = clock or _SYSTEM_CLOCK
    rng = rng or _SYSTEM_RANDOM
    max_attempts = policy.attempts() if idempotent else 1
    if budget is not None:
        budget.deposit()
    attempt = 0
    while True:
        attempt += 1
        deadline = current_deadline()
        if deadline is not None:
            deadline.check(dependency=name)
        timeout_s = policy.timeout_s
        clipped_by_deadline = False
        if deadline is not None and (timeout_s is None or deadline.remaining_s() < timeout_s):
            timeout_s = deadline.remaining_s()
            clipped_by_deadline = True
        cause: BaseException | None = None
        timer = asyncio.timeout(timeout_s)
        try:
            with deadline_scope(timeout_s=timeout_s, clock=clock):
                async with timer:
                    result = await fn()
        except TimeoutError as exc:
            # Only our own timer firing at the deadline is the deadline's doing; a TimeoutError from
            # inside (a tighter per-attempt timeout, as `ResiliencePolicy` sets) is the attempt's.
            if clipped_by_deadline and timer.expired():
                raise DeadlineExceeded(
                    "the request deadline passed during the call", dependency=name
                ) from exc
            if not policy.is_retryable(exc):
                raise
            cause = exc
        except Exception as exc:
            if not policy.is_retryable(exc):
                raise
            cause = exc
        else:
            if policy.retry_on_result is None or not policy.retry_on_result(result):
                return result
        # A retryable failure (`cause`) or a retryable result.
        if not idempotent:
            _denied(hooks, name, "not_idempotent")
        elif attempt < max_attempts:
            wait_s = policy.backoff_s(attempt - 1, rng=rng)
            deadline = current_deadline()
            if deadline is not None and wait_s >= deadline.remaining_s():
                _denied(hooks, name, "deadline")
            elif budget is not None and not budget.try_withdraw():
                _denied(hooks, name, "budget")
            else:
                for hook in hooks:
                    hook.on_retry(name, attempt=attempt + 1, wait_s=wait_s, cause=cause)
                if wait_s > 0:
                    await sleep(wait_s)
                continue
        if cause is not None:
            raise cause
        return result


def _denied(hooks: Sequence[RetryHooks], name: str, reason: str) -> None:
    for hook in hooks:
        hook.on_retry_denied(name, reason=reason)
