"""Instrumentation hook for the idempotency middleware, and its Prometheus implementation."""

from __future__ import annotations

from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

__all__ = ["IdempotencyHook", "NullIdempotencyHook", "PrometheusIdempotencyMetrics"]


class IdempotencyHook(Protocol):
    """Called once per request outcome; must be cheap and must not raise."""

    def replayed(self) -> None:
        """A stored response was replayed."""
        ...

    def conflicted(self) -> None:
        """The key was reused for a different request (422)."""
        ...

    def rejected_in_flight(self) -> None:
        """The key's first request was still running (409)."""
        ...

    def stored(self) -> None:
        """A response was stored under a key."""
        ...

    def released(self) -> None:
        """A claim was given up (exception or 5xx) so the client may retry."""
        ...

    def purged(self, count: int) -> None:
        """`count` expired keys were deleted."""
        ...


class NullIdempotencyHook:
    def replayed(self) -> None:
        pass

    def conflicted(self) -> None:
        pass

    def rejected_in_flight(self) -> None:
        pass

    def stored(self) -> None:
        pass

    def released(self) -> None:
        pass

    def purged(self, count: int) -> None:
        pass


class PrometheusIdempotencyMetrics:
    """`mercato_idempotency_*_total` counters on the given registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._replays = Counter(
            "mercato_idempotency_replays_total",
            "Stored responses replayed for a repeated Idempotency-Key.",
            registry=registry,
        )
        self._conflicts = Counter(
            "mercato_idempotency_conflicts_total",
            "Idempotency-Key reused with a different request (answered 422).",
            registry=registry,
        )
        self._in_flight = Counter(
            "mercato_idempotency_in_flight_rejections_total",
            "Requests refused because the same Idempotency-Key was still in flight (answered 409).",
            registry=registry,
        )
        self._stored = Counter(
            "mercato_idempotency_stored_total",
            "Responses stored under an Idempotency-Key.",
            registry=registry,
        )
        self._released = Counter(
            "mercato_idempotency_released_total",
            "Idempotency-Key claims released after an exception or 5xx so the client may retry.",
            registry=registry,
        )
        self._purged = Counter(
            "mercato_idempotency_purged_total",
            "Expired Idempotency-Key rows deleted by the purge job.",
            registry=registry,
        )

    def replayed(self) -> None:
        self._replays.inc()

    def conflicted(self) -> None:
        self._conflicts.inc()

    def rejected_in_flight(self) -> None:
        self._in_flight.inc()

    def stored(self) -> None:
        self._stored.inc()

    def released(self) -> None:
        self._released.inc()

    def purged(self, count: int) -> None:
        self._purged.inc(count)
