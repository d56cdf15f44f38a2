"""Round-trip budgets of the messaging hot paths: relaying an outbox batch, a consumer's poll.

The worker's relay, consumers and projectors poll several times a second, and on a CPU-bound host
each statement (~300 µs of client CPU through SQLAlchemy on asyncpg) and each transaction (BEGIN
and COMMIT/ROLLBACK, a pool checkout: ~450 µs more) counts. Statements are counted the way the
bench's probe counts them (`mercato.bench.checkout_probe`: every `before_cursor_execute`, and a
transaction per commit or rollback of a connection that executed one), plus what the SQL log's
driver path sends past SQLAlchemy (`add_driver_listener`), which those events never see.
"""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import Consumer, Message, Outbox, OutboxRelay, SqlLogStream
from mercato.kit.messaging.message import partition_for
from mercato.kit.projections import Projection, Projector
from mercato.kit.storage.statements import add_driver_listener
from tests.integration.statement_budget import counting
from tests.integration.test_projections import counts
from tests.integration.test_stream_contract import TOPIC, make_message


@pytest.fixture
def stream(container: Container, clock: ManualClock) -> SqlLogStream:
    return SqlLogStream(container.db, partitions=8, visibility_timeout_s=10, clock=clock)


async def add_to_outbox(container: Container, clock: ManualClock, messages: list[Message]) -> None:
    async with container.db.write() as conn:
        await Outbox(clock=clock).add_many(conn, messages)


