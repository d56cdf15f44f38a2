"""Counters and histograms the event loop records into without a lock.

prometheus_client guards every value with a lock: a counter's `inc` takes one, a histogram's `observe`
two (its sum, then its bucket), because any thread may record. A request served on the event loop
recorded about ten of them (its count, its latency, its API version, its wait for a concurrency slot,
its cache lookup), each an acquire and a release, and nothing else the loop does needs them.

`LoopCounter` and `LoopHistogram` are the prometheus_client metrics, unchanged for every existing
caller (`inc`, `observe`, `labels`, the registry, the exposition), with one more method on each child,
`record`: it adds to plain fields that only the loop's thread writes. Collecting the metric (a scrape,
`registry.get_sample_value`) reports the locked value plus those fields, never resetting them, so a
reader on any thread sees every recording made before it, and names, labels, buckets and the
/metrics text stay exactly what they were.

`record` is for the thread that runs the event loop, and only it: two threads recording into one
child could lose an increment between them. Everything else keeps calling `inc` or `observe`.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable

from prometheus_client import Counter, Histogram
from prometheus_client.samples import Sample

__all__ = ["LoopCounter", "LoopHistogram"]


class LoopCounter(Counter):
    """A `Counter` whose children also take `record(amount)`, unlocked, from the event loop's thread."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._recorded = 0.0

    def record(self, amount: float = 1.0) -> None:
        # Callers pass non-negative amounts (one request, one lookup): no check on this path.
        self._recorded += amount

    def reset(self) -> None:
        # Counter's own reset, and what was recorded (from the loop's thread, as `record`).
        super().reset()
        self._recorded = 0.0

    def _child_samples(self) -> Iterable[Sample]:
        recorded = self._recorded
        if not recorded:
            return super()._child_samples()
        return tuple(
            sample._replace(value=sample.value + recorded) if sample.name == "_total" else sample
            for sample in super()._child_samples()
        )


class LoopHistogram(Histogram):
    """A `Histogram` whose children also take `record(value)`, unlocked, from the event loop's thread."""

    def _metric_init(self) -> None:
        super()._metric_init()
        self._recorded_sum = 0.0
        # Per bucket, not cumulative, as the locked buckets are kept; the last bound is +Inf.
        self._recorded_counts = [0] * len(self._upper_bounds)

    def record(self, value: float) -> None:
        # The first bucket whose upper bound is >= value: the one `observe` would increment.
        self._recorded_counts[bisect_left(self._upper_bounds, value)] += 1
        self._recorded_sum += value

    def _child_samples(self) -> Iterable[Sample]:
        samples = super()._child_samples()
        counts = self._recorded_counts
        if not any(counts):
            return samples
        added = 0
        adjusted: list[Sample] = []
        bucket = 0
        for sample in samples:
            if sample.name == "_bucket":
                added += counts[bucket]
                bucket += 1
                sample = sample._replace(value=sample.value + added)
            elif sample.name == "_count":
                sample = sample._replace(value=sample.value + added)
            elif sample.name == "_sum":
                sample = sample._replace(value=sample.value + self._recorded_sum)
            adjusted.append(sample)
        return tuple(adjusted)
