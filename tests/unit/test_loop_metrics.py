"""kit/observability/loop_metrics.py: what a child records without a lock is exposed exactly as if the
same values had gone through prometheus_client's locked `inc` and `observe`: same names, labels,
buckets and values in the /metrics text, mixed freely with `inc` and `observe`."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from mercato.kit.observability.loop_metrics import LoopCounter, LoopHistogram

_BUCKETS = (0.001, 0.01, 0.1, 1.0)
# Exactly on a bound (counted in that bucket), between bounds, below the first, above the last (+Inf).
_VALUES = (0.001, 0.0005, 0.01, 0.05, 0.1, 0.999, 1.0, 7.5, 0.0, 0.002)


def _exposition(registry: CollectorRegistry) -> list[str]:
    # `_created` lines carry each metric's creation time, which differs between two registries.
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_recorded_and_incremented_counts_are_exposed_as_the_locked_counter_exposes_them() -> None:
    plain, loop = CollectorRegistry(), CollectorRegistry()
    expected = Counter("demo_requests", "Requests.", ["route"], registry=plain)
    counter = LoopCounter("demo_requests", "Requests.", ["route"], registry=loop)
    for _ in range(5):
        counter.labels("/a").record()
        expected.labels("/a").inc()
    counter.labels("/a").inc(2)
    expected.labels("/a").inc(2)
    counter.labels("/b").record(3)
    expected.labels("/b").inc(3)
    assert _exposition(loop) == _exposition(plain)
    assert loop.get_sample_value("demo_requests_total", {"route": "/a"}) == 7.0
    assert loop.get_sample_value("demo_requests_total", {"route": "/b"}) == 3.0
    counter.labels("/b").reset()
    assert loop.get_sample_value("demo_requests_total", {"route": "/b"}) == 0.0


def test_recorded_values_fall_in_the_buckets_observe_would_put_them_in() -> None:
    plain, loop = CollectorRegistry(), CollectorRegistry()
    expected = Histogram("demo_seconds", "Latency.", ["route"], buckets=_BUCKETS, registry=plain)
    histogram = LoopHistogram("demo_seconds", "Latency.", ["route"], buckets=_BUCKETS, registry=loop)
    for value in _VALUES:
        histogram.labels("/a").record(value)
        expected.labels("/a").observe(value)
    histogram.labels("/a").observe(0.3)  # the locked path still works, and adds up with the other
    expected.labels("/a").observe(0.3)
    assert _exposition(loop) == _exposition(plain)
    assert loop.get_sample_value("demo_seconds_count", {"route": "/a"}) == len(_VALUES) + 1
    assert loop.get_sample_value("demo_seconds_bucket", {"route": "/a", "le": "0.001"}) == 3.0
    assert loop.get_sample_value("demo_seconds_bucket", {"route": "/a", "le": "+Inf"}) == len(_VALUES) + 1


def test_every_scrape_reports_all_recordings_so_far_and_consumes_none() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("demo_events", "Events.", registry=registry)
    histogram = LoopHistogram("demo_wait_seconds", "Wait.", buckets=_BUCKETS, registry=registry)
    counter.record()
    histogram.record(0.05)
    first = _exposition(registry)
    assert first == _exposition(registry)
    counter.record()
    histogram.record(0.5)
    assert registry.get_sample_value("demo_events_total") == 2.0
    assert registry.get_sample_value("demo_wait_seconds_count") == 2.0
    assert registry.get_sample_value("demo_wait_seconds_sum") == 0.55
