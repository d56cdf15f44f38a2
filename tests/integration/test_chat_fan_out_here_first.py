"""A persisted chat message reaches the persisting process's own connections before the broker
carries it (ADR 0085), and that process's hub skips it when the broker brings it back: each
connection gets each seq once and the sender one ack, whichever way the event comes first."""

from __future__ import annotations

import asyncio
import uuid

from mercato.bootstrap import Container
from mercato.kit.realtime import ChannelEvent, Hub
from mercato.kit.realtime.broker import Subscription
from mercato.shop.chat.model import room_channel
from mercato.shop.chat.service import ChatPersister, send_message
from tests.unit.realtime_support import SeqHistory, queued_frames


class _LoopbackBroker:
    """Every publish reaches every subscription, through the wire form, as a real broker's does."""

    def __init__(self) -> None:
        self.subscriptions: list[Subscription] = []
        self.published: list[ChannelEvent] = []

    async def publish(self, event: ChannelEvent) -> None:
        await self.publish_many([event])

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        for event in events:
            self.published.append(event)
            for subscription in self.subscriptions:
                subscription.put(ChannelEvent.from_bytes(event.to_bytes()))

    async def subscribe(self) -> Subscription:
        subscription = Subscription()
        self.subscriptions.append(subscription)
        return subscription

    async def unsubscribe(self, subscription: Subscription) -> None:
        subscription.close()

    async def aclose(self) -> None:
        pass


async def test_the_origin_hub_skips_what_it_fanned_out_first_and_the_others_do_not() -> None:
    broker = _LoopbackBroker()
    here = Hub(broker, SeqHistory(0), node_id="n1")  # type: ignore[arg-type]
    there = Hub(broker, SeqHistory(0), node_id="n2")  # type: ignore[arg-type]
    await here.start()
    await there.start()
    try:
        reader_here = here.connect("u1", kind="ws", on_refused=lambda: None)
        reader_there = there.connect("u3", kind="ws", on_refused=lambda: None)
        sender = here.connect("u2", kind="ws", on_refused=lambda: None)  # not subscribed: acked anyway
        await here.subscribe(reader_here, "room:a", since=None)
        await there.subscribe(reader_there, "room:a", since=None)
        event = ChannelEvent(
            "room:a", "message", {"text": "hi"}, seq=1, reply_to=sender.id, ack={"client_msg_id": "c1"}
        )

        marked = here.fan_out_here_first([event])
        # Delivered here before anything was published.
        assert [f["seq"] for f in await queued_frames(reader_here)] == [1]
        assert await queued_frames(sender) == [{"type": "ack", "client_msg_id": "c1", "seq": 1}]
        assert [(e.origin, e.fanned_out_at_origin) for e in marked] == [("n1", True)]

        await broker.publish_many(marked)
        await asyncio.sleep(0.05)
        # The echo is skipped here (without the skip the sender would be acknowledged twice) ...
        assert await queued_frames(sender) == []
        assert await queued_frames(reader_here) == []
        # ... and fanned out by every other hub.
        assert [f["seq"] for f in await queued_frames(reader_there)] == [1]
    finally:
        await here.stop()
        await there.stop()


async def test_a_persisted_message_reaches_this_process_s_members_without_the_broker(
    container: Container,
) -> None:
    chat, hub = container.chat, container.hub
    users = [str(uuid.uuid4()) for _ in range(2)]
    room = (await chat.create_room("first", users, created_by=users[0])).id
    member = hub.connect(users[1], kind="ws", on_refused=lambda: None)
    await hub.subscribe(member, room_channel(room), since=None)
    published: list[ChannelEvent] = []
    delivered_before_publish: list[int] = []

    async def publish_many(events: list[ChannelEvent]) -> None:
        # A broker that has not delivered anything yet (a slow round trip, or one that is away).
        delivered_before_publish.append(len(member.queue))
        published.extend(events)

    persister = ChatPersister(
        chat, container.stream, publish_many, consumer="t1", fan_out_here_first=hub.fan_out_here_first
    )
    now = container.clock.now()
    await container.stream.publish(
        [send_message(room_id=room, sender=users[0], text="hello", client_msg_id="c1", reply_to="", now=now)]
    )
    assert await persister.run_once() == 1
    frames = await queued_frames(member)
    assert [(f["type"], f["seq"], f["text"]) for f in frames] == [("message", 1, "hello")]
    assert delivered_before_publish == [1]
    assert [(e.seq, e.origin, e.fanned_out_at_origin) for e in published] == [(1, hub.node_id, True)]
    await hub.disconnect(member)


async def test_one_event_failing_its_fan_out_neither_stops_the_others_nor_the_pass() -> None:
    hub = Hub(_LoopbackBroker(), SeqHistory(0), node_id="n1")  # type: ignore[arg-type]
    reader = hub.connect("u1", kind="ws", on_refused=lambda: None)
    await hub.subscribe(reader, "room:a", since=None)
    bad = ChannelEvent("room:a", "message", {"x": object()}, seq=1)  # its frame cannot be encoded
    good = ChannelEvent("room:b", "message", {}, seq=1)
    later = ChannelEvent("room:a", "message", {"text": "ok"}, seq=2)
    marked = hub.fan_out_here_first([bad, good, later])
    assert [e.seq for e in marked] == [1, 1, 2]
    # The bad frame is skipped (it cannot be written); the events after it are delivered.
    assert [f["seq"] for f in await queued_frames(reader)] == [2]
