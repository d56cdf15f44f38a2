"""The `Stream` port's contract: one suite every backend runs.

`StreamContract` holds the tests; a backend subclasses it as `Test<Backend>` and implements the
`make_stream` fixture (a factory taking the stream settings under test). The embedded SQL log runs
it on SQLite and PostgreSQL here; Redis Streams and NATS JetStream subclass it against real
servers. Time is a `ManualClock`: visibility timeouts pass by `elapse`, never by sleeping on the SQL
log. A broker times visibility on its own clock, which a ManualClock cannot move: its subclass sets
`broker_time_scale`, builds its streams with `visibility_timeout_s * broker_time_scale`, and `elapse`
then also sleeps `seconds * broker_time_scale` for real, so every test keeps its shape (no delivery
before the deadline, redelivery after it) with sub-second real timeouts.
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import pytest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import (
    DeadLetterStatus,
    Delivery,
    Message,
    SqlLogStream,
    Stream,
    partition_for,
    sql_log,
)

TOPIC = "mercato.orders"


def make_message(
    key: str, n: int = 0, *, topic: str = TOPIC, message_id: uuid.UUID | None = None, **data: Any
) -> Message:
    return Message(
        id=message_id or new_id(),
        source="/tests",
        type="mercato.orders.order_completed",
        subject=key,
        time=datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
        data={"n": n, **data},
        topic=topic,
        dataschema="https://schemas.mercato.dev/orders/order_completed/1",
        correlation_id="corr-1",
        headers={"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
    )


class StreamFactory(Protocol):
    def __call__(
        self, *, partitions: int = 4, visibility_timeout_s: float = 30.0, max_attempts: int = 3
    ) -> Stream: ...


async def drain(
    stream: Stream, group: str, consumer: str = "c1", *, max_messages: int = 100
) -> list[Delivery]:
    """Read and acknowledge until nothing is ready."""
    seen: list[Delivery] = []
    while batch := await stream.read(TOPIC, group, consumer, max_messages=max_messages, block_s=0):
        for delivery in batch:
            await stream.ack(delivery)
        seen.extend(batch)
    return seen


Elapse = Callable[[float], Awaitable[None]]


class StreamContract:
    """Subclass and provide `make_stream`; every test below must pass unchanged."""

    # None: the stream follows the test's ManualClock. A float: the backend's visibility timeouts run
    # on the broker's clock, scaled by this factor (see the module docstring).
    broker_time_scale: float | None = None

    @pytest.fixture
    def make_stream(self) -> StreamFactory:
        raise NotImplementedError("a backend's test class provides make_stream")

    @pytest.fixture
    def elapse(self, clock: ManualClock) -> Elapse:
        """Let `seconds` of visibility-timeout time pass, on whichever clock the backend uses."""

        async def elapse(seconds: float) -> None:
            clock.advance(seconds)
            if self.broker_time_scale is not None:
                await asyncio.sleep(seconds * self.broker_time_scale)

        return elapse

    async def test_cloudevent_round_trip_keeps_every_field(self) -> None:
        message = make_message("order-1", 7)
        event = message.to_cloudevent()
        assert event["specversion"] == "1.0"
        assert event["id"] == str(message.id)
        assert event["time"] == "2026-11-25T12:00:00.000000Z"
        assert event["partitionkey"] == "order-1"
        assert Message.from_json(message.to_json()) == message

    async def test_every_message_is_delivered_in_publish_order_per_key(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=3)
        keys = [f"order-{k}" for k in range(6)]
        published = [make_message(keys[n % 6], n) for n in range(36)]
        # Several publish calls, interleaving keys, as several relays' batches would.
        for start in range(0, 36, 7):
            await stream.publish(published[start : start + 7])
        delivered = await drain(stream, "billing", max_messages=5)
        assert sorted(d.message.id for d in delivered) == sorted(m.id for m in published)
        for key in keys:
            assert [d.message.data["n"] for d in delivered if d.message.key == key] == [
                m.data["n"] for m in published if m.key == key
            ]
        for delivery in delivered:
            assert delivery.partition == partition_for(delivery.message.key, partitions=3)
            assert delivery.attempt == 1
        assert delivered[0].message == next(m for m in published if m.id == delivered[0].message.id)

    async def test_ack_many_acknowledges_a_pass_across_partitions(self, make_stream: StreamFactory) -> None:
        """A consumer's pass acknowledged in one `ack_many` (the chat persister's): nothing left to
        the group, the next read goes on with new messages, every partition served again."""
        stream = make_stream(partitions=3)
        await stream.publish([make_message(f"k{n % 6}", n) for n in range(18)])
        batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
        assert len(batch) == 18
        assert len({d.partition for d in batch}) > 1
        await stream.ack_many(batch)
        assert await stream.lag(TOPIC, "g") == 0
        await stream.publish([make_message(f"k{n % 6}", 100 + n) for n in range(6)])
        again = await drain(stream, "g")
        assert sorted(d.message.data["n"] for d in again) == list(range(100, 106))

    async def test_offsets_increase_within_a_partition(self, make_stream: StreamFactory) -> None:
        stream = make_stream(partitions=2)
        await stream.publish([make_message(f"k{n % 5}", n) for n in range(20)])
        delivered = await drain(stream, "g")
        for partition in (0, 1):
            offsets = [d.offset for d in delivered if d.partition == partition]
            assert offsets == sorted(offsets)
            assert len(set(offsets)) == len(offsets)

    async def test_publishing_a_message_id_twice_stores_it_once(self, make_stream: StreamFactory) -> None:
        stream = make_stream()
        first = make_message("order-1", 1)
        second = make_message("order-2", 2)
        await stream.publish([first, second])
        await stream.publish([first])
        await stream.publish([second, first, second])
        assert await stream.lag(TOPIC, "g") == 2
        delivered = await drain(stream, "g")
        assert sorted(d.message.id for d in delivered) == sorted([first.id, second.id])

    async def test_concurrent_publishers_of_one_message_store_it_once(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream()
        message = make_message("order-1")
        await asyncio.gather(*(stream.publish([message]) for _ in range(5)))
        assert [d.message.id for d in await drain(stream, "g")] == [message.id]

    async def test_each_group_gets_every_message(self, make_stream: StreamFactory) -> None:
        stream = make_stream()
        messages = [make_message(f"k{n}", n) for n in range(5)]
        await stream.publish(messages)
        for group in ("billing", "shipping"):
            assert sorted(d.message.id for d in await drain(stream, group)) == sorted(m.id for m in messages)

    async def test_unacked_delivery_is_redelivered_after_the_visibility_timeout(
        self, make_stream: StreamFactory, elapse: Elapse
    ) -> None:
        stream = make_stream(visibility_timeout_s=10)
        message = make_message("order-1")
        await stream.publish([message])
        [first] = await stream.read(TOPIC, "g", "dies", max_messages=10, block_s=0)
        # The consumer dies without acking. Until the deadline nobody gets the message.
        await elapse(9)
        assert await stream.read(TOPIC, "g", "survivor", max_messages=10, block_s=0) == []
        await elapse(2)
        [again] = await stream.read(TOPIC, "g", "survivor", max_messages=10, block_s=0)
        assert again.message == message
        assert (again.attempt, again.consumer, again.offset) == (2, "survivor", first.offset)
        await stream.ack(again)
        # One more full visibility timeout is enough to show it never comes back.
        await elapse(11)
        assert await stream.read(TOPIC, "g", "survivor", max_messages=10, block_s=0) == []
        assert await stream.lag(TOPIC, "g") == 0

    async def test_a_late_ack_from_a_consumer_that_lost_its_lease_is_harmless(
        self, make_stream: StreamFactory, elapse: Elapse
    ) -> None:
        stream = make_stream(visibility_timeout_s=10)
        await stream.publish([make_message("order-1")])
        [stale] = await stream.read(TOPIC, "g", "slow", max_messages=10, block_s=0)
        await elapse(11)
        [fresh] = await stream.read(TOPIC, "g", "fast", max_messages=10, block_s=0)
        await stream.ack(stale)
        await stream.ack(fresh)
        assert await stream.lag(TOPIC, "g") == 0
        await elapse(11)
        assert await stream.read(TOPIC, "g", "fast", max_messages=10, block_s=0) == []

    async def test_nack_redelivers_the_message_before_the_rest_of_its_partition(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=1)
        messages = [make_message("order-1", n) for n in range(3)]
        await stream.publish(messages)
        batch = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        assert [d.message.data["n"] for d in batch] == [0, 1, 2]
        await stream.ack(batch[0])
        await stream.nack(batch[1], error="boom")
        # Message 2 was delivered but not handled: its ack no longer counts, it comes again.
        await stream.ack(batch[2])
        again = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        assert [(d.message.data["n"], d.attempt) for d in again] == [(1, 2), (2, 1)]

    async def test_a_message_failing_max_attempts_times_is_dead_lettered(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=1, max_attempts=3)
        poison, healthy = make_message("order-1", 0), make_message("order-1", 1)
        await stream.publish([poison, healthy])
        for attempt in (1, 2, 3):
            delivery = (await stream.read(TOPIC, "g", "c1", max_messages=1, block_s=0))[0]
            assert (delivery.message.id, delivery.attempt) == (poison.id, attempt)
            await stream.nack(delivery, error=f"ValueError: bad payload {attempt}")
        # The partition moves on past the poison message.
        [next_one] = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        assert next_one.message.id == healthy.id
        await stream.ack(next_one)
        assert await stream.lag(TOPIC, "g") == 0
        [letter] = await stream.dead_letters(topic=TOPIC)
        assert letter.message == poison
        assert (letter.group, letter.attempts, letter.status) == ("g", 3, DeadLetterStatus.DEAD)
        assert letter.last_error == "ValueError: bad payload 3"
        assert await stream.dead_letter(letter.id) == letter
        assert await stream.dead_letters(group="other") == []

    async def test_a_message_that_keeps_killing_its_consumer_is_dead_lettered(
        self, make_stream: StreamFactory, elapse: Elapse
    ) -> None:
        stream = make_stream(partitions=1, visibility_timeout_s=5, max_attempts=2)
        await stream.publish([make_message("order-1")])
        for _ in range(2):
            assert len(await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)) == 1
            await elapse(6)
        assert await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0) == []
        [letter] = await stream.dead_letters()
        assert letter.attempts == 2
        assert letter.last_error is not None
        assert "visibility timeout" in letter.last_error

    async def test_replayed_dead_letters_go_back_to_their_group_only(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=1, max_attempts=1)
        message = make_message("order-1")
        await stream.publish([message])
        await drain(stream, "shipping")
        [delivery] = await stream.read(TOPIC, "billing", "c1", max_messages=10, block_s=0)
        await stream.nack(delivery, error="RuntimeError: down")
        [letter] = await stream.dead_letters()
        assert await stream.replay_dead_letters(ids=[letter.id]) == 1
        assert await stream.read(TOPIC, "shipping", "c1", max_messages=10, block_s=0) == []
        [replayed] = await stream.read(TOPIC, "billing", "c2", max_messages=10, block_s=3.0)
        assert replayed.message == message
        assert replayed.attempt == 2
        await stream.ack(replayed)
        [done] = await stream.dead_letters()
        assert done.status == DeadLetterStatus.REPLAYED
        assert done.replayed_at is not None
        assert await stream.read(TOPIC, "billing", "c2", max_messages=10, block_s=0) == []
        # Nothing left to replay in bulk: it was handled.
        assert await stream.replay_dead_letters() == 0

    async def test_a_replayed_dead_letter_that_fails_again_returns_to_the_queue(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=1, max_attempts=1)
        await stream.publish([make_message("order-1")])
        [delivery] = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        await stream.nack(delivery, error="first")
        assert await stream.replay_dead_letters(topic=TOPIC) == 1
        # Blocking: on JetStream the replayed letter reaches its replay consumer asynchronously, and a
        # read checks for replays at most once a second (`replay_check_interval_s`).
        [replayed] = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=3.0)
        await stream.nack(replayed, error="second")
        [letter] = await stream.dead_letters()
        assert (letter.status, letter.attempts, letter.last_error) == (DeadLetterStatus.DEAD, 2, "second")

    async def test_replay_from_an_offset_or_a_time_delivers_again(
        self, make_stream: StreamFactory, clock: ManualClock
    ) -> None:
        stream = make_stream(partitions=1)
        early = [make_message("order-1", n) for n in range(3)]
        await stream.publish(early)
        clock.advance(3600)
        late = [make_message("order-1", n) for n in range(3, 5)]
        await stream.publish(late)
        assert len(await drain(stream, "g")) == 5
        await stream.replay(TOPIC, "g", from_offset=1)
        assert [d.message.data["n"] for d in await drain(stream, "g")] == [1, 2, 3, 4]
        await stream.replay(TOPIC, "g", from_time=clock.now() - timedelta(seconds=1))
        assert [d.message.data["n"] for d in await drain(stream, "g")] == [3, 4]
        await stream.replay(TOPIC, "g", from_time=clock.now() + timedelta(days=1))
        assert await drain(stream, "g") == []
        with pytest.raises(ValueError, match="exactly one"):
            await stream.replay(TOPIC, "g")

    async def test_lag_counts_what_the_group_has_not_acknowledged(self, make_stream: StreamFactory) -> None:
        stream = make_stream(partitions=2)
        assert await stream.lag(TOPIC, "g") == 0
        await stream.publish([make_message(f"k{n}", n) for n in range(5)])
        assert await stream.lag(TOPIC, "g") == 5
        batch = await stream.read(TOPIC, "g", "c1", max_messages=2, block_s=0)
        assert await stream.lag(TOPIC, "g") == 5
        for delivery in batch:
            await stream.ack(delivery)
        assert await stream.lag(TOPIC, "g") == 3
        assert await stream.lag(TOPIC, "other") == 5

    async def test_concurrent_consumers_of_a_group_never_share_a_delivery(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=4)
        messages = [make_message(f"k{n}", n) for n in range(40)]
        await stream.publish(messages)

        async def consume(name: str) -> list[uuid.UUID]:
            got: list[uuid.UUID] = []
            while batch := await stream.read(TOPIC, "g", name, max_messages=3, block_s=0):
                for delivery in batch:
                    got.append(delivery.message.id)
                    await stream.ack(delivery)
            return got

        results = await asyncio.gather(*(consume(f"c{n}") for n in range(3)))
        everything = [mid for got in results for mid in got]
        assert sorted(everything) == sorted(m.id for m in messages)

    async def test_read_blocks_up_to_block_s_for_a_message(self, make_stream: StreamFactory) -> None:
        stream = make_stream()
        message = make_message("order-1")

        async def publish_soon() -> None:
            await asyncio.sleep(0.05)
            await stream.publish([message])

        publisher = asyncio.create_task(publish_soon())
        got = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=2.0)
        await publisher
        assert [d.message.id for d in got] == [message.id]
        assert await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0.05) == []


class TestSqlLogStream(StreamContract):
    @pytest.fixture
    def make_stream(self, container: Container, clock: ManualClock) -> Callable[..., Stream]:
        def build(
            *, partitions: int = 4, visibility_timeout_s: float = 30.0, max_attempts: int = 3
        ) -> Stream:
            return SqlLogStream(
                container.db,
                partitions=partitions,
                visibility_timeout_s=visibility_timeout_s,
                max_attempts=max_attempts,
                poll_interval_s=0.02,
                clock=clock,
            )

        return build

    async def test_an_ack_from_a_consumer_that_lost_its_claim_is_refused(
        self, make_stream: StreamFactory, clock: ManualClock
    ) -> None:
        stream = make_stream(visibility_timeout_s=10)
        await stream.publish([make_message("order-1")])
        [stale] = await stream.read(TOPIC, "g", "slow", max_messages=10, block_s=0)
        clock.advance(11)
        [fresh] = await stream.read(TOPIC, "g", "fast", max_messages=10, block_s=0)
        await stream.ack(stale)
        await stream.nack(stale, error="late")
        # Neither counted: the message is still the new owner's, on its second attempt.
        assert await stream.lag(TOPIC, "g") == 1
        assert await stream.dead_letters() == []
        await stream.ack(fresh)
        assert await stream.lag(TOPIC, "g") == 0
        clock.advance(11)
        assert await stream.read(TOPIC, "g", "fast", max_messages=10, block_s=0) == []

    async def test_acks_out_of_order_complete_the_batch_without_waiting_for_its_deadline(
        self, make_stream: StreamFactory
    ) -> None:
        stream = make_stream(partitions=1)
        await stream.publish([make_message("order-1", n) for n in range(4)])
        batch = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        for delivery in (batch[2], batch[1], batch[3], batch[0]):
            await stream.ack(delivery)
        assert await stream.lag(TOPIC, "g") == 0
        later = make_message("order-1", 4)
        await stream.publish([later])
        [next_one] = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        assert (next_one.message.id, next_one.offset, next_one.attempt) == (later.id, 4, 1)

    async def test_concurrent_acks_of_one_batch_in_any_order_all_count(
        self, make_stream: StreamFactory, clock: ManualClock
    ) -> None:
        # On PostgreSQL the acks run on several connections at once, so in-order acks (one
        # statement) race out-of-order ones (the general path) for the cursor row.
        stream = make_stream(partitions=1, visibility_timeout_s=10)
        rng = random.Random(7)
        for round_ in range(5):
            await stream.publish([make_message("order-1", round_ * 20 + n) for n in range(20)])
            batch = await stream.read(TOPIC, "g", "c1", max_messages=20, block_s=0)
            assert [d.message.data["n"] for d in batch] == [round_ * 20 + n for n in range(20)]
            rng.shuffle(batch)
            await asyncio.gather(*(stream.ack(delivery) for delivery in batch))
            assert await stream.lag(TOPIC, "g") == 0
        clock.advance(11)
        assert await stream.read(TOPIC, "g", "c1", max_messages=20, block_s=0) == []

    async def test_an_in_order_ack_waiting_on_an_out_of_order_one_still_completes_the_batch(
        self, make_stream: StreamFactory, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        stream = make_stream(partitions=1)
        assert isinstance(stream, SqlLogStream)
        await stream.publish([make_message("order-1", n) for n in range(2)])
        first, second = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        holding = asyncio.Event()
        advance = sql_log.advance

        async def advance_slowly(*args: Any) -> int:
            # The ack of `second` holds the cursor row here, its own ack recorded, while the ack
            # of `first` arrives and waits for the row.
            holding.set()
            await asyncio.sleep(0.2)
            return await advance(*args)

        monkeypatch.setattr(sql_log, "advance", advance_slowly)

        async def ack_first_meanwhile() -> None:
            await holding.wait()
            await stream.ack(first)

        await asyncio.gather(stream.ack(second), ack_first_meanwhile())
        assert await stream.lag(TOPIC, "g") == 0
        later = make_message("order-1", 2)
        await stream.publish([later])
        [next_one] = await stream.read(TOPIC, "g", "c1", max_messages=10, block_s=0)
        assert next_one.message.id == later.id
