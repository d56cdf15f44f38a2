"""The chat persister's group commit (ADR 0056): a batch read from the stream is persisted in one
transaction (per shard) for all its rooms, each room's messages in stream order with contiguous
seqs, a re-sent client_msg_id deduplicated (inside the batch and against what is stored), a pass's
events handed to the broker in one call; and the membership cache behind `send` authorization."""

from __future__ import annotations

import uuid

from mercato.bootstrap import Container
from mercato.kit.realtime import ChannelEvent
from mercato.shop.chat.service import CHAT_TOPIC, ChatPersister, send_message
from tests.integration.statement_budget import counting


async def test_a_batch_is_one_insert_for_all_rooms_in_stream_order_with_dedup(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room_a = (await chat.create_room("a", users, created_by=users[0])).id
    room_b = (await chat.create_room("b", users, created_by=users[0])).id
    await chat.persist(room_a, sender=users[0], text="stored before", client_msg_id="old")
    sends = [
        (room_a, users[0], "a1", "c1"),
        (room_b, users[1], "b1", "c1"),
        (room_a, users[1], "a2", "c2"),
        (room_a, users[0], "a1 again", "c1"),  # a re-send inside the batch: the first one's seq
        (room_b, users[0], "b2", "c3"),
        (room_a, users[0], "old again", "old"),  # a re-send of a stored message
        (room_a, users[1], "a3", "c4"),
    ]
    now = container.clock.now()
    await container.stream.publish(
        [
            send_message(room_id=r, sender=s, text=t, client_msg_id=c, reply_to="n/1", now=now)
            for r, s, t, c in sends
        ]
    )
    published: list[list[ChannelEvent]] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        published.append(events)

    persister = ChatPersister(chat, container.stream, publish_many, consumer="t1", batch=100)
    with counting(container) as tally:
        handled = 0
        while handled < len(sends):
            done = await persister.run_once()
            assert done, "the persister stopped before the batch was handled"
            handled += done
    sql = [s.removeprefix("driver: ").upper() for s in tally.statements]
    inserts = [s for s in sql if s.startswith("INSERT INTO CHAT_MESSAGES")]
    passes = [s for s in sql if "CHAT_PERSIST_PASS(" in s]
    # One insert per persister pass, whatever the rooms (without group commit: one insert and one
    # transaction per new message, five here); on PostgreSQL the insert is inside the pass's one call.
    assert len(inserts) + len(passes) == len(published), tally.report()
    assert len(published) < 5, tally.report()
    if container.db.dialect == "postgresql":
        # ADR 0077: a pass is one autocommitted call of `chat_persist_pass` on the driver path, its
        # locks, fences, heads, dedup and insert inside: no BEGIN, no COMMIT (ADR 0065's pass was a
        # transaction of a lock, a prepared read and an insert of arrays: five round trips).
        # The shard map's read is left out: it is re-read once a second (`refresh_s`), not per pass,
        # so a slow machine's window may or may not hold one (CI once saw it).
        on_chat = [s for s in tally.statements if "CHAT_" in s.upper() and "CHAT_SHARD_MAP" not in s.upper()]
        assert len(on_chat) == len(published), tally.report()
        assert all(s.startswith("driver: ") for s in on_chat), tally.report()
        assert not [s for s in sql if s in ("BEGIN", "COMMIT")], tally.report()
    events = [e for batch in published for e in batch]
    # Per room, stream order (the rooms may sit on different partitions, read in either order).
    in_a = [(e.data["text"], e.seq) for e in events if e.channel == f"room:{room_a}"]
    in_b = [(e.data["text"], e.seq) for e in events if e.channel == f"room:{room_b}"]
    assert in_a == [("a1", 2), ("a2", 3), ("a1", 2), ("stored before", 1), ("a3", 4)]
    assert in_b == [("b1", 1), ("b2", 2)]
    assert all(e.ack is not None and e.reply_to == "n/1" for e in events)
    assert [m.seq for m in await chat.history(room_a, after=0, limit=10)] == [1, 2, 3, 4]
    assert [m.text for m in await chat.history(room_b, after=0, limit=10)] == ["b1", "b2"]
    assert await container.stream.lag(CHAT_TOPIC, "mercato.chat.persist") == 0


async def test_membership_answers_are_cached_and_a_removal_forgets_them(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("cached", users, created_by=users[0])).id
    removed: list[tuple[uuid.UUID, str]] = []

    async def on_removed(room_id: uuid.UUID, user: str) -> None:
        removed.append((room_id, user))

    chat.on_member_removed(on_removed)
    assert await chat.may_read(room, users[1], staff=False)
    with counting(container) as tally:
        assert await chat.may_read(room, users[1], staff=False)
    assert tally.statements == []  # answered from the cache: no membership read
    await chat.remove_member(room, users[1])
    assert removed == [(room, users[1])]
    assert not await chat.may_read(room, users[1], staff=False)  # forgotten at once, read again
    # Only "yes" is cached: an added member is let in at once.
    await chat.add_member(room, users[1])
    assert await chat.may_read(room, users[1], staff=False)
    # Another process's removal reaches this one as `forget` (the hub's ACCESS_REVOKED).
    chat.membership.forget(room, users[1])
    assert len(chat.membership) == 0
    with counting(container) as tally:
        assert await chat.may_read(room, users[1], staff=False)
    assert tally.statements  # read again from the database


async def test_a_pass_is_acknowledged_in_one_ack_many_call(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    rooms = [(await chat.create_room(f"r{i}", users, created_by=users[0])).id for i in range(3)]
    now = container.clock.now()
    await container.stream.publish(
        [
            send_message(
                room_id=r, sender=users[0], text=f"m{i}", client_msg_id=f"c{i}-{r}", reply_to="n/1", now=now
            )
            for i in range(4)
            for r in rooms
        ]
    )
    calls: list[tuple[str, int]] = []
    stream = container.stream

    class _Spy:
        def __getattr__(self, name: str) -> object:
            return getattr(stream, name)

        async def ack(self, delivery: object) -> None:
            calls.append(("ack", 1))
            await stream.ack(delivery)  # type: ignore[arg-type]

        async def ack_many(self, deliveries: list[object]) -> None:
            calls.append(("ack_many", len(deliveries)))
            await stream.ack_many(deliveries)  # type: ignore[arg-type]

    async def publish_many(events: list[ChannelEvent]) -> None:
        pass

    persister = ChatPersister(chat, _Spy(), publish_many, consumer="t1", batch=100)  # type: ignore[arg-type]
    handled = 0
    passes = 0
    while handled < 12:
        done = await persister.run_once()
        assert done, "the persister stopped before the messages were handled"
        handled += done
        passes += 1
    assert [kind for kind, _ in calls] == ["ack_many"] * passes
    assert sum(n for _, n in calls) == 12
    assert await container.stream.lag(CHAT_TOPIC, "mercato.chat.persist") == 0
