"""Notifications use cases: react to order events (a `Consumer` handler) and list the records."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Consumer, Message, MessagingHook, Stream
from mercato.kit.storage import Database
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.schemas import read_message
from mercato.shop.notifications.model import drafts_for
from mercato.shop.notifications.tables import notifications

CONSUMER_GROUP = "notifications"
TOPIC = "mercato.orders"


@dataclass(frozen=True, slots=True)
class Notification:
    id: uuid.UUID
    event_id: uuid.UUID
    event_type: str
    channel: str
    order_id: uuid.UUID
    recipient: str
    subject: str
    body: str
    status: str
    created_at: datetime
    # Delivery (see delivery.py): e-mails only; webhooks stay pending.
    attempts: int = 0
    last_error: str | None = None
    next_attempt_at: datetime | None = None
    sent_at: datetime | None = None


class NotificationsService:
    def __init__(self, db: Database, clock: Clock) -> None:
        self._db = db
        self._clock = clock

    def consumer(
        self, stream: Stream, *, name: str, max_messages: int = 100, hook: MessagingHook | None = None
    ) -> Consumer:
        """The `mercato.orders` subscriber: inbox dedup and `handle` in one transaction."""
        return Consumer(
            self._db,
            stream,
            topic=TOPIC,
            group=CONSUMER_GROUP,
            name=name,
            handler=self.handle,
            batch_handler=self.handle_batch,
            max_messages=max_messages,
            hook=hook,
            reader=read_message,  # `handle` sees every order event as its current schema version
        )

    async def handle(self, conn: AsyncConnection, message: Message) -> None:
        """Record the event's notifications in the caller's transaction; returns quietly for a
        (event, channel) already recorded, so it is safe even without the inbox in front."""
        await self.handle_batch(conn, (message,))

    async def handle_batch(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """`handle` for a consumer pass's new messages at once: one statement for all of them."""
        now = self._clock.now()
        rows = [
            {
                "id": new_id(),
                "event_id": message.id,
                "event_type": message.type,
                "channel": d.channel.value,
                "order_id": uuid.UUID(str(message.data["order_id"])),
                "recipient": d.recipient,
                "subject": d.subject,
                "body": d.body,
                "status": "pending",
                "created_at": now,
            }
            for message in messages
            for d in drafts_for(message.type, str(message.id), message.data)
        ]
        if not rows:
            return
        # One statement on the raw-driver layer, prepared once per row count: an (event, channel)
        # already recorded is skipped by its unique key (was a SELECT of the recorded channels and
        # an INSERT through SQLAlchemy per event, then an INSERT per event until the batch handler).
        await on_connection(conn).insert_ignore(notifications, rows, conflict=["event_id", "channel"])

    async def list(
        self, *, order_id: uuid.UUID | None, limit: int, after_id: uuid.UUID | None = None
    ) -> tuple[list[Notification], bool]:
        """Newest first, keyset by id (UUIDv7); and whether more follow."""
        n = notifications.c
        stmt = select(notifications)
        if order_id is not None:
            stmt = stmt.where(n.order_id == order_id)
        if after_id is not None:
            stmt = stmt.where(n.id < after_id)
        stmt = stmt.order_by(n.id.desc()).limit(limit + 1)
        async with self._db.read() as conn:
            rows = [Notification(**dict(r._mapping)) for r in await conn.execute(stmt)]
        return rows[:limit], len(rows) > limit


async def purge_settled(db: Database, clock: Clock, *, kept_days: int, batch: int = 1000) -> int:
    """Delete notifications sent or failed more than `kept_days` ago (privacy.md: 90 days). A rendered
    mail is personal to its recipient and its use ends once it is delivered and any complaint about
    it is answered."""
    cutoff = clock.now() - timedelta(days=kept_days)
    n = notifications.c
    async with db.write() as conn:
        ids = (
            select(n.id)
            .where(n.status.in_(("sent", "failed")), n.created_at < cutoff)
            .limit(batch)
            .scalar_subquery()
        )
        result = await conn.execute(delete(notifications).where(n.id.in_(ids)))
        return int(result.rowcount)
