"""Metrics of the real-time layer (guide §23: connected clients, fan-out latency, drops, reconnects)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NullRealtimeHook", "PrometheusRealtimeHook", "RealtimeHook"]


class RealtimeHook(Protocol):
    def connected(self, kind: str, delta: int) -> None: ...
    def fanout_latency(self, seconds: float) -> None:
        """From the event becoming durable to its frame being written to a socket: once per fan-out
        for the connections written straight to (ADR 0063), once per frame for queued ones."""
        ...

    def dropped(self, reason: str) -> None: ...
    def slow_consumer_closed(self) -> None: ...
    def resumed(self) -> None:
        """A subscription that named a `since`: a client coming back after a disconnect."""
        ...


class NullRealtimeHook:
    def connected(self, kind: str, delta: int) -> None:
        pass

    def fanout_latency(self, seconds: float) -> None:
        pass

    def dropped(self, reason: str) -> None:
        pass

    def slow_consumer_closed(self) -> None:
        pass

    def resumed(self) -> None:
        pass


class PrometheusRealtimeHook:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._connected = Gauge(
            "mercato_realtime_connections", "Open real-time connections.", ["kind"], registry=registry
        )
        self._latency = Histogram(
            "mercato_realtime_fanout_seconds",
            "Event durable -> frame written to the socket.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=registry,
        )
        self._dropped = Counter(
            "mercato_realtime_dropped_total",
            "Events not delivered, by reason.",
            ["reason"],
            registry=registry,
        )
        self._slow = Counter(
            "mercato_realtime_slow_consumer_closes_total",
            "Connections closed 1013 because their outbound queue stayed full.",
            registry=registry,
        )
        self._resumed = Counter(
            "mercato_realtime_resumes_total",
            "Subscriptions resumed from a seq (reconnections).",
            registry=registry,
        )

        self._registry = registry

    def watch_queued(self, queued_bytes: Callable[[], float]) -> None:
        """Export the bytes waiting in every outbound queue of this process, read at scrape time."""
        Gauge(
            "mercato_realtime_queued_bytes",
            "Bytes waiting in this process's per-connection outbound queues.",
            registry=self._registry,
        ).set_function(queued_bytes)

    def connected(self, kind: str, delta: int) -> None:
        self._connected.labels(kind).inc(delta)

    def fanout_latency(self, seconds: float) -> None:
        self._latency.observe(max(seconds, 0.0))

    def dropped(self, reason: str) -> None:
        self._dropped.labels(reason).inc()

    def slow_consumer_closed(self) -> None:
        self._slow.inc()

    def resumed(self) -> None:
        self._resumed.inc()
