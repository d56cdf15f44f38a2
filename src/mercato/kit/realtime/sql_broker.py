"""`SqlBroker`: the broker port over one append-only table, for embedded mode and for several API
processes on one PostgreSQL without Redis or NATS.

Each subscriber reads `id > low_water` when woken by a publish (a work signal, kit/storage/signals.py:
at once in this process, by NOTIFY from other processes on PostgreSQL) and at the latest every
`poll_interval_s` (the safety poll). On PostgreSQL an identity value can
commit after a larger one, so ids are not seen in order: the subscriber remembers the ids it has
seen above its low-water mark and moves the mark past a missing id only once that id has been
missing for `gap_grace_s` (a rolled-back insert never appears). Rows older than `retention_s` are
deleted by whichever subscriber gets there first.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

from sqlalchemy import delete, func, insert, select

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.observability import get_logger
from mercato.kit.realtime.broker import Subscription, SubscriptionReaders
from mercato.kit.realtime.events import ChannelEvent
from mercato.kit.realtime.tables import broker_log
from mercato.kit.storage import Database
from mercato.kit.storage.cancellation import stop_if_cancelled

__all__ = ["SqlBroker"]

_log = get_logger("mercato.realtime.sql_broker")

# The work signal a committed publish fires; subscribers wait on it between reads.
BROKER_CHANNEL = "realtime_broker"


class SqlBroker:
    def __init__(
        self,
        db: Database,
        *,
        poll_interval_s: float = 2.0,
        gap_grace_s: float = 2.0,
        retention_s: float = 60.0,
        batch: int = 500,
        clock: Clock | None = None,
    ) -> None:
        self._db = db
        self.poll_interval_s = poll_interval_s
        self.gap_grace_s = gap_grace_s
        self.retention_s = retention_s
        self._batch = batch
        self._clock = clock or SystemClock()
        self._readers = SubscriptionReaders()

    async def publish(self, event: ChannelEvent) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        """Events in order, in one transaction (one commit and one wake-up for a persisted batch)."""
        if not events:
            return
        signals = self._db.signals
        now = self._clock.now()
        async with self._db.write() as conn:
            await conn.execute(
                insert(broker_log), [{"payload": e.to_bytes(), "created_at": now} for e in events]
            )
            signals.after_commit(conn, BROKER_CHANNEL)
            if signals.cross_process:
                await conn.execute(signals.notify_sql(BROKER_CHANNEL))

    async def subscribe(self) -> Subscription:
        async with self._db.read() as conn:
            start = int(
                (await conn.execute(select(func.coalesce(func.max(broker_log.c.id), 0)))).scalar_one()
            )
        return self._readers.start(
            lambda subscription: self._poll(subscription, start), name="realtime-sql-broker"
        )

    async def unsubscribe(self, subscription: Subscription) -> None:
        await self._readers.stop(subscription)

    async def aclose(self) -> None:
        await self._readers.stop_all()

    async def _poll(self, subscription: Subscription, low_water: int) -> None:
        seen: set[int] = set()
        missing_since: dict[int, float] = {}
        last_prune = 0.0
        signals = self._db.signals
        while True:
            rows: list[tuple[int, bytes]] = []
            mark = signals.mark((BROKER_CHANNEL,))
            try:
                async with self._db.read() as conn:
                    result = (
                        await conn.execute(
                            select(broker_log.c.id, broker_log.c.payload)
                            .where(broker_log.c.id > low_water)
                            .order_by(broker_log.c.id)
                            .limit(self._batch)
                        )
                    ).all()
                rows = [(int(r[0]), bytes(r[1])) for r in result]
                now = time.monotonic()
                for row_id, payload in rows:
                    if row_id in seen:
                        continue
                    seen.add(row_id)
                    missing_since.pop(row_id, None)
                    subscription.put(ChannelEvent.from_bytes(payload))
                if rows:
                    top = max(seen)
                    for gap in range(low_water + 1, top):
                        if gap not in seen:
                            missing_since.setdefault(gap, now)
                # The mark advances over seen ids and over ids missing for longer than the grace.
                while (low_water + 1) in seen or (
                    (low_water + 1) in missing_since and now - missing_since[low_water + 1] > self.gap_grace_s
                ):
                    low_water += 1
                    seen.discard(low_water)
                    missing_since.pop(low_water, None)
                if now - last_prune > self.retention_s / 4:
                    last_prune = now
                    await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a failed poll (database down) is retried, never fatal
                stop_if_cancelled()
                _log.exception("sql_broker_poll_failed")
                await asyncio.sleep(1.0)
            stop_if_cancelled()
            if len(rows) < self._batch:
                # An id missing from a gap is looked for again soon, not at the safety poll.
                timeout_s = self.poll_interval_s if not missing_since else min(self.poll_interval_s, 0.1)
                await signals.wait((BROKER_CHANNEL,), since=mark, timeout_s=timeout_s)

    async def _prune(self) -> None:
        cutoff = self._clock.now() - timedelta(seconds=self.retention_s)
        async with self._db.write() as conn:
            # The newest row always stays: on SQLite the id is the rowid, which restarts at 1 in an
            # empty table, and every subscriber waiting for `id > low_water` would then wait forever.
            newest = select(func.max(broker_log.c.id)).scalar_subquery()
            await conn.execute(
                delete(broker_log).where(broker_log.c.created_at < cutoff, broker_log.c.id < newest)
            )
