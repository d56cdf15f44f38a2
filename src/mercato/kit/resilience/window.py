"""A time-bucketed rolling window of call outcomes: O(1) record and O(1) rates."""

from __future__ import annotations

from dataclasses import dataclass

from mercato.kit.clock import Clock

__all__ = ["RollingWindow", "WindowCounts"]


@dataclass(frozen=True, slots=True)
class WindowCounts:
    calls: int
    failures: int
    slow_calls: int

    @property
    def failure_rate(self) -> float:
        return self.failures / self.calls if self.calls else 0.0

    @property
    def slow_call_rate(self) -> float:
        return self.slow_calls / self.calls if self.calls else 0.0


class RollingWindow:
    """Counts over the last `window_s`, kept in `buckets` slots of `window_s / buckets` each.

    A slot is cleared when time moves past it, so the window slides in steps of one slot and
    memory stays fixed however heavy the traffic. Running totals make reading the rates O(1).
    """

    def __init__(self, *, window_s: float, buckets: int, clock: Clock) -> None:
        if window_s <= 0 or buckets < 1:
            raise ValueError("window_s must be > 0 and buckets >= 1")
        self._bucket_s = window_s / buckets
        self._size = buckets
        self._clock = clock
        self._calls = [0] * buckets
        self._failures = [0] * buckets
        self._slow = [0] * buckets
        self._total_calls = 0
        self._total_failures = 0
        self._total_slow = 0
        self._head = self._bucket_index()

    def record(self, *, failure: bool, slow: bool) -> None:
        self._advance()
        slot = self._head % self._size
        self._calls[slot] += 1
        self._total_calls += 1
        if failure:
            self._failures[slot] += 1
            self._total_failures += 1
        if slow:
            self._slow[slot] += 1
            self._total_slow += 1

    def counts(self) -> WindowCounts:
        self._advance()
        return WindowCounts(self._total_calls, self._total_failures, self._total_slow)

    def reset(self) -> None:
        for series in (self._calls, self._failures, self._slow):
            series[:] = [0] * self._size
        self._total_calls = self._total_failures = self._total_slow = 0
        self._head = self._bucket_index()

    def _bucket_index(self) -> int:
        return int(self._clock.monotonic() // self._bucket_s)

    def _advance(self) -> None:
        now = self._bucket_index()
        steps = now - self._head
        if steps <= 0:
            return
        if steps >= self._size:
            self.reset()
            return
        for index in range(self._head + 1, now + 1):
            slot = index % self._size
            self._total_calls -= self._calls[slot]
            self._total_failures -= self._failures[slot]
            self._total_slow -= self._slow[slot]
            self._calls[slot] = self._failures[slot] = self._slow[slot] = 0
        self._head = now
