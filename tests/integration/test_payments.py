"""The payment ledger consumer and route on real SQLite and PostgreSQL: each event applies once."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import text

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Consumer, Delivery, Message, SqlLogStream
from mercato.shop.payments import LedgerStatus, PaymentLedgerNotFound
from mercato.shop.payments.contracts import (
    PAYMENT_AUTHORIZED,
    PAYMENT_CAPTURED,
    PAYMENT_REFUNDED,
    PAYMENTS_TOPIC,
)
from mercato.workers.jobs import shop_jobs
from tests.integration.shop_support import admin, api, customer
from tests.integration.statement_budget import counting


@pytest.fixture
def stream(container: Container, clock: ManualClock) -> SqlLogStream:
    return SqlLogStream(container.db, partitions=2, visibility_timeout_s=10, max_attempts=3, clock=clock)


def payment_event(event_type: str, order_id: str, /, **data: Any) -> Message:
    return Message(
        id=new_id(),
        source="mercato/checkout",
        type=event_type,
        subject=order_id,
        time=datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
        data={"order_id": order_id, **data},
        topic=PAYMENTS_TOPIC,
    )


def paid_and_refunded(order_id: str) -> list[Message]:
    return [
        payment_event(
            PAYMENT_AUTHORIZED, order_id, authorization_id="auth-1", amount_minor=2_500, currency="EUR"
        ),
        payment_event(
            PAYMENT_CAPTURED,
            order_id,
            authorization_id="auth-1",
            capture_id="cap-1",
            amount_minor=2_500,
            currency="EUR",
        ),
        payment_event(PAYMENT_REFUNDED, order_id, capture_id="cap-1", amount_minor=1_000, currency="EUR"),
    ]


async def test_redelivered_payment_events_apply_once(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    class AckLost:
        """The real stream, except that acks never arrive (the consumer dies after each commit)."""

        def __getattr__(self, name: str) -> object:
            if name == "ack_in_order_runs":
                # Acks apart from the consumer's transaction, as a broker's are: on the SQL log of
                # the consumer's database they commit with its effects and cannot be lost alone.
                raise AttributeError(name)
            return getattr(stream, name)

        async def ack(self, delivery: Delivery) -> None:
            raise ConnectionError("consumer died after commit, before ack")

        async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
            raise ConnectionError("consumer died after commit, before ack")

    order_id = str(uuid.uuid4())
    messages = paid_and_refunded(order_id)
    await stream.publish(messages)
    dying = container.payments.consumer(AckLost())  # type: ignore[arg-type]
    with pytest.raises(ConnectionError):
        await dying.run_once()
    first = await container.payments.ledger(order_id)
    assert first.ledger.version == 3  # the batch committed in one transaction, then the process died
    healthy = container.payments.consumer(stream)
    clock.advance(11)  # past the visibility timeout: everything is redelivered
    assert await healthy.run_once() == 3
    # The relay publishing them all again (and a retry with a new message id) changes nothing.
    await stream.publish(messages)
    await stream.publish([payment_event(PAYMENT_CAPTURED, order_id, **messages[1].data)])
    assert await healthy.run_once() == 1
    view = await container.payments.ledger(order_id)
    ledger = view.ledger
    assert (ledger.status, ledger.version) == (LedgerStatus.PARTIALLY_REFUNDED, 3)
    assert (ledger.authorized_minor, ledger.captured_minor, ledger.refunded_minor) == (2_500, 2_500, 1_000)
    assert [e.type for e in view.history] == ["payment_authorized", "payment_captured", "payment_refunded"]
    assert [e.metadata["message_id"] for e in view.history] == [str(m.id) for m in messages]


async def test_an_event_breaking_a_ledger_rule_is_dead_lettered_not_applied(
    container: Container, stream: SqlLogStream, clock: ManualClock
) -> None:
    order_id = str(uuid.uuid4())
    authorize, capture, _ = paid_and_refunded(order_id)
    too_much = payment_event(
        PAYMENT_CAPTURED, order_id, **{**capture.data, "capture_id": "cap-2", "amount_minor": 9}
    )
    await stream.publish([authorize, capture, too_much])
    consumer: Consumer = container.payments.consumer(stream)
    for _ in range(3):
        await consumer.run_once()
        clock.advance(60)
    ledger = (await container.payments.ledger(order_id)).ledger
    assert (ledger.captured_minor, ledger.version) == (2_500, 2)
    dead = await stream.dead_letters(group="payments-ledger")
    assert [d.message.id for d in dead] == [too_much.id]


async def test_the_worker_runs_the_ledger_consumer(container: Container) -> None:
    order_id = str(uuid.uuid4())
    await container.stream.publish(paid_and_refunded(order_id)[:1])
    job = next(job for job in shop_jobs(container) if job.name == "payments_ledger")
    assert await job.run() == 1
    assert (await container.payments.ledger(order_id)).ledger.status is LedgerStatus.AUTHORIZED


async def test_get_payment_ledger_route(container: Container, stream: SqlLogStream) -> None:
    order_id = str(uuid.uuid4())
    await stream.publish(paid_and_refunded(order_id))
    await container.payments.consumer(stream).run_once()
    _, customer_headers = await customer(container)
    async with api(container) as client:
        response = await client.get(f"/v1/payments/{order_id}", headers=await admin(container))
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "private, no-store"
        body = response.json()
        assert {
            k: body[k] for k in ("order_id", "status", "captured_minor", "refundable_minor", "version")
        } == {
            "order_id": order_id,
            "status": "partially_refunded",
            "captured_minor": 2_500,
            "refundable_minor": 1_500,
            "version": 3,
        }
        assert [(e["version"], e["type"]) for e in body["events"]] == [
            (1, "payment_authorized"),
            (2, "payment_captured"),
            (3, "payment_refunded"),
        ]
        assert body["events"][1]["data"]["capture_id"] == "cap-1"
        missing = await client.get(f"/v1/payments/{uuid.uuid4()}", headers=await admin(container))
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        assert missing.json()["type"].endswith(PaymentLedgerNotFound.slug)
        # A customer reads only its own orders' ledgers; another's is 404, as if it did not exist.
        assert (await client.get(f"/v1/payments/{order_id}", headers=customer_headers)).status_code == 404
        assert (await client.get(f"/v1/payments/{order_id}")).status_code == 401
        assert "/v1/payments/{order_id}" in (await client.get("/openapi.json")).json()["paths"]


async def test_a_ledger_write_lost_to_a_concurrent_writer_is_decided_again_in_the_same_transaction(
    container: Container, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: no second transaction can append meanwhile")
    order_id = str(uuid.uuid4())
    [authorized] = paid_and_refunded(order_id)[:1]
    service = container.payments
    real_load = service.ledgers.load
    raced: list[int] = []

    async def load_then_lose_the_race(conn: Any, stream_id: str) -> Any:
        ledger = await real_load(conn, stream_id)
        if not raced:
            raced.append(ledger.version)
            # Another consumer instance (a rebalance) records the same authorization and commits.
            async with container.db.write() as other:
                rival = await real_load(other, stream_id)
                rival.authorize(authorization_id="auth-1", amount_minor=2_500, currency="EUR")
                await service.ledgers.save(other, rival)
        return ledger

    service.ledgers.load = load_then_lose_the_race  # type: ignore[method-assign]
    with counting(container) as handled:
        async with container.db.write() as conn:
            await service.handle(conn, authorized)

    # The append saw version 1, not the 0 it was decided on, and raised; the handler reloaded and
    # found the authorization recorded. The one savepoint is the rival's append's own: the handler
    # opens none around its attempts (before ADR 0055: one per attempt, three in all).
    assert raced == [0]
    assert (await service.ledger(order_id)).ledger.version == 1
    savepoints = [sql for sql in handled.statements if sql.startswith("SAVEPOINT")]
    assert len(savepoints) == 1, handled.report()


def three_orders_paid() -> tuple[list[Message], list[str]]:
    orders = [str(uuid.uuid4()) for _ in range(3)]
    messages = [m for order_id in orders for m in paid_and_refunded(order_id)[:2]]
    return messages, orders


async def test_a_batch_of_payment_events_costs_two_statements_whatever_its_size(
    container: Container, database_url: str
) -> None:
    service = container.payments
    messages, orders = three_orders_paid()
    # Interleaved as the stream delivers them: each order's events in order, orders mixed.
    interleaved = messages[0::2] + messages[1::2]
    with counting(container) as handled:
        async with container.db.write() as conn:
            await service.handle_batch(conn, interleaved)

    for order_id in orders:
        view = await service.ledger(order_id)
        assert (view.ledger.status, view.ledger.version) == (LedgerStatus.CAPTURED, 2)
        assert [e.type for e in view.history] == ["payment_authorized", "payment_captured"]
        expected_ids = [str(m.id) for m in messages if m.data["order_id"] == order_id]
        assert [e.metadata["message_id"] for e in view.history] == expected_ids
    if database_url.startswith("postgresql"):
        # Every ledger loaded in one statement (which also takes the event store's append lock),
        # every event appended in one (ADR 0073). Before: 7 per event (snapshot, events, lock,
        # version, SAVEPOINT, INSERT, RELEASE), 42 for these 6.
        assert (len(handled.statements), handled.transactions) == (2, 1), handled.report()
    else:
        # SQLite: per ledger, its snapshot and events read and one checked INSERT.
        assert len(handled.statements) <= 3 * len(orders), handled.report()
    # A second batch repeating them (a redelivery that escaped the inbox) records nothing new.
    async with container.db.write() as conn:
        await service.handle_batch(conn, interleaved)
    assert (await service.ledger(orders[0])).ledger.version == 2


async def test_a_batch_loaded_before_a_concurrent_append_committed_is_decided_again(
    container: Container, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer: no second transaction can append meanwhile")
    service = container.payments
    order_id = str(uuid.uuid4())
    authorized, captured = paid_and_refunded(order_id)[:2]
    rival_holds_the_lock = asyncio.Event()
    let_the_rival_commit = asyncio.Event()

    async def rival() -> None:
        # Another consumer instance (a rebalance) records the same authorization, holding the
        # event store's append lock until it commits.
        async with container.db.write() as other:
            ledger = await service.ledgers.load(other, order_id)
            ledger.authorize(authorization_id="auth-1", amount_minor=2_500, currency="EUR")
            await service.ledgers.save(other, ledger)
            rival_holds_the_lock.set()
            await let_the_rival_commit.wait()

    async def batch() -> None:
        async with container.db.write() as conn:
            await service.handle_batch(conn, [authorized, captured])

    rival_task = asyncio.create_task(rival())
    await rival_holds_the_lock.wait()
    batch_task = asyncio.create_task(batch())
    # The batch's load started (its snapshot taken: version 0) and waits for the append lock.
    async with container.db.read() as conn:
        for _ in range(200):
            waiting = await conn.scalar(
                text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            )
            if waiting:
                break
            await asyncio.sleep(0.01)
    assert waiting == 1
    let_the_rival_commit.set()
    await rival_task
    await batch_task

    # The append found version 1 where the load said 0: nothing of it was written, the ledger was
    # reloaded under the lock, the authorization found recorded and only the capture appended.
    view = await service.ledger(order_id)
    assert [(e.version, e.type) for e in view.history] == [(1, "payment_authorized"), (2, "payment_captured")]
    assert "message_id" not in view.history[0].metadata  # the rival's
    assert view.history[1].metadata["message_id"] == str(captured.id)


async def test_a_ledger_consumer_pass_is_eight_statements_whatever_its_orders(
    container: Container, stream: SqlLogStream, database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite loads and appends ledger by ledger")
    consumer = container.payments.consumer(stream)
    messages, orders = three_orders_paid()
    await stream.publish(messages[0::2])
    assert await consumer.run_once() == 3  # the group's cursors exist: the steady state
    await stream.publish(messages[1::2])

    with counting(container) as passed:
        assert await consumer.run_once() == 3

    # The stream's probe, take (lock, batches, cursors) and ack; the inbox record; every ledger
    # loaded with the append lock, every event appended (ADR 0073). Before: 3 + 3 per partition of
    # the stream, plus 7 per event.
    assert (len(passed.statements), passed.transactions) == (8, 2), passed.report()
    for order_id in orders:
        assert (await container.payments.ledger(order_id)).ledger.status is LedgerStatus.CAPTURED
