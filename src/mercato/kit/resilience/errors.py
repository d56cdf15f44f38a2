"""The errors the resilience layer raises on its own behalf (never the dependency's errors).

None of them is retried: each says "do not call the dependency now", and retrying it would only
spend the budget the retry layer exists to protect. The gateway maps them to 503/504 with Retry-After.
"""

from __future__ import annotations

__all__ = ["BulkheadFull", "CircuitOpen", "DeadlineExceeded", "ResilienceError"]


class ResilienceError(Exception):
    """Base class: the call was refused or abandoned by the resilience layer."""

    def __init__(self, message: str, *, dependency: str = "") -> None:
        super().__init__(message)
        self.dependency = dependency


class DeadlineExceeded(ResilienceError):
    """The request's overall deadline passed (or would pass) before the work could finish."""


class CircuitOpen(ResilienceError):
    """The dependency's breaker refuses calls; `retry_after_s` says when it will admit a probe."""

    def __init__(self, message: str, *, dependency: str = "", retry_after_s: float = 0.0) -> None:
        super().__init__(message, dependency=dependency)
        self.retry_after_s = retry_after_s


class BulkheadFull(ResilienceError):
    """Every slot for the dependency is busy and the wait queue is full or timed out."""
