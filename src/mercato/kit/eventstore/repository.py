"""Load and save aggregates through the event store, with snapshots and a conflict retry."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.eventstore.aggregate import Aggregate
from mercato.kit.eventstore.batch import StreamAppend, append_streams, load_streams
from mercato.kit.eventstore.store import ConcurrencyConflict, EventStore, NewEvent, RecordedEvent
from mercato.kit.storage import Database

__all__ = ["AggregateRepository", "retry_on_conflict"]

A = TypeVar("A", bound=Aggregate)
T = TypeVar("T")


class AggregateRepository(Generic[A]):
    """`load` = latest snapshot + the events after it; `save` = append the pending events with the
    loaded version as the expected version, then snapshot when the stream crossed a multiple of
    `snapshot_every` (so a load never folds more than `snapshot_every - 1 + batch` events)."""

    def __init__(self, store: EventStore, aggregate_type: type[A], *, snapshot_every: int = 50) -> None:
        if snapshot_every < 1:
            raise ValueError("snapshot_every must be >= 1")
        self._store = store
        self._type = aggregate_type
        self.snapshot_every = snapshot_every

    def stream_id(self, aggregate_id: str) -> str:
        return f"{self._type.category}-{aggregate_id}"

    async def load(self, conn: AsyncConnection, aggregate_id: str) -> A:
        """The aggregate at its latest version (version 0 when it has no events yet)."""
        stream_id = self.stream_id(aggregate_id)
        snapshot = await self._store.latest_snapshot(conn, stream_id)
        if snapshot is None:
            aggregate = self._type(aggregate_id)
        else:
            aggregate = self._type.from_snapshot(aggregate_id, version=snapshot.version, state=snapshot.state)
        for event in await self._store.load(conn, stream_id, after_version=aggregate.version):
            aggregate.replay(event.type, event.data)
        return aggregate

    async def load_many(
        self, conn: AsyncConnection, aggregate_ids: Iterable[str], *, lock_for_append: bool = False
    ) -> dict[str, A]:
        """`load` of several aggregates in one statement on PostgreSQL (`batch.load_streams`); with
        `lock_for_append` it also takes the event store's append lock for `save_many(locked=True)`."""
        ids = list(dict.fromkeys(aggregate_ids))
        states = await load_streams(
            self._store, conn, [self.stream_id(i) for i in ids], lock_for_append=lock_for_append
        )
        loaded: dict[str, A] = {}
        for aggregate_id in ids:
            state = states[self.stream_id(aggregate_id)]
            snapshot = state.snapshot
            if snapshot is None:
                aggregate = self._type(aggregate_id)
            else:
                aggregate = self._type.from_snapshot(
                    aggregate_id, version=snapshot.version, state=snapshot.state
                )
            for event in state.events:
                aggregate.replay(event.type, event.data)
            loaded[aggregate_id] = aggregate
        return loaded

    async def save_many(
        self,
        conn: AsyncConnection,
        changes: Sequence[tuple[A, Sequence[Mapping[str, Any]]]],
        *,
        now: datetime,
        locked: bool = False,
    ) -> set[str]:
        """`save` of several aggregates in one statement on PostgreSQL (`batch.append_streams`),
        each pending event with its own metadata (`changes`: an aggregate and one metadata mapping
        per pending event). Returns the ids of the aggregates whose stream moved on since they were
        loaded: nothing of theirs is written and they keep their pending events (reload, decide
        again); the others are saved, and snapshotted when they crossed a multiple of
        `snapshot_every`."""
        appends: list[StreamAppend] = []
        for aggregate, metadata in changes:
            pending = aggregate.pending
            if len(metadata) != len(pending):
                raise ValueError(f"{aggregate.stream_id}: one metadata mapping per pending event")
            if pending:
                appends.append(
                    StreamAppend(
                        aggregate.stream_id,
                        [NewEvent(t, d, dict(m)) for (t, d), m in zip(pending, metadata, strict=True)],
                        aggregate.saved_version,
                    )
                )
        outcome = await append_streams(self._store, conn, appends, now=now, locked=locked)
        conflicted: set[str] = set()
        for aggregate, _metadata in changes:
            if aggregate.stream_id in outcome.conflicts:
                conflicted.add(aggregate.id)
                continue
            before = aggregate.saved_version
            aggregate.mark_saved()
            if aggregate.version // self.snapshot_every > before // self.snapshot_every:
                await self._store.save_snapshot(
                    conn, aggregate.stream_id, version=aggregate.version, state=aggregate.snapshot()
                )
        return conflicted

    async def replay(self, conn: AsyncConnection, aggregate_id: str) -> A:
        """The aggregate folded from its first event, ignoring snapshots (audits, snapshot checks)."""
        aggregate = self._type(aggregate_id)
        for event in await self._store.load(conn, self.stream_id(aggregate_id)):
            aggregate.replay(event.type, event.data)
        return aggregate

    async def history(self, conn: AsyncConnection, aggregate_id: str) -> list[RecordedEvent]:
        return await self._store.load(conn, self.stream_id(aggregate_id))

    async def save(
        self, conn: AsyncConnection, aggregate: A, *, metadata: Mapping[str, Any] | None = None
    ) -> list[RecordedEvent]:
        """Append the pending events; raises `ConcurrencyConflict` if the stream moved on."""
        pending = aggregate.pending
        if not pending:
            return []
        before = aggregate.saved_version
        recorded = await self._store.append(
            conn,
            aggregate.stream_id,
            [NewEvent(event_type, data, dict(metadata or {})) for event_type, data in pending],
            expected_version=before,
        )
        aggregate.mark_saved()
        if aggregate.version // self.snapshot_every > before // self.snapshot_every:
            await self._store.save_snapshot(
                conn, aggregate.stream_id, version=aggregate.version, state=aggregate.snapshot()
            )
        return recorded


async def retry_on_conflict(
    db: Database,
    operation: Callable[[AsyncConnection], Awaitable[T]],
    *,
    conn: AsyncConnection | None = None,
    max_attempts: int = 5,
    base_delay_s: float = 0.005,
    rng: random.Random | None = None,
) -> T:
    """Run `operation` (load, decide, save) until it commits without a `ConcurrencyConflict`.

    Each attempt reloads, so the decision is taken again on the state the winner left. With `conn`
    each attempt runs in a savepoint of the caller's transaction (a message handler's, so the inbox
    record commits with the effect); otherwise in a write transaction of its own. Between attempts
    it sleeps a full-jitter delay of `uniform(0, base_delay_s * 2**attempt)`, so the losers of one
    race do not collide again at once. The last conflict is re-raised.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    jitter = rng or random.Random()
    for attempt in range(max_attempts):
        try:
            if conn is not None:
                async with conn.begin_nested():
                    return await operation(conn)
            async with db.write() as own:
                return await operation(own)
        except ConcurrencyConflict:
            if attempt == max_attempts - 1:
                raise
            await asyncio.sleep(jitter.uniform(0, base_delay_s * 2**attempt))
    raise AssertionError("unreachable: the loop returns or raises")
