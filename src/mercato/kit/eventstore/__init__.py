"""Event sourcing: an append-only event store with optimistic concurrency, snapshots and replay.

`EventStore.append(conn, stream_id, events, expected_version=)` is the write path; a version clash
raises `ConcurrencyConflict`. `Aggregate` is the pure base for event-sourced domain objects;
`AggregateRepository` loads them (snapshot + later events) and saves them (append + snapshot every
N events); `retry_on_conflict` reloads and re-decides after a conflict. ADR 0016 says why this is
ours rather than the `eventsourcing` library.
"""

from mercato.kit.eventstore.aggregate import Aggregate, PendingEvent
from mercato.kit.eventstore.repository import AggregateRepository, retry_on_conflict
from mercato.kit.eventstore.store import ConcurrencyConflict, EventStore, NewEvent, RecordedEvent, Snapshot
from mercato.kit.eventstore.tables import events, snapshots

__all__ = [
    "Aggregate",
    "AggregateRepository",
    "ConcurrencyConflict",
    "EventStore",
    "NewEvent",
    "PendingEvent",
    "RecordedEvent",
    "Snapshot",
    "events",
    "retry_on_conflict",
    "snapshots",
]
