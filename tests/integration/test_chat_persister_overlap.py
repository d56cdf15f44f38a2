"""The chat persister's overlapped passes (ADR 0070): a pass is read and persisted while the one
before it is published and acknowledged; persists and publishes each keep stream order, so every
room's events still reach the broker in seq order; a failed publish publishes nothing behind it."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from mercato.bootstrap import Container
from mercato.kit.messaging import partition_for
from mercato.kit.realtime import ChannelEvent
from mercato.shop.chat.service import CHAT_GROUP, CHAT_TOPIC, ChatPersister, send_message


async def _rooms_on_two_partitions(container: Container, users: list[str]) -> tuple[uuid.UUID, uuid.UUID]:
    """Two rooms whose messages land on different stream partitions (one batch out per partition:
    two passes in hand at once are always two partitions' batches)."""
    partitions = int(container.stream.partitions)  # type: ignore[attr-defined]
    first = (await container.chat.create_room("first", users, created_by=users[0])).id
    taken = partition_for(str(first), partitions=partitions)
    while True:
        other = (await container.chat.create_room("other", users, created_by=users[0])).id
        if partition_for(str(other), partitions=partitions) != taken:
            return first, other


async def _send(container: Container, room: uuid.UUID, sender: str, text: str) -> None:
    now = container.clock.now()
    await container.stream.publish(
        [send_message(room_id=room, sender=sender, text=text, client_msg_id=text, reply_to="n/1", now=now)]
    )


async def test_the_next_pass_is_persisted_while_the_previous_one_is_published(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room_a, room_b = await _rooms_on_two_partitions(container, users)
    await _send(container, room_a, users[0], "a1")
    await _send(container, room_b, users[1], "b1")
    publishing = asyncio.Event()
    release = asyncio.Event()
    published: list[list[str]] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        published.append([str(e.data["text"]) for e in events])
        if len(published) == 1:
            publishing.set()
            await release.wait()

    # batch=1: each pass holds one message, so the two messages are two passes.
    persister = ChatPersister(chat, container.stream, publish_many, consumer="t1", batch=1)
    step = asyncio.create_task(persister.run_overlapped())
    await asyncio.wait_for(publishing.wait(), timeout=10)
    # The first pass's publish has not returned, and the other message is read and committed
    # meanwhile (the stream serves its partitions in turn: either message may come first).
    first = published[0][0]
    other, other_text = (room_b, "b1") if first == "a1" else (room_a, "a1")
    for _ in range(200):
        if await chat.history(other, after=0, limit=10):
            break
        await asyncio.sleep(0.01)
    assert [m.text for m in await chat.history(other, after=0, limit=10)] == [other_text]
    assert not step.done()
    release.set()
    assert await step == 2  # the first published and acknowledged, the other persisted and held
    assert published == [[first]]
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 1  # persisted, not yet acked
    assert await persister.run_overlapped() == 1
    assert published == [[first], [other_text]]
    assert await persister.run_overlapped() == 0
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0


async def test_overlapped_passes_publish_every_room_in_seq_order(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room_a, room_b = await _rooms_on_two_partitions(container, users)
    for n in range(8):
        await _send(container, room_a, users[0], f"a{n}")
        await _send(container, room_b, users[1], f"b{n}")
    published: list[ChannelEvent] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        await asyncio.sleep(0.005)  # a broker round trip the next pass overlaps
        published.extend(events)

    persister = ChatPersister(chat, container.stream, publish_many, consumer="t1", batch=3)
    steps = 0
    while await persister.run_overlapped():
        steps += 1
        assert steps < 50, "the persister never drained the stream"
    for room, prefix in ((room_a, "a"), (room_b, "b")):
        mine = [e for e in published if e.channel == f"room:{room}"]
        assert [e.seq for e in mine] == list(range(1, 9))
        assert [e.data["text"] for e in mine] == [f"{prefix}{n}" for n in range(8)]
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0


async def test_a_failed_publish_publishes_nothing_persisted_behind_it(container: Container) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room_a, room_b = await _rooms_on_two_partitions(container, users)
    await _send(container, room_a, users[0], "a1")
    await _send(container, room_b, users[1], "b1")
    published: list[ChannelEvent] = []
    calls = [0]

    async def publish_many(events: list[ChannelEvent]) -> None:
        calls[0] += 1
        if calls[0] == 1:
            await asyncio.sleep(0.05)  # long enough for the next pass to be read and persisted
            raise ConnectionError("broker away")
        published.extend(events)

    persister = ChatPersister(chat, container.stream, publish_many, consumer="t1", batch=1)
    with pytest.raises(ConnectionError):
        await persister.run_overlapped()
    texts = [m.text for room in (room_a, room_b) for m in await chat.history(room, after=0, limit=10)]
    assert sorted(texts) == ["a1", "b1"]  # both persisted (the second while the first was published)...
    # ...but neither published nor acknowledged: both come back after the visibility timeout, their
    # persist then a no-op (the dedup), and nothing is held for the next step to publish out of turn.
    assert await persister.run_overlapped() == 0
    assert published == []
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 2


async def test_it_reads_ahead_only_when_a_send_was_signalled_since_its_last_read(
    container: Container,
) -> None:
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room_a, room_b = await _rooms_on_two_partitions(container, users)
    stream = container.stream
    reads = [0]
    signals = [0]  # what the API process's loop counts: its work signals fired
    signal_after_read = [False]  # a send signalled while the pass just read is in hand

    class _Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(stream, name)

        async def read(self, *args: Any, **kwargs: Any) -> Any:
            reads[0] += 1
            found = await stream.read(*args, **kwargs)
            if signal_after_read[0]:
                signal_after_read[0] = False
                signals[0] += 1
            return found

    async def publish_many(events: list[ChannelEvent]) -> None:
        pass

    def persister_of(batch: int) -> ChatPersister:
        return ChatPersister(
            chat,
            _Counting(),
            publish_many,
            consumer="t1",
            batch=batch,
            wakeups=lambda: signals[0],  # type: ignore[arg-type]
        )

    persister = persister_of(1)
    await _send(container, room_a, users[0], "a1")
    signals[0] += 1
    # One message, nothing signalled after the read that took it: published without a read ahead
    # (a read ahead would be one more stream read per message at low rates, always empty).
    assert await persister.run_overlapped() == 1
    assert reads[0] == 1
    assert await persister.run_overlapped() == 0  # the read after the acks: nothing
    assert reads[0] == 2
    # Two messages on two partitions: the first step reads one pass; a send is signalled while it
    # is in hand, so the other pass is read ahead (during the first one's publish) and held.
    await _send(container, room_a, users[0], "a2")
    await _send(container, room_b, users[1], "b1")
    signals[0] += 2
    signal_after_read[0] = True
    reads[0] = 0
    assert await persister.run_overlapped() == 2
    assert reads[0] == 2
    assert await persister.run_overlapped() == 1
    assert await persister.run_overlapped() == 0
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0
    # Not a full batch, nothing signalled since its read: published, and 0 (the caller may wait for
    # its next signal) with no read after the acks.
    wide = persister_of(10)
    await _send(container, room_a, users[0], "a3")
    signals[0] += 1
    reads[0] = 0
    assert await wide.run_overlapped() == 0
    assert reads[0] == 1
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0
    assert [m.text for m in await chat.history(room_a, after=0, limit=10)] == ["a1", "a2", "a3"]


async def test_a_read_ahead_that_met_a_held_partition_is_followed_by_a_read_after_the_acks(
    container: Container,
) -> None:
    """A message signalled before the read ahead, on a partition the pass being acknowledged still
    held, is not in that read: the step must not tell its loop to sleep (its signal is older than
    the loop's mark, so only the safety poll would find the message)."""
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("held", users, created_by=users[0])).id
    stream = container.stream
    signals = [0]
    first_read = [True]

    class _SendsDuringTheFirstPass:
        def __getattr__(self, name: str) -> Any:
            return getattr(stream, name)

        async def read(self, *args: Any, **kwargs: Any) -> Any:
            found = await stream.read(*args, **kwargs)
            if first_read[0]:
                first_read[0] = False
                await _send(container, room, users[1], "m2")  # same room: the partition a1 holds
                signals[0] += 1
            return found

    async def publish_many(events: list[ChannelEvent]) -> None:
        await asyncio.sleep(0.2)  # the acks come well after the read ahead

    persister = ChatPersister(
        chat,
        _SendsDuringTheFirstPass(),  # type: ignore[arg-type]
        publish_many,
        consumer="t1",
        batch=10,
        wakeups=lambda: signals[0],
    )
    await _send(container, room, users[0], "m1")
    signals[0] += 1
    assert await persister.run_overlapped() != 0  # m1 published; m2 was behind its partition's batch
    assert await persister.run_overlapped() == 0  # the read after the acks takes m2: published
    assert [m.text for m in await chat.history(room, after=0, limit=10)] == ["m1", "m2"]
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0


async def test_no_read_ahead_while_the_pass_in_hand_holds_every_partition(container: Container) -> None:
    """The stream serves a partition's next batch only after its acks: with every partition in the
    pass being published, a read ahead could only come back empty (one wasted round trip a pass at
    the rates where passes cover every partition)."""
    chat = container.chat
    users = [str(uuid.uuid4()) for _ in range(2)]
    partitions = int(container.stream.partitions)  # type: ignore[attr-defined]
    rooms: dict[int, uuid.UUID] = {}
    while len(rooms) < partitions:
        room = (await chat.create_room("p", users, created_by=users[0])).id
        rooms.setdefault(partition_for(str(room), partitions=partitions), room)
    for room in rooms.values():
        await _send(container, room, users[0], f"m-{room}")
    stream = container.stream
    reads = [0]
    signals = [1]

    class _Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(stream, name)

        async def read(self, *args: Any, **kwargs: Any) -> Any:
            reads[0] += 1
            found = await stream.read(*args, **kwargs)
            signals[0] += 1  # a send signalled while the pass is in hand
            return found

    published: list[ChannelEvent] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        published.extend(events)

    persister = ChatPersister(
        chat,
        _Counting(),  # type: ignore[arg-type]
        publish_many,
        consumer="t1",
        batch=100,
        wakeups=lambda: signals[0],
    )
    # Published without a read ahead; 0: the send signalled meanwhile is the loop's mark to see.
    assert await persister.run_overlapped() == 0
    assert reads[0] == 1
    assert len(published) == partitions
    assert await container.stream.lag(CHAT_TOPIC, CHAT_GROUP) == 0


async def test_the_runtime_overlaps_the_persisters_passes_only_when_configured(container: Container) -> None:
    """Off by default until a quiet rerun (ADR 0070: the loaded box's ramp stopped near 60 msgs/s
    with it twice); `MERCATO_REALTIME_OVERLAP_PERSISTER_PASSES=true` turns it on."""
    from mercato.gateway.realtime import RealtimeRuntime

    async def publish_many(events: list[ChannelEvent]) -> None:
        pass

    persister = ChatPersister(container.chat, container.stream, publish_many, consumer="t1")
    assert RealtimeRuntime(container)._persist_step(persister) == persister.run_once
    realtime = container.settings.realtime.model_copy(update={"overlap_persister_passes": True})
    container.settings = container.settings.model_copy(update={"realtime": realtime})
    assert RealtimeRuntime(container)._persist_step(persister) == persister.run_overlapped
