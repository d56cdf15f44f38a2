"""The open-loop timetable: when each request is due, independent of when earlier ones finished.

Request ``i`` of a run at ``rate_per_s`` is due at ``t0 + i / rate_per_s``. When several generator
processes share one run, process ``k`` of ``n`` takes requests ``k, k + n, k + 2n, ...``: the union
of their timetables is exactly the single-process one, so the offered load does not depend on how
many processes send it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Timetable:
    """A fixed schedule of ``count`` requests for one generator process.

    ``due_s(j) = t0_s + (offset + j * stride) / rate_per_s`` for ``0 <= j < count``, where
    ``rate_per_s`` is the rate of the whole run, ``stride`` the number of processes sharing it and
    ``offset`` this process's index among them.
    """

    t0_s: float
    rate_per_s: float
    count: int
    stride: int = 1
    offset: int = 0

    def __post_init__(self) -> None:
        if not (self.rate_per_s > 0 and math.isfinite(self.rate_per_s)):
            raise ValueError("rate_per_s must be a positive finite number")
        if self.count < 0:
            raise ValueError("count must not be negative")
        if self.stride < 1 or not 0 <= self.offset < self.stride:
            raise ValueError("need stride >= 1 and 0 <= offset < stride")

    @classmethod
    def for_run(
        cls, *, t0_s: float, rate_per_s: float, duration_s: float, processes: int = 1, index: int = 0
    ) -> Timetable:
        """Process ``index``'s share of a run of ``rate_per_s * duration_s`` requests (rounded down)."""
        total = total_requests(rate_per_s=rate_per_s, duration_s=duration_s)
        share = len(range(index, total, processes))
        return cls(t0_s=t0_s, rate_per_s=rate_per_s, count=share, stride=processes, offset=index)

    def due_s(self, j: int) -> float:
        """The intended send time of this process's ``j``-th request."""
        return self.t0_s + (self.offset + j * self.stride) / self.rate_per_s

    def due_by(self, now_s: float, start: int = 0) -> int:
        """The index one past the last request due at or before ``now_s`` (at least ``start``).

        The scheduler dispatches requests ``start .. due_by(now) - 1`` in one batch when it wakes,
        so a late wake-up sends the backlog at once instead of silently dropping it.
        """
        if now_s < self.t0_s:
            return start
        slots = math.floor((now_s - self.t0_s) * self.rate_per_s)  # global index due by now
        if slots < self.offset:
            return start
        mine = (slots - self.offset) // self.stride + 1
        # Float rounding can put `mine` one past a request whose due time is a hair after now.
        while mine > 0 and self.due_s(mine - 1) > now_s:
            mine -= 1
        return max(start, min(self.count, mine))

    @property
    def end_s(self) -> float:
        """When the schedule's span ends: ``t0`` plus the run's nominal duration for this share."""
        return self.t0_s + self.span_s

    @property
    def span_s(self) -> float:
        """The nominal length of the schedule, ``count * stride / rate`` (never zero for a non-empty one)."""
        return self.count * self.stride / self.rate_per_s


def total_requests(*, rate_per_s: float, duration_s: float) -> int:
    """How many requests a run of ``duration_s`` at ``rate_per_s`` schedules (at least one)."""
    if duration_s <= 0:
        raise ValueError("duration_s must be positive")
    return max(1, math.floor(rate_per_s * duration_s + 1e-9))
