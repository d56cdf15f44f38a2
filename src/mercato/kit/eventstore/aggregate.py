"""The event-sourced aggregate base: state changes only by applying events.

Pure on purpose (stdlib only): a domain model subclasses it without pulling in the database.
A command method checks the invariants against the current state, then calls `record`, which
applies the event and queues it for saving. `apply` is the only place state changes, and it depends
on nothing but the state and the event, so folding the stored events rebuilds the same state.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar, Self

__all__ = ["Aggregate", "PendingEvent"]

PendingEvent = tuple[str, dict[str, Any]]
"""(type, data) of an event recorded but not yet saved."""


class Aggregate(ABC):
    """One consistency boundary, stored as the stream `"{category}-{id}"`.

    `version` is the number of events applied (saved or not); `saved_version` is what the store
    holds, the expected version of the next append.
    """

    category: ClassVar[str]

    def __init__(self, aggregate_id: str) -> None:
        self.id = aggregate_id
        self.version = 0
        self._pending: list[PendingEvent] = []

    @property
    def stream_id(self) -> str:
        return f"{self.category}-{self.id}"

    @property
    def saved_version(self) -> int:
        return self.version - len(self._pending)

    @property
    def pending(self) -> list[PendingEvent]:
        return list(self._pending)

    @abstractmethod
    def apply(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Change the state by one event. No checks (events are facts), no I/O, no clock."""

    @abstractmethod
    def snapshot(self) -> dict[str, Any]:
        """The state as JSON-serializable data (everything `restore` needs)."""

    @abstractmethod
    def restore(self, state: Mapping[str, Any]) -> None:
        """Set the state from `snapshot()`'s output."""

    def record(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Apply a new event and queue it for saving (for command methods)."""
        payload = dict(data)
        self.apply(event_type, payload)
        self.version += 1
        self._pending.append((event_type, payload))

    def replay(self, event_type: str, data: Mapping[str, Any]) -> None:
        """Apply a stored event (loading)."""
        self.apply(event_type, data)
        self.version += 1

    def mark_saved(self) -> None:
        self._pending.clear()

    @classmethod
    def from_snapshot(cls, aggregate_id: str, *, version: int, state: Mapping[str, Any]) -> Self:
        aggregate = cls(aggregate_id)
        aggregate.restore(state)
        aggregate.version = version
        return aggregate
