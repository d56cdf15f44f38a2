"""What the event store's integration suites share: a small aggregate, stream ids and events, and a
database whose events and snapshots are emptied after the test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy import delete

from mercato.kit.eventstore import Aggregate, NewEvent, events, snapshots
from mercato.kit.storage import Database, create_database


class Counter(Aggregate):
    """The smallest aggregate: increments whose total must never pass `limit`."""

    category = "counter"
    limit = 1_000

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.total = 0

    def increment(self, by: int = 1) -> None:
        if self.total + by > self.limit:
            raise ValueError("limit passed")
        self.record("incremented", {"by": by})

    def apply(self, event_type: str, data: Mapping[str, Any]) -> None:
        self.total += int(data["by"])

    def snapshot(self) -> dict[str, Any]:
        return {"total": self.total}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.total = int(state["total"])


def stream() -> str:
    return f"s-{uuid.uuid4().hex[:12]}"


def evt(n: int) -> NewEvent:
    return NewEvent("happened", {"n": n}, {"source": "tests"})


@asynccontextmanager
async def event_store_database(url: str, pool_size: int) -> AsyncIterator[Database]:
    """A database on URL; after the test, its events and snapshots deleted and its pool closed."""
    database = create_database(url, pool_size=pool_size, max_overflow=pool_size)
    try:
        yield database
    finally:
        async with database.write() as conn:
            await conn.execute(delete(events))
            await conn.execute(delete(snapshots))
        await database.dispose()
