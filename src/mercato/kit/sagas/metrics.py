"""Instrumentation for the saga runner, and its Prometheus implementation.

The runner calls a `SagaHook` for every step outcome and every saga that reaches a terminal state;
the default does nothing, so the engine needs no registry. What an operator watches (guide §2,
"monitor sagas"): how long sagas take to finish, how often each step fails or is compensated, how
many end `failed` (a compensation gave up: an operator must look), and how many are stuck.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol
from weakref import WeakKeyDictionary

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mercato.kit.sagas.store import SagaStatus

__all__ = ["NullSagaHook", "PrometheusSagaHook", "SagaHook"]

# Seconds from a saga's start to its terminal state: checkout completes in well under a second when
# the providers answer, and a compensating one may take up to its deadline (120 s by default) or more.
TERMINAL_STATUSES = tuple(status.value for status in SagaStatus if status.terminal)
SAGA_DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)


class SagaHook(Protocol):
    def step(self, *, saga_type: str, step: str, direction: str, outcome: str) -> None: ...
    def finished(self, *, saga_type: str, status: str, duration_s: float) -> None: ...


class NullSagaHook:
    def step(self, *, saga_type: str, step: str, direction: str, outcome: str) -> None:
        return None

    def finished(self, *, saga_type: str, status: str, duration_s: float) -> None:
        return None


_BY_REGISTRY: WeakKeyDictionary[CollectorRegistry, PrometheusSagaHook] = WeakKeyDictionary()


class PrometheusSagaHook:
    """`mercato_saga_*`, labelled by saga type, step, direction and outcome (all small fixed sets).

    - `mercato_saga_step_attempts_total{direction="forward",outcome!="succeeded"}` over all forward
      attempts of a step: its failure rate; `direction="compensate"`: how often it is undone.
    - `mercato_saga_finished_total{status}` and `mercato_saga_duration_seconds`: time to terminal
      state; the checkout completion SLO counts `status="failed"` as bad.
    - `mercato_saga_stuck{saga_type,status}`: active sagas past their deadline by more than a grace
      period, set by the worker's watch job (`stuck`).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.steps = Counter(
            "mercato_saga_step_attempts_total",
            "Saga step attempts by step, direction (forward, compensate) and outcome "
            "(succeeded, failed, timed_out, rejected).",
            ["saga_type", "step", "direction", "outcome"],
            registry=registry,
        )
        self.finished_total = Counter(
            "mercato_saga_finished_total",
            "Sagas that reached a terminal state (completed, compensated, failed).",
            ["saga_type", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "mercato_saga_duration_seconds",
            "Time from a saga's start to its terminal state.",
            ["saga_type", "status"],
            buckets=SAGA_DURATION_BUCKETS,
            registry=registry,
        )
        self.stuck_gauge = Gauge(
            "mercato_saga_stuck",
            "Active sagas (running, compensating) past their deadline by more than the grace period.",
            ["saga_type", "status"],
            registry=registry,
        )
        self._stuck_seen: set[tuple[str, str]] = set()

    @classmethod
    def for_registry(cls, registry: CollectorRegistry) -> PrometheusSagaHook:
        """One hook per registry: a registry refuses a metric name registered twice."""
        hook = _BY_REGISTRY.get(registry)
        if hook is None:
            hook = _BY_REGISTRY[registry] = cls(registry)
        return hook

    def declare(self, saga_types: Iterable[str]) -> None:
        """Export every terminal state of these saga types at 0 before the first one ends there: a
        series that appears at 1 has no increase to rate, so its first event would be lost."""
        for saga_type in saga_types:
            for status in TERMINAL_STATUSES:
                self.finished_total.labels(saga_type, status)

    def step(self, *, saga_type: str, step: str, direction: str, outcome: str) -> None:
        self.steps.labels(saga_type, step, direction, outcome).inc()

    def finished(self, *, saga_type: str, status: str, duration_s: float) -> None:
        self.finished_total.labels(saga_type, status).inc()
        self.duration.labels(saga_type, status).observe(max(0.0, duration_s))

    def stuck(self, counts: dict[tuple[str, str], int]) -> None:
        """The watch job's latest count by (saga type, status); pairs it no longer sees drop to 0."""
        for labels in self._stuck_seen - counts.keys():
            self.stuck_gauge.labels(*labels).set(0)
        for (saga_type, status), count in counts.items():
            self.stuck_gauge.labels(saga_type, status).set(count)
        self._stuck_seen |= counts.keys()
