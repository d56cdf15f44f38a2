"""Instrumentation hooks. Every component takes a sequence of hooks (empty by default) and calls each.

Hooks run inline on the call path, so they must be cheap and must not do I/O (a Prometheus counter
increment is fine; a log line is acceptable; a network call is not).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Protocol

__all__ = ["BreakerHooks", "BreakerState", "BulkheadHooks", "Outcome", "ResilienceHooks", "RetryHooks"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Outcome(StrEnum):
    """How one call to a dependency ended, as far as the dependency's health is concerned."""

    SUCCESS = "success"
    FAILURE = "failure"
    # Neither: cancelled by our side, or refused before it reached the dependency.
    IGNORED = "ignored"


class BreakerHooks(Protocol):
    def on_state_change(self, name: str, old: BreakerState | None, new: BreakerState) -> None:
        """A transition; `old` is None once, when the breaker is created."""
        ...

    def on_call(self, name: str, outcome: Outcome, duration_s: float) -> None:
        """A call the breaker admitted has finished."""
        ...

    def on_rejected(self, name: str) -> None:
        """A call was refused with `CircuitOpen`."""
        ...


class RetryHooks(Protocol):
    def on_retry(self, name: str, *, attempt: int, wait_s: float, cause: BaseException | None) -> None:
        """Attempt number `attempt` (2 for the first retry) will start after `wait_s`."""
        ...

    def on_retry_denied(self, name: str, *, reason: str) -> None:
        """A retryable failure was not retried: reason is "budget", "deadline" or "not_idempotent"."""
        ...

    def on_hedge(self, name: str) -> None:
        """A backup request was started."""
        ...


class BulkheadHooks(Protocol):
    def on_bulkhead_rejected(self, name: str) -> None:
        """A call was refused with `BulkheadFull`."""
        ...


class ResilienceHooks(BreakerHooks, RetryHooks, BulkheadHooks, Protocol):
    """All of the above: what a full metrics implementation provides (`PrometheusResilienceHooks`)."""
