"""Instrumentation for projectors, and its Prometheus implementation.

The projector calls a `ProjectionHook`; the default does nothing, so the kit needs no registry.
"""

from __future__ import annotations

from typing import Protocol
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["NullProjectionHook", "ProjectionHook", "PrometheusProjectionHook"]


class ProjectionHook(Protocol):
    def applied(self, *, projection: str, messages: int) -> None: ...
    def lag(self, *, projection: str, messages: int) -> None: ...
    def rebuilt(self, *, projection: str, messages: int, duration_s: float) -> None: ...


class NullProjectionHook:
    def applied(self, *, projection: str, messages: int) -> None:
        return None

    def lag(self, *, projection: str, messages: int) -> None:
        return None

    def rebuilt(self, *, projection: str, messages: int, duration_s: float) -> None:
        return None


_BY_REGISTRY: WeakKeyDictionary[CollectorRegistry, PrometheusProjectionHook] = WeakKeyDictionary()


class PrometheusProjectionHook:
    """`mercato_projection_*` metrics labelled by projection name (a small, fixed set).

    `mercato_projection_lag_messages` is the read side's staleness in messages: log entries on the
    projection's topics it has not applied yet. Build it with `for_registry` when several parts of
    a process may ask for it: a registry refuses a metric name registered twice.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.lag_gauge = Gauge(
            "mercato_projection_lag_messages",
            "Stream messages on a projection's topics not yet applied to its read model.",
            ["projection"],
            registry=registry,
        )
        self.applied_total = Counter(
            "mercato_projection_applied_messages_total",
            "Messages applied to read models.",
            ["projection"],
            registry=registry,
        )
        self.drift_rows = Gauge(
            "mercato_projection_drift_rows",
            "Read-model rows that disagreed with the write model at the last reconciliation check.",
            ["projection"],
            registry=registry,
        )
        self.reconciled_total = Counter(
            "mercato_projection_reconciled_rows_total",
            "Read-model rows (or keys) compared with the write model by reconciliation checks.",
            ["projection"],
            registry=registry,
        )
        self.rebuild_seconds = Histogram(
            "mercato_projection_rebuild_duration_seconds",
            "Duration of a full replay-and-swap rebuild.",
            ["projection"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> PrometheusProjectionHook:
        hook = _BY_REGISTRY.get(registry)
        if hook is None:
            hook = _BY_REGISTRY[registry] = cls(registry)
        return hook

    def applied(self, *, projection: str, messages: int) -> None:
        self.applied_total.labels(projection).inc(messages)

    def lag(self, *, projection: str, messages: int) -> None:
        self.lag_gauge.labels(projection).set(messages)

    def rebuilt(self, *, projection: str, messages: int, duration_s: float) -> None:
        self.rebuild_seconds.labels(projection).observe(duration_s)

    def reconciled(self, *, projection: str, checked: int, drift_rows: int) -> None:
        """A reconciliation check's outcome (not part of `ProjectionHook`: the projector does not
        check itself; the read side's owner does, against its write model)."""
        self.reconciled_total.labels(projection).inc(checked)
        self.drift_rows.labels(projection).set(drift_rows)
