"""The outbound queue's caps (oldest non-essential dropped first, essential never silently lost),
and a connection's per-channel cursor (gap refill from history, duplicates dropped, acks)."""

from __future__ import annotations

import asyncio

import orjson

from mercato.kit.realtime import ChannelEvent, Hub, Offer, OutboundQueue
from tests.unit.realtime_support import NoBroker, SeqHistory, queued_frames


def test_under_caps_everything_is_queued_in_order() -> None:
    queue = OutboundQueue(max_messages=3, max_bytes=100)
    assert [queue.offer(f"{i}".encode(), essential=True) for i in range(3)] == [Offer.QUEUED] * 3
    got = [asyncio.run(queue.get())[0] for _ in range(3)]
    assert got == [b"0", b"1", b"2"]


def test_oldest_non_essential_goes_first() -> None:
    queue = OutboundQueue(max_messages=3, max_bytes=1000)
    queue.offer(b"m1", essential=True)
    queue.offer(b"typing-old", essential=False)
    queue.offer(b"typing-new", essential=False)
    assert queue.offer(b"m2", essential=True) is Offer.QUEUED
    assert queue.dropped == 1
    frames = [asyncio.run(queue.get())[0] for _ in range(3)]
    assert frames == [b"m1", b"typing-new", b"m2"]


def test_a_non_essential_frame_that_cannot_fit_is_dropped_itself() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=1000)
    queue.offer(b"m1", essential=True)
    queue.offer(b"m2", essential=True)
    assert queue.offer(b"presence", essential=False) is Offer.DROPPED
    assert len(queue) == 2


def test_essential_overflow_then_refusal_at_the_hard_cap() -> None:
    queue = OutboundQueue(max_messages=2, max_bytes=1000, hard_factor=2.0)
    assert queue.offer(b"a", essential=True) is Offer.QUEUED
    assert queue.offer(b"b", essential=True) is Offer.QUEUED
    assert queue.offer(b"c", essential=True) is Offer.OVERFLOW
    assert queue.over_cap
    assert queue.offer(b"d", essential=True) is Offer.OVERFLOW
    assert queue.offer(b"e", essential=True) is Offer.REFUSED
    assert len(queue) == 4


def test_byte_cap_bounds_memory() -> None:
    queue = OutboundQueue(max_messages=10_000, max_bytes=1000, hard_factor=1.5)
    results = [queue.offer(b"x" * 100, essential=True) for _ in range(100)]
    assert Offer.REFUSED in results
    assert queue.size_bytes <= 1500


async def test_wait_below_cap_returns_once_drained() -> None:
    queue = OutboundQueue(max_messages=1, max_bytes=1000)
    queue.offer(b"a", essential=True)
    queue.offer(b"b", essential=True)
    waiter = asyncio.create_task(queue.wait_below_cap())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await queue.get()
    await asyncio.wait_for(waiter, 1)


async def test_a_connection_refills_a_broker_gap_and_drops_duplicates() -> None:
    history = SeqHistory(2)
    hub = Hub(NoBroker(), history, node_id="n1")  # type: ignore[arg-type]
    conn = hub.connect("u1", kind="ws", on_refused=lambda: None)
    await hub.subscribe(conn, "room:a", since=0)
    assert [f["seq"] for f in await queued_frames(conn)] == [1, 2]
    history.n = 5
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=5))  # 3 and 4 were lost by the broker
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=2))  # a duplicate
    await asyncio.sleep(0.05)
    assert [f["seq"] for f in await queued_frames(conn)] == [3, 4, 5]


async def test_the_sender_is_acknowledged_without_subscribing() -> None:
    hub = Hub(NoBroker(), SeqHistory(0), node_id="n1")  # type: ignore[arg-type]
    reader = hub.connect("u1", kind="ws", on_refused=lambda: None)
    sender = hub.connect("u2", kind="ws", on_refused=lambda: None)
    await hub.subscribe(reader, "room:a", since=None)
    hub.fan_out(ChannelEvent("room:a", "message", {}, seq=1, reply_to=sender.id, ack={"client_msg_id": "c"}))
    assert await queued_frames(sender) == [{"type": "ack", "client_msg_id": "c", "seq": 1}]
    assert [f["seq"] for f in await queued_frames(reader)] == [1]


async def test_a_long_resume_is_paced_by_the_reader_not_cut_off() -> None:
    hub = Hub(NoBroker(), SeqHistory(1000), node_id="n1", max_messages=10)  # type: ignore[arg-type]
    refused: list[bool] = []
    conn = hub.connect("u1", kind="ws", on_refused=lambda: refused.append(True))
    subscribing = asyncio.create_task(hub.subscribe(conn, "room:a", since=0))
    seqs: list[int] = []
    while len(seqs) < 1000:
        frame, _ = await asyncio.wait_for(conn.queue.get(), 5)
        seqs.append(int(orjson.loads(frame)["seq"]))
        assert len(conn.queue) <= 11  # the cap, plus at most the one frame the replay had in hand
    await subscribing
    assert seqs == list(range(1, 1001))
    assert not refused


class _SlowBroker:
    """A broker whose publish yields to the loop (as every real one does), recording announcements."""

    def __init__(self) -> None:
        self.published: list[ChannelEvent] = []

    async def publish(self, event: ChannelEvent) -> None:
        await asyncio.sleep(0.01)
        self.published.append(event)


async def test_the_last_members_leaving_at_once_both_leave_cleanly() -> None:
    """Two users' disconnects interleave while presence is announced (a slow consumer cut off while
    another member leaves): neither fails half-way, and the channel's presence ends empty."""
    broker = _SlowBroker()
    hub = Hub(broker, SeqHistory(0), node_id="n1")  # type: ignore[arg-type]
    a = hub.connect("u1", kind="ws", on_refused=lambda: None)
    b = hub.connect("u2", kind="ws", on_refused=lambda: None)
    for conn in (a, b):
        await hub.subscribe(conn, "room:a", since=None, presence=True)
    await asyncio.gather(hub.disconnect(a), hub.disconnect(b))
    assert hub.connections == {}
    assert broker.published[-1].data["users"] == []
    c = hub.connect("u3", kind="ws", on_refused=lambda: None)
    await hub.subscribe(c, "room:a", since=None, presence=True)
    assert broker.published[-1].data["users"] == ["u3"]
