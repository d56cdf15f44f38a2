"""Chat use cases: rooms, membership, and the message path WebSocket -> stream -> persist -> fan-out.

A `send` is published to the `mercato.chat` stream with the room id as partition key (guide §17:
one room's messages are one partition's order), and `ChatPersister` (a consumer group running in
every API process) stores each message with the room's next seq, deduplicated by
(room, sender, client_msg_id), then publishes it to every process for fan-out. The sender's ack
rides on that publish, so it is sent only once the message is persisted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import and_, bindparam, delete, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Delivery, LagReporter, Message, MessagingHook, Stream
from mercato.kit.observability import get_logger
from mercato.kit.realtime import ChannelEvent
from mercato.kit.storage import Database
from mercato.kit.storage.statements import DriverReads, driver_prepared
from mercato.shop.chat.membership import MembershipCache
from mercato.shop.chat.model import (
    ChatMessage,
    InvalidRoom,
    Room,
    RoomNotFound,
    room_channel,
    room_from_channel,
)
from mercato.shop.chat.shardmap import ShardMap
from mercato.shop.chat.shards import ChatShards, Draft, Position, recent_messages
from mercato.shop.chat.tables import members, messages, rooms

__all__ = ["CHAT_GROUP", "CHAT_SENDS", "CHAT_TOPIC", "ChatHistory", "ChatPersister", "ChatService"]

_log = get_logger("mercato.chat")

_ROOM_EXISTS = driver_prepared(
    select(rooms.c.id).where(rooms.c.id == bindparam("room", type_=rooms.c.id.type))
)
_IS_MEMBER = driver_prepared(
    select(members.c.user_id).where(
        and_(
            members.c.room_id == bindparam("room", type_=members.c.room_id.type),
            members.c.user_id == bindparam("user", type_=members.c.user_id.type),
        )
    )
)

CHAT_TOPIC = "mercato.chat"
CHAT_GROUP = "mercato.chat.persist"
# The work signal (kit/storage/signals.py) that chat sends reaching the stream fire, and only the chat
# persisters wait on. Announced on the shared stream channel, every send also woke the order feed
# (two stream reads for nothing) and every other consumer waiting there, in every process.
CHAT_SENDS = "chat_sends"
MAX_MEMBERS = 1000

# order id -> its customer's user id (None: no such order); the orders context, injected.
OrderOwner = Callable[[uuid.UUID], Awaitable[str | None]]


class ChatService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        order_owner: OrderOwner,
        history_ttl_s: int,
        shards: ChatShards | None = None,
        membership_ttl_s: float = 5.0,
    ) -> None:
        self._db = db
        # `may_read`'s "yes" answers (ADR 0056): the send path's membership read, cached.
        self.membership = MembershipCache(ttl_s=membership_ttl_s)
        self._refreshing: set[asyncio.Task[None]] = set()  # held until done (the loop keeps weak refs)
        self._reads = DriverReads(db)
        # Called after a member is removed (the gateway tells every process's hub: ACCESS_REVOKED).
        self._on_removed: list[Callable[[uuid.UUID, str], Awaitable[None]]] = []
        # Messages live on the shards (one: the main database, unless MERCATO_CHAT_SHARD_URLS says more).
        self.shards = shards or ChatShards(db, clock, initial=ShardMap.initial([]))
        self._clock = clock
        self._order_owner = order_owner
        self.history_ttl_s = history_ttl_s

    # -- rooms and members ---------------------------------------------------------------------

    async def create_room(self, name: str, member_ids: Sequence[str], *, created_by: str) -> Room:
        if len(set(member_ids)) > MAX_MEMBERS:
            raise InvalidRoom(f"a room has at most {MAX_MEMBERS} members")
        room = Room(new_id(), name, "group", None, created_by, self._clock.now())
        async with self._db.write() as conn:
            await self._insert_room(conn, room, {created_by, *member_ids})
        return room

    async def support_room(self, order_id: uuid.UUID, *, caller: str, staff: bool) -> Room:
        """The order's support room (made on first use): its customer and staff. A customer may open
        only its own order's room; another's is "not found" (it may not learn that it exists)."""
        owner = await self._order_owner(order_id)
        if owner is None or (not staff and owner != caller):
            raise RoomNotFound(f"order {order_id} not found")
        async with self._db.read() as conn:
            found = await self._room_where(conn, rooms.c.order_id == order_id)
        if found is not None:
            return found
        room = Room(new_id(), f"Support for order {order_id}", "support", order_id, caller, self._clock.now())
        try:
            async with self._db.write() as conn:
                await self._insert_room(conn, room, {owner})
        except IntegrityError:
            async with self._db.read() as conn:
                again = await self._room_where(conn, rooms.c.order_id == order_id)
            if again is None:
                raise
            return again
        return room

    async def _insert_room(self, conn: AsyncConnection, room: Room, member_ids: set[str]) -> None:
        await conn.execute(
            insert(rooms).values(
                id=room.id,
                name=room.name,
                kind=room.kind,
                order_id=room.order_id,
                created_by=room.created_by,
                created_at=room.created_at,
            )
        )
        if member_ids:
            await conn.execute(
                insert(members),
                [
                    {"room_id": room.id, "user_id": m, "joined_at": room.created_at}
                    for m in sorted(member_ids)
                ],
            )

    async def _room_where(self, conn: AsyncConnection, condition: object) -> Room | None:
        row = (await conn.execute(select(rooms).where(condition))).first()  # type: ignore[arg-type]
        if row is None:
            return None
        return Room(row.id, row.name, row.kind, row.order_id, row.created_by, row.created_at)

    async def get_room(self, room_id: uuid.UUID) -> Room:
        async with self._db.read() as conn:
            room = await self._room_where(conn, rooms.c.id == room_id)
        if room is None:
            raise RoomNotFound(f"room {room_id} not found")
        return room

    async def members(self, room_id: uuid.UUID) -> list[str]:
        async with self._db.read() as conn:
            rows = await conn.execute(
                select(members.c.user_id).where(members.c.room_id == room_id).order_by(members.c.user_id)
            )
            return [r.user_id for r in rows]

    async def add_member(self, room_id: uuid.UUID, user_id: str) -> None:
        await self.get_room(room_id)
        async with self._db.write() as conn:
            exists = (
                await conn.execute(
                    select(members.c.user_id).where(
                        and_(members.c.room_id == room_id, members.c.user_id == user_id)
                    )
                )
            ).first()
            if exists is None:
                await conn.execute(
                    insert(members).values(room_id=room_id, user_id=user_id, joined_at=self._clock.now())
                )

    async def remove_member(self, room_id: uuid.UUID, user_id: str) -> None:
        async with self._db.write() as conn:
            await conn.execute(
                delete(members).where(and_(members.c.room_id == room_id, members.c.user_id == user_id))
            )
        self.membership.forget(room_id, user_id)
        for listener in self._on_removed:
            try:
                await listener(room_id, user_id)
            except Exception:  # noqa: BLE001 - removed already; other processes' caches expire in ttl_s
                _log.warning("chat_member_removed_listener_failed", exc_info=True)

    def on_member_removed(self, listener: Callable[[uuid.UUID, str], Awaitable[None]]) -> None:
        if listener not in self._on_removed:
            self._on_removed.append(listener)

    async def may_read(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> bool:
        """Members read and write a room; staff every room that exists. A "yes" is cached for up to
        the cache's TTL (a removal forgets it at once: see `MembershipCache`)."""
        if self.membership.allowed(room_id, user_id, staff=staff):
            if self.membership.take_refresh(room_id, user_id, staff=staff):
                task = asyncio.create_task(self._refresh_membership(room_id, user_id, staff=staff))
                self._refreshing.add(task)
                task.add_done_callback(self._refreshing.discard)
            return True
        found = await self._read_membership(room_id, user_id, staff=staff)
        if found:
            self.membership.remember(room_id, user_id, staff=staff)
        return found

    async def _refresh_membership(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> None:
        """A cached "yes" read again before it expires (`MembershipCache.take_refresh`)."""
        try:
            found = await self._read_membership(room_id, user_id, staff=staff)
        except Exception:  # noqa: BLE001 - the entry expires at its TTL; the next miss reads again
            _log.warning("chat_membership_refresh_failed", exc_info=True)
            return
        if found:
            self.membership.extend(room_id, user_id, staff=staff)
        else:
            self.membership.forget(room_id, user_id)

    async def _read_membership(self, room_id: uuid.UUID, user_id: str, *, staff: bool) -> bool:
        # One autocommitted prepared statement on the driver (no BEGIN/ROLLBACK): a process's first
        # sends after a lull each make one, all at once (ADR 0090).
        if staff:
            return bool(await self._reads.rows(_ROOM_EXISTS, {"room": room_id}))
        return bool(await self._reads.rows(_IS_MEMBER, {"room": room_id, "user": user_id}))

    # -- messages ------------------------------------------------------------------------------

    async def history(self, room_id: uuid.UUID, *, after: int, limit: int) -> list[ChatMessage]:
        """Messages with seq > `after`, oldest first, no older than the offline queue's TTL; read
        from the one shard that holds the room (ADR 0043)."""
        horizon = self._clock.now() - timedelta(seconds=self.history_ttl_s)
        return await self.shards.history(room_id, after=after, horizon=horizon, limit=limit)

    async def head(self, room_id: uuid.UUID) -> int:
        return await self.shards.head(room_id)

    async def persist(
        self, room_id: uuid.UUID, *, sender: str, text: str, client_msg_id: str
    ) -> tuple[ChatMessage, bool]:
        """Store a message with the room's next seq on the room's shard; a (sender, client_msg_id)
        seen before returns its first message and False."""
        return await self.shards.persist(room_id, sender=sender, text_=text, client_msg_id=client_msg_id)

    async def persist_batch(
        self, room_id: uuid.UUID, items: Sequence[Draft]
    ) -> list[tuple[ChatMessage, bool]]:
        """Several messages of one room, in order, in one transaction (group commit, ADR 0056)."""
        return await self.shards.persist_batch(room_id, items)

    async def persist_rooms(
        self, batches: dict[uuid.UUID, list[Draft]]
    ) -> dict[uuid.UUID, list[tuple[ChatMessage, bool]]]:
        """Several rooms' messages, each room's in order, in one transaction per shard."""
        return await self.shards.persist_rooms(batches)

    async def warm(self) -> None:
        """Prepare what persisting a pass needs, before the first message does (ADR 0090)."""
        await self.shards.warm()

    async def close(self) -> None:
        """Stop the membership re-reads in flight (before the databases go), then the shards'."""
        for task in list(self._refreshing):
            task.cancel()
        await asyncio.gather(*self._refreshing, return_exceptions=True)
        await self.shards.close()

    async def recent_messages(
        self, *, sender: str | None, limit: int, before: Position | None = None
    ) -> list[ChatMessage]:
        """Operators: the newest messages across all shards (scatter-gather), older than `before`."""
        return await recent_messages(self.shards, sender=sender, limit=limit, before=before)

    async def purge_expired(self, *, limit: int) -> int:
        """Delete up to `limit` messages older than the offline queue's TTL (`history_ttl_s`): one
        pass of the worker's `purge_chat_history` job. Each room keeps its newest message whatever
        its age: the next seq is `max + 1`, so the head row is what keeps a room's seqs from starting
        over (it is past the TTL, so `history` no longer returns it)."""
        horizon = self._clock.now() - timedelta(seconds=self.history_ttl_s)
        shards = await self.shards.current()
        removed = 0
        # Every shard keeps its own rooms' history (ADR 0043): each is purged in its own database.
        for name, _ in shards.shards:
            if removed >= limit:
                break
            removed += await _purge_before(self.shards.db(name, shards), horizon, limit=limit - removed)
        return removed


async def _purge_before(db: Database, horizon: datetime, *, limit: int) -> int:
    """Delete up to `limit` messages sent before `horizon` in one shard, every room's newest kept."""
    newer = messages.alias("newer")
    expired = (
        select(messages.c.room_id, messages.c.seq)
        .where(
            messages.c.sent_at < horizon,
            select(newer.c.seq)
            .where(newer.c.room_id == messages.c.room_id, newer.c.seq > messages.c.seq)
            .exists(),
        )
        .limit(limit)
    )
    async with db.write() as conn:
        keys = [(r.room_id, r.seq) for r in await conn.execute(expired)]
        removed = 0
        for room_id in {room for room, _ in keys}:
            seqs = [seq for room, seq in keys if room == room_id]
            result = await conn.execute(
                delete(messages).where(messages.c.room_id == room_id, messages.c.seq.in_(seqs))
            )
            removed += int(result.rowcount or 0)
    return removed


def _message(row: object) -> ChatMessage:
    r = row
    return ChatMessage(r.room_id, r.seq, r.sender, r.text, r.client_msg_id, r.sent_at)  # type: ignore[attr-defined]


def send_message(
    *, room_id: uuid.UUID, sender: str, text: str, client_msg_id: str, reply_to: str, now: object
) -> Message:
    """The stream message a WebSocket `send` becomes: partitioned by room, so per-room order holds."""
    return Message(
        id=new_id(),
        source="mercato/chat",
        type="mercato.chat.message_sent",
        subject=str(room_id),
        time=now,  # type: ignore[arg-type]
        data={"room": str(room_id), "sender": sender, "text": text, "client_msg_id": client_msg_id},
        topic=CHAT_TOPIC,
        key=str(room_id),
        headers={"replyto": reply_to} if reply_to else {},
    )


class ChatHistory:
    """The `History` port for `room:<id>` channels, over the chat messages table."""

    def __init__(self, chat: ChatService) -> None:
        self._chat = chat

    async def head(self, channel: str) -> int:
        room_id = room_from_channel(channel)
        return 0 if room_id is None else await self._chat.head(room_id)

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        room_id = room_from_channel(channel)
        if room_id is None:
            return []
        found = await self._chat.history(room_id, after=seq, limit=limit)
        return [ChannelEvent(channel, "message", m.as_data(), seq=m.seq) for m in found]


class ChatPersister:
    """The chat service's consumer: stream -> persisted (dedup) -> published for fan-out.

    `run_once` is one whole pass (read, persist, publish, acknowledge). `run_overlapped`, what the
    API process runs (ADR 0070), publishes and acknowledges the pass persisted by its previous call
    while it reads and persists the next: at most two passes in hand, one being persisted and one
    being published, each stage one at a time, so persists and publishes keep stream order. A room
    is never in both: the SQL log and Redis Streams give a partition's next batch only once the
    previous one is acknowledged (JetStream has one reader, and the stages' order covers it)."""

    def __init__(
        self,
        chat: ChatService,
        stream: Stream,
        publish_many: Callable[[list[ChannelEvent]], Awaitable[None]],
        *,
        consumer: str,
        batch: int = 200,
        hook: MessagingHook | None = None,
        lag: LagReporter | None = None,
        wakeups: Callable[[], int] | None = None,
        publish_and_ack: PublishAndAck | None = None,
        fan_out_here_first: Callable[[list[ChannelEvent]], list[ChannelEvent]] | None = None,
    ) -> None:
        """`publish_and_ack`: a pass wholly persisted is published and acknowledged in one call (one
        Redis round trip when the broker and the stream share a Redis, ADR 0082), which with
        `read_next` (`run_once`'s passes) also reads the next batch, as `run_once`'s loop does after
        every busy pass; None: `publish_many` then the stream's `ack_many`.

        `wakeups`: a count that moves whenever messages may have reached the stream (the work
        signals the caller of `run_overlapped` waits on). `run_overlapped` then reads ahead only
        when it moved since its last read, and returns 0 after publishing when the caller may wait
        for it to move; None: always reads ahead, returns 0 only when it read nothing."""
        self._chat = chat
        self._stream = stream
        self._publish_many = publish_many
        self._publish_and_ack_together = publish_and_ack
        self._fan_out_here_first = fan_out_here_first
        self._consumer = consumer
        self._batch = batch
        self._lag = lag or LagReporter(stream, hook)
        # A pass persisted by `run_overlapped` and not yet published (the next call publishes it).
        self._persisted: _Persisted | None = None
        self._wakeups = wakeups
        self._wakeups_at_read = -1
        self._read_full = False
        self._read_clean = True
        # `run_once`'s last pass handled something (its loop reads again at once).
        self._after_busy_pass = False
        # The batch read with the last pass's acks (`publish_and_ack`), and `wakeups` before that read.
        self._read_ahead: tuple[list[Delivery], int] | None = None

    async def run_once(self) -> int:
        """One batch: every room's messages persisted in one transaction per shard (group commit),
        each room's in stream order; all of them published in one broker call; acked in stream
        order. A failure is nacked at the first message not persisted and the pass stops there
        (what follows is redelivered, in order; the dedup makes a persisted one a no-op)."""
        held, self._persisted = self._persisted, None
        if held is not None:  # left by `run_overlapped`: it goes out first, in stream order
            await self._publish_and_ack(held)
        ahead, self._read_ahead = self._read_ahead, None
        if ahead is not None and (ahead[0] or (self._wakeups is not None and self._wakeups() == ahead[1])):
            # Read with the last pass's acks, after them: what this loop's read would find now,
            # unless a send was signalled since (then read again: it may have come after that read).
            persisted = await self._persist(ahead[0]) if ahead[0] else None
        else:
            persisted = await self._read_and_persist(clean=True)
        if persisted is None:
            # The empty read that follows a busy pass (the loop reads again after each) counts at the
            # busy rate: as an idle pass it "settled" the gauge at once, a lag count per message
            # whenever messages come one per pass (ADR 0077). The next idle pass settles it.
            await self._lag.report(CHAT_TOPIC, CHAT_GROUP, busy=self._after_busy_pass)
            self._after_busy_pass = False
            return 0
        handled = await self._publish_and_ack(persisted, read_next=True)
        # After the acks: counted between the read and the ack, the lag included the batch in hand
        # (the "~50 messages behind" of ADR 0063's run was one pass's batch) and delayed it.
        await self._lag.report(CHAT_TOPIC, CHAT_GROUP, busy=True)
        self._after_busy_pass = True
        return handled

    async def run_overlapped(self) -> int:
        """One step of the pipeline: the pass persisted by the previous step (or, with none, one read
        and persisted now) is published and acknowledged while the next pass is read and persisted,
        then kept for the next step. A pass waited on the previous one's publish and acks (two to
        three round trips) before its read could start; at 150-220 msgs/s that was most of a
        message's wait (docs/benchmarks.md, Session 9: h-rt5).

        Returns the messages taken in hand (published now, or persisted for the next step), or 0
        when the caller may wait for its next work signal: it read nothing; or, with `wakeups`, it
        published a pass read when nothing of ours was unacknowledged, not a full batch, with no
        signal since (at low rates the read that followed every pass was one more stream round trip
        per message, always empty): a send signalled during the step is the caller's mark to see,
        and one from another process announces itself the same way. After a read ahead it never
        returns 0: that read may have run while a partition was still held by the pass being
        acknowledged, so the caller reads again. If the publish fails, the
        pass persisted behind it is not published either (its room may follow in the stream): both
        stay unacknowledged and come back after the visibility timeout, their persist a no-op."""
        previous, self._persisted = self._persisted, None
        if previous is None:
            previous = await self._read_and_persist(clean=True)
            if previous is None:
                await self._lag.report(CHAT_TOPIC, CHAT_GROUP, busy=False)
                return 0
        if previous.failed is not None:
            # A pass that could not persist everything is nacked first: nothing overlaps its redelivery.
            return await self._publish_and_ack(previous)
        # Nothing to read ahead when nothing was signalled since the last read, or when the pass in
        # hand holds every partition (the stream serves none of them again before its acks).
        partitions = getattr(self._stream, "partitions", None)
        every_partition = isinstance(partitions, int) and (
            len({d.partition for d in previous.deliveries}) >= partitions
        )
        if every_partition or (self._wakeups is not None and self._wakeups() == self._wakeups_at_read):
            handled = await self._publish_and_ack(previous)
            await self._lag.report(CHAT_TOPIC, CHAT_GROUP, busy=True)
            # 0 only after a read made while nothing of ours was unacknowledged: a message already
            # signalled whose partition a pass of ours held at that read (a pass read ahead during
            # the previous step's acks) is found only by reading again after these acks.
            return 0 if self._read_clean and not self._read_full else handled
        publishing = asyncio.ensure_future(self._publish_and_ack(previous))
        try:
            following = await self._read_and_persist(clean=False)
        except asyncio.CancelledError:
            publishing.cancel()  # stopping: what is not acknowledged yet is redelivered
            raise
        except Exception:
            # The read or the persist failed: the previous pass's publish and acks still finish.
            with contextlib.suppress(Exception):
                await publishing
            raise
        handled = await publishing
        self._persisted = following
        await self._lag.report(CHAT_TOPIC, CHAT_GROUP, busy=True)
        return handled + (len(following.deliveries) if following is not None else 0)

    async def _read_and_persist(self, *, clean: bool) -> _Persisted | None:
        """`clean`: no pass of this persister is unacknowledged while this read runs."""
        self._read_clean = clean
        if self._wakeups is not None:
            self._wakeups_at_read = self._wakeups()
        deliveries = await self._stream.read(
            CHAT_TOPIC, CHAT_GROUP, self._consumer, max_messages=self._batch, block_s=0
        )
        self._read_full = len(deliveries) >= self._batch  # more may be waiting: no sleep before the next
        if not deliveries:
            return None
        return await self._persist(deliveries)

    async def _persist(self, deliveries: list[Delivery]) -> _Persisted:
        by_room: dict[uuid.UUID, list[Delivery]] = {}
        for delivery in deliveries:
            by_room.setdefault(uuid.UUID(str(delivery.message.data["room"])), []).append(delivery)
        stored: dict[str, ChatMessage] = {}  # delivery message id -> its persisted message
        failed: str | None = None
        try:
            results = await self._chat.persist_rooms(
                {room_id: [_draft(d) for d in group] for room_id, group in by_room.items()}
            )
        except Exception as exc:  # noqa: BLE001 - nacked by _publish_and_ack: the partition redelivers it
            _log.warning("chat_persist_failed", error=str(exc))
            failed = str(exc)[:500]
            results = {}
        for room_id, group in by_room.items():
            for delivery, (message, _new) in zip(group, results.get(room_id, ()), strict=False):
                stored[str(delivery.message.id)] = message
        if failed is None and len(stored) < len(deliveries):
            failed = "not persisted"
        return _Persisted(deliveries, stored, failed)

    async def _publish_and_ack(self, persisted: _Persisted, *, read_next: bool = False) -> int:
        deliveries, stored = persisted.deliveries, persisted.stored
        done = [d for d in deliveries if str(d.message.id) in stored]
        events = [self._event(d, stored[str(d.message.id)]) for d in done]
        if events and self._fan_out_here_first is not None:
            events = self._fan_out_here_first(events)  # durable already: no broker wait for ours
        if self._publish_and_ack_together is not None and done and len(done) == len(deliveries):
            wakeups = self._wakeups() if self._wakeups is not None else 0
            read = (CHAT_TOPIC, CHAT_GROUP, self._consumer, self._batch) if read_next else None
            following = await self._publish_and_ack_together(events, done, read)
            if following is not None:
                self._read_ahead = (following, wakeups)
            return len(done)
        if events:
            await self._publish_many(events)
        for index, delivery in enumerate(deliveries):
            if str(delivery.message.id) not in stored:
                if index:
                    await self._stream.ack_many(deliveries[:index])
                await self._stream.nack(delivery, error=persisted.failed or "not persisted")
                return index
        # The pass's acks in as few round trips as the stream allows (the SQL log: one statement per
        # partition's run of offsets; Redis Streams: one script call; JetStream: sent together).
        await self._stream.ack_many(deliveries)
        return len(deliveries)

    @staticmethod
    def _event(delivery: Delivery, message: ChatMessage) -> ChannelEvent:
        return ChannelEvent(
            channel=room_channel(message.room_id),
            type="message",
            data=message.as_data(),
            seq=message.seq,
            reply_to=delivery.message.headers.get("replyto", ""),
            ack={"client_msg_id": message.client_msg_id, "room": str(message.room_id)},
            at=time.time(),
        )


# (events, their deliveries, a read to make after the acks: (topic, group, consumer, max_messages)
# or None) -> that read's deliveries, or None when it was not made.
PublishAndAck = Callable[
    [list[ChannelEvent], list[Delivery], tuple[str, str, str, int] | None], Awaitable[list[Delivery] | None]
]


@dataclass(frozen=True, slots=True)
class _Persisted:
    """A pass read and persisted, waiting to be published and acknowledged."""

    deliveries: list[Delivery]
    stored: dict[str, ChatMessage]  # delivery message id -> its persisted message
    failed: str | None  # why some delivery was not persisted (None: all were)


def _draft(delivery: Delivery) -> Draft:
    data = delivery.message.data
    return (str(data["sender"]), str(data["text"]), str(data["client_msg_id"]))
