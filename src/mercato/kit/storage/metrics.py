"""Prometheus implementation of the replica set's hook: lag per replica, rotation, routed reads."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["PrometheusReplicaMetrics"]


class PrometheusReplicaMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._lag_bytes = Gauge(
            "mercato_db_replica_lag_bytes",
            "WAL bytes a replica has not replayed yet",
            ["replica"],
            registry=registry,
        )
        self._lag_s = Gauge(
            "mercato_db_replica_lag_seconds",
            "Age of the last transaction a lagging replica replayed (0 when caught up)",
            ["replica"],
            registry=registry,
        )
        self._in_rotation = Gauge(
            "mercato_db_replica_in_rotation",
            "1 while a replica may serve reads",
            ["replica"],
            registry=registry,
        )
        self._routed = Counter(
            "mercato_db_reads_routed",
            "Reads that accepted staleness, by who served them",
            ["target", "reason"],
            registry=registry,
        )

    def replica_state(self, name: str, *, lag_bytes: int, lag_s: float, in_rotation: bool) -> None:
        self._lag_bytes.labels(name).set(lag_bytes)
        self._lag_s.labels(name).set(lag_s)
        self._in_rotation.labels(name).set(1 if in_rotation else 0)

    def read_routed(self, target: str, reason: str) -> None:
        self._routed.labels(target, reason).inc()
