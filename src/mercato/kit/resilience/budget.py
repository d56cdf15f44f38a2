"""A retry budget per dependency, so an outage cannot multiply the load it receives."""

from __future__ import annotations

from mercato.kit.clock import Clock, SystemClock

__all__ = ["RetryBudget"]

# Tolerance for float accumulation: ten deposits of 0.1 must buy exactly one retry.
_EPSILON = 1e-9


class RetryBudget:
    """A token bucket that first attempts fill and retries (and hedges) drain.

    Each first attempt deposits `ratio` tokens; each retry withdraws one; the bucket also refills at
    `min_retries_per_s` so a quiet service can still retry a little; the balance never exceeds
    `max_tokens`, so a long healthy spell cannot bank an unbounded burst of retries. Starting with
    `initial_tokens`, over any run of `calls` first attempts lasting `elapsed_s`::

        retries <= initial_tokens + ratio * calls + min_retries_per_s * elapsed_s

    so when the dependency fails every call, total attempts stay within
    `(1 + ratio) * calls + initial_tokens + min_retries_per_s * elapsed_s` whatever `max_attempts` says
    (Finagle's RetryBudget and gRPC's retry throttling work the same way).

    Not thread-safe: one instance per event loop, like everything in this package.
    """

    def __init__(
        self,
        *,
        ratio: float = 0.1,
        min_retries_per_s: float = 1.0,
        max_tokens: float = 100.0,
        initial_tokens: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        if ratio < 0 or min_retries_per_s < 0 or max_tokens < 1:
            raise ValueError("ratio and min_retries_per_s must be >= 0, max_tokens >= 1")
        self.ratio = ratio
        self.min_retries_per_s = min_retries_per_s
        self.max_tokens = max_tokens
        self._clock: Clock = clock or SystemClock()
        start = min_retries_per_s if initial_tokens is None else initial_tokens
        self._tokens = min(max_tokens, max(0.0, start))
        self._refilled_at = self._clock.monotonic()
        self.deposits = 0
        self.withdrawals = 0
        self.denials = 0

    @property
    def tokens(self) -> float:
        self._refill()
        return self._tokens

    def deposit(self) -> None:
        """Record a first attempt (a new logical call)."""
        self._refill()
        self.deposits += 1
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def try_withdraw(self) -> bool:
        """Take one token for a retry or hedge; False (and nothing taken) when the budget is spent."""
        self._refill()
        if self._tokens + _EPSILON < 1.0:
            self.denials += 1
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        self.withdrawals += 1
        return True

    def _refill(self) -> None:
        now = self._clock.monotonic()
        elapsed_s = now - self._refilled_at
        if elapsed_s > 0:
            self._tokens = min(self.max_tokens, self._tokens + elapsed_s * self.min_retries_per_s)
            self._refilled_at = now
