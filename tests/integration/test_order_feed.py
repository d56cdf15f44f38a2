"""The live order feed (shop/orders/live.py, ADR 0071): a pass appends its events in one transaction
and publishes them in one call; when that fails, events go one at a time and only the failing
order's events wait (nacked, redelivered in order)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from mercato.bootstrap import Container
from mercato.kit.messaging import Message
from mercato.kit.messaging.message import partition_for
from mercato.kit.realtime import ChannelEvent
from mercato.shop.orders.live import ORDER_FEED_GROUP, OrderFeed, order_channel
from tests.integration.statement_budget import counting

_T0 = datetime(2026, 12, 6, 12, tzinfo=UTC)


def _event(order_id: uuid.UUID, kind: str, seconds: int, topic: str = "mercato.orders") -> Message:
    return Message(
        id=uuid.uuid4(),
        source="/test",
        type=f"{topic}.{kind}",
        subject=str(order_id),
        time=_T0 + timedelta(seconds=seconds),
        data={"order_id": str(order_id), "amount_minor": 1250, "currency": "EUR"},
        topic=topic,
    )


class _Publisher:
    def __init__(self, *, refuse: str | None = None) -> None:
        self.calls: list[list[ChannelEvent]] = []
        self.refuse = refuse  # a channel whose events fail to publish

    async def __call__(self, events: list[ChannelEvent]) -> None:
        if self.refuse is not None and any(e.channel == self.refuse for e in events):
            raise ConnectionError("broker away")
        self.calls.append(list(events))


async def test_a_pass_appends_in_one_transaction_and_publishes_once(container: Container) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    await container.stream.publish(
        [
            _event(a, "order_placed", 1),
            _event(b, "order_placed", 2),
            _event(a, "payment_authorized", 3, "mercato.payments"),
            _event(a, "order_completed", 4),
        ]
    )
    publish = _Publisher()
    feed = OrderFeed(container.stream, container.channel_history, publish, consumer="t")
    with counting(container) as tally:
        assert await feed.run_once() == 4
    # One call for the pass (was one per event), in creation order, each order's seqs from 1.
    assert len(publish.calls) == 1
    published = [(e.channel, e.type, e.seq) for e in publish.calls[0]]
    assert published == [
        (order_channel(a), "status", 1),
        (order_channel(b), "status", 1),
        (order_channel(a), "step", 2),
        (order_channel(a), "status", 3),
    ]
    inserts = [s for s in tally.statements if "INSERT INTO realtime_channel_history" in s]
    if container.db.dialect == "postgresql":
        # The pass's four events in one autocommitted statement on the driver path (was a
        # transaction of one insert per event through SQLAlchemy: six round trips).
        # (`append_many`'s statement starts with its input CTE; the tally keeps a statement's head.)
        appends = [s for s in tally.statements if s.startswith("driver: WITH input AS")]
        assert len(appends) == 1, tally.report()
        assert not inserts, tally.report()
        assert not [s for s in tally.statements if s.removeprefix("driver: ").upper() in ("BEGIN", "COMMIT")]
    else:
        assert len(inserts) == 4, tally.report()
    for topic in ("mercato.orders", "mercato.payments"):
        assert await container.stream.lag(topic, ORDER_FEED_GROUP) == 0
    assert await container.channel_history.head(order_channel(a)) == 3


def _apart(partitions: int) -> tuple[uuid.UUID, uuid.UUID]:
    """Two orders in different partitions (in one, a nack also revokes the other's later delivery)."""
    a = uuid.uuid4()
    while True:
        b = uuid.uuid4()
        if partition_for(str(a), partitions=partitions) != partition_for(str(b), partitions=partitions):
            return a, b


async def test_a_failing_order_waits_and_the_others_go_on(container: Container) -> None:
    a, b = _apart(container.stream.partitions)  # type: ignore[attr-defined]
    await container.stream.publish(
        [
            _event(a, "order_placed", 1),
            _event(b, "order_placed", 2),
            _event(a, "order_completed", 3),
        ]
    )
    publish = _Publisher(refuse=order_channel(a))
    feed = OrderFeed(container.stream, container.channel_history, publish, consumer="t")
    assert await feed.run_once() == 1  # b's event; a's first failed and its second waited
    assert [[e.channel for e in call] for call in publish.calls] == [[order_channel(b)]]
    assert await container.stream.lag("mercato.orders", ORDER_FEED_GROUP) == 2
    # The broker is back: a's events come again, in order, with the seqs their first append gave.
    publish.refuse = None
    container.clock.advance(300)  # type: ignore[attr-defined]  # past the nack's backoff
    handled = 0
    for _ in range(5):
        handled += await feed.run_once()
        if handled == 2:
            break
    assert handled == 2
    assert [(e.channel, e.seq) for e in publish.calls[-1]] == [(order_channel(a), 1), (order_channel(a), 2)]
    assert await container.stream.lag("mercato.orders", ORDER_FEED_GROUP) == 0


async def test_an_appended_event_is_one_statement_and_a_repeat_returns_its_first_seq(
    container: Container,
) -> None:
    history = container.channel_history
    with counting(container) as first:
        async with container.db.write() as conn:
            one, new_one = await history.append(conn, "order:h", "status", {"n": 1}, dedup_key="m-1")
            two, new_two = await history.append(conn, "order:h", "step", {"n": 2}, dedup_key="m-2")
    # Was three per event (the dedup read, the max seq, the insert).
    assert len(first.statements) == 2, first.report()
    assert (one.seq, new_one, two.seq, new_two) == (1, True, 2, True)
    async with container.db.write() as conn:
        again, new_again = await history.append(conn, "order:h", "other", {"n": 9}, dedup_key="m-1")
        other, _ = await history.append(conn, "order:other", "status", {"n": 3}, dedup_key="m-1")
    # The first append's event, unchanged; the same key on another channel is another event.
    assert (again.seq, again.type, again.data, new_again) == (1, "status", {"n": 1}, False)
    assert other.seq == 1
    assert [e.seq for e in await history.after("order:h", 0, limit=10)] == [1, 2]


async def test_append_many_numbers_each_channel_after_its_head_and_returns_seen_events_as_stored(
    container: Container,
) -> None:
    history = container.channel_history
    async with container.db.write() as conn:
        await history.append(conn, "order:x", "status", {"n": 0}, dedup_key="x-0")
    events = await history.append_many(
        [
            ("order:x", "step", {"n": 1}, "x-1"),
            ("order:y", "status", {"n": 1}, "y-1"),
            ("order:x", "other", {"n": 9}, "x-0"),  # stored before: its first event, unchanged
            ("order:x", "step", {"n": 2}, "x-2"),
            ("order:y", "again", {"n": 8}, "y-1"),  # an earlier item of this call: that one's event
        ]
    )
    assert [(e.channel, e.type, e.data, e.seq) for e in events] == [
        ("order:x", "step", {"n": 1}, 2),
        ("order:y", "status", {"n": 1}, 1),
        ("order:x", "status", {"n": 0}, 1),
        ("order:x", "step", {"n": 2}, 3),
        ("order:y", "status", {"n": 1}, 1),
    ]
    # Committed, gap-free, and a repeat of the whole call changes nothing.
    again = await history.append_many([("order:x", "step", {"n": 2}, "x-2"), ("order:y", "s", {}, "y-1")])
    assert [(e.channel, e.seq) for e in again] == [("order:x", 3), ("order:y", 1)]
    assert [(e.seq, e.data) for e in await history.after("order:x", 0, limit=10)] == [
        (1, {"n": 0}),
        (2, {"n": 1}),
        (3, {"n": 2}),
    ]
    assert await history.head("order:y") == 1
    assert await history.append_many([]) == []