async def test_relaying_a_batch_costs_one_transaction_whatever_its_partitions(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    relay = OutboxRelay(container.db, stream, batch_size=100, clock=clock)
    keys = [f"order-{n}" for n in range(4)]
    # The keys' partitions already have heads: the steady state, not a topic's first message.
    await add_to_outbox(container, clock, [make_message(key) for key in keys])
    assert await relay.relay_once() == 4
    batch = [make_message(keys[n % 4], n=n) for n in range(20)]
    await add_to_outbox(container, clock, batch)

    full: list[str] = []
    remove = add_driver_listener(lambda sql: full.append(sql) if sql else None)
    try:
        with counting(container) as relayed:
            assert await relay.relay_once() == 20
    finally:
        remove()

    # One transaction (ADR 0083; was three: the claim and the mark committed on their own around the
    # publish's): the claim (pick + order check, the rows locked and marked published: one UPDATE
    # ... RETURNING), then the publish (reserve the offsets of every partition in one upsert, the
    # dedup lookup, one multi-row append), committed together. The backlog gauge's count ran on the
    # first pass and waits for its interval. All prepared on the raw-driver layer.
    assert (len(relayed.statements), relayed.transactions) == (4, 1), relayed.report()
    assert all(sql.startswith("driver: ") for sql in relayed.statements), relayed.report()
    claim = full[0]
    assert "UPDATE messaging_outbox SET published_at" in claim, claim
    assert "claim_token" not in claim.split("RETURNING")[0].split("SET", 1)[1], claim
    assert full[-1].startswith("INSERT INTO messaging_stream_log"), full[-1]
    deliveries = await stream.read(TOPIC, "g", "c", max_messages=100, block_s=0)
    by_key: dict[str, list[int]] = {}
    for delivery in deliveries:
        by_key.setdefault(delivery.message.key, []).append(int(delivery.message.data["n"]))
    assert by_key == {key: [0, *range(n, 20, 4)] for n, key in enumerate(keys)}


def consumer(container: Container, stream: SqlLogStream, clock: ManualClock) -> Consumer:
    async def handle(_conn: AsyncConnection, _message: Message) -> None:
        return None  # the messaging's own cost only: no effect statements

    return Consumer(container.db, stream, topic=TOPIC, group="budget", name="c1", handler=handle)


async def test_an_idle_consumer_poll_is_one_statement_and_no_transaction(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    await stream.publish([make_message(f"order-{n}") for n in range(3)])
    reader = consumer(container, stream, clock)
    assert await reader.run_once() == 3

    with counting(container) as idle:
        assert await reader.run_once() == 0

    # The probe (heads joined with the group's cursors, and any due replay) says there is nothing
    # to take, and the lag gauge was just reported. Before: a read transaction of three
    # statements, then the lag in a second one of two.
    assert (len(idle.statements), idle.transactions) == (1, 0), idle.report()


async def test_a_consumer_poll_of_k_messages_costs_two_transactions_whatever_k(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    reader = consumer(container, stream, clock)
    await stream.publish([make_message("order-0")])
    assert await reader.run_once() == 1
    k = 5
    await stream.publish([make_message("order-0", n=n) for n in range(k)])

    with counting(container) as busy:
        assert await reader.run_once() == k

    # Probe; the read (lock the cursors, the batch, move the cursor); the whole batch's inbox
    # records in one INSERT ... RETURNING, in one transaction with the (here empty) effects; one
    # ack moving the partition's watermark past the batch. The lag was reported by the pass before,
    # and a busy pass reports it at most once a second (ADR 0072; it was one more statement on
    # every busy pass, 7 in all). Before (ADR 0055): the inbox insert in a transaction of its own
    # and a one-statement ack per message, 5 + 2k in 1 + k.
    assert (len(busy.statements), busy.transactions) == (6, 2), busy.report()
    # Every one on the raw-driver layer (the inbox record too, prepared once per batch size).
    assert all(sql.startswith("driver: ") for sql in busy.statements), busy.report()
    # The ack is the inbox transaction's last statement, committed with the effects (ADR 0083:
    # was autocommitted after it, one commit more a pass): nothing runs after that commit.
    assert busy.timeline[-2].startswith("driver: UPDATE messaging_stream_cursors"), busy.timeline
    assert busy.timeline[-1] == "END", busy.timeline
    assert await stream.lag(TOPIC, "budget") == 0


async def test_a_consumer_poll_costs_six_statements_whatever_its_partitions(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    reader = consumer(container, stream, clock)
    keys = [f"order-{n}" for n in range(3)]
    await stream.publish([make_message(key) for key in keys])
    assert await reader.run_once() == 3
    partitions = {partition_for(key, partitions=8) for key in keys}
    assert len(partitions) == 3
    await stream.publish([make_message(keys[n % 3], n=n) for n in range(12)])

    with counting(container) as busy:
        assert await reader.run_once() == 12

    # Probe; the read (lock the cursors, every partition's batch in one SELECT, every cursor move
    # in one UPDATE); the inbox records all 12 in one statement; one in-order ack moves every
    # partition's watermark past its run: 6, as for one partition (ADR 0073: was 3 + 3 per
    # partition, 12 here; ADR 0072: 4 + 3 per partition; before ADR 0055: 4 + 2 per partition +
    # 2 per message). The lag was reported by the pass before.
    moves = [sql for sql in busy.statements if sql.startswith("driver: UPDATE messaging_stream_cursors")]
    assert len(moves) == 2, busy.report()  # the read's cursor moves, the ack
    assert (len(busy.statements), busy.transactions) == (6, 2), busy.report()
    assert busy.timeline[-2:] == [moves[1], "END"], busy.timeline  # the ack, in the inbox's commit
    assert await stream.lag(TOPIC, "budget") == 0


async def test_an_idle_projector_pass_is_one_statement_and_no_transaction(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    async def apply(_conn: AsyncConnection, _message: Message, _tables: Any) -> None:
        return None

    projection = Projection(name="budget", topics=(TOPIC,), tables=(counts,), apply=apply)
    projector = Projector(container.db, projection, clock=clock)
    await stream.publish([make_message(f"order-{n}") for n in range(3)])
    assert await projector.run_once() == 3

    with counting(container) as idle:
        assert await projector.run_once() == 0

    # Heads joined with the checkpoint, autocommitted. Before: two statements in a transaction.
    assert (len(idle.statements), idle.transactions) == (1, 0), idle.report()


async def test_a_busy_projector_pass_is_all_on_the_driver_path(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    async def apply(_conn: AsyncConnection, _message: Message, _tables: Any) -> None:
        return None

    projection = Projection(name="budget", topics=(TOPIC,), tables=(counts,), apply=apply)
    projector = Projector(container.db, projection, clock=clock)
    await stream.publish([make_message(f"order-{n}") for n in range(6)])
    assert await projector.run_once() == 6  # creates the checkpoint rows of these partitions
    messages = [make_message(f"order-{n}") for n in range(6)]
    partitions = {partition_for(m.key, partitions=8) for m in messages}
    await stream.publish(messages)

    with counting(container) as busy:
        assert await projector.run_once() == 6

    # The probe, the checkpoint's compare-and-set over every partition with work, one read of all
    # their ranges: in one transaction, every statement a prepared one on the raw driver, whatever
    # the number of partitions (session 11: was the lock, one read per partition and the save,
    # 3 + partitions; before that the lock, the reads and the save went through SQLAlchemy).
    assert len(partitions) > 1
    assert (len(busy.statements), busy.transactions) == (3, 1), busy.report()
    assert all(sql.startswith("driver: ") for sql in busy.statements), busy.report()
