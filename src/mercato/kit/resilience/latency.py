"""A small streaming latency tracker: a ring buffer of recent durations and its quantiles."""

from __future__ import annotations

import math

__all__ = ["LatencyTracker"]


class LatencyTracker:
    """The last `capacity` durations; `quantile(q)` is the nearest-rank quantile over them.

    A ring buffer rather than a decaying histogram: exact over the recent past, forgets old regimes
    after `capacity` calls, and at a few hundred samples sorting on read (only after new samples,
    ~10 µs) is cheaper than maintaining a histogram on every write. Below `min_samples` it
    answers None: a p95 from five calls is noise, and callers fall back to a configured delay.
    """

    def __init__(self, *, capacity: int = 256, min_samples: int = 20) -> None:
        if capacity < 1 or not 1 <= min_samples <= capacity:
            raise ValueError("capacity must be >= 1 and 1 <= min_samples <= capacity")
        self.capacity = capacity
        self.min_samples = min_samples
        self._samples: list[float] = []
        self._next = 0
        self._sorted: list[float] | None = None

    def __len__(self) -> int:
        return len(self._samples)

    def record(self, duration_s: float) -> None:
        if len(self._samples) < self.capacity:
            self._samples.append(duration_s)
        else:
            self._samples[self._next] = duration_s
        self._next = (self._next + 1) % self.capacity
        self._sorted = None

    def quantile(self, q: float) -> float | None:
        """Nearest rank: the smallest sample with at least `q` of the samples <= it."""
        if not 0.0 < q <= 1.0:
            raise ValueError("q must be in (0, 1]")
        if len(self._samples) < self.min_samples:
            return None
        if self._sorted is None:
            self._sorted = sorted(self._samples)
        rank = math.ceil(q * len(self._sorted))
        return self._sorted[max(0, rank - 1)]

    def p95_s(self) -> float | None:
        return self.quantile(0.95)
