"""`mercato_messaging_*` as the running worker exports them, scraped after real traffic.

The events go the way the system sends them: written to the outbox in a transaction, published by
the worker's relay job, consumed by its ledger, notifications and projection jobs (all built by
`shop_jobs` from the container, as `mercato worker` builds them). The metrics are read back from the
container's registry in the Prometheus text format, as `/metrics` serves it.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from mercato.bootstrap import Container, build_container
from mercato.config import MessagingSettings
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message, RedisStream
from mercato.shop.payments.contracts import PAYMENT_AUTHORIZED, PAYMENT_REFUNDED, PAYMENTS_TOPIC
from mercato.workers import PeriodicJob, shop_jobs
from tests.conftest import make_settings
from tests.tables import emptiable_tables

REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
ORDERS = "mercato.orders"


def scrape(container: Container) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the registry, keyed by (name, labels)."""
    text = generate_latest(container.metrics_registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def event(event_type: str, topic: str, order_id: str, **data: Any) -> Message:
    return Message(
        id=new_id(),
        source="mercato/checkout",
        type=event_type,
        subject=order_id,
        time=ManualClock().now(),
        data={"order_id": order_id, **data},
        topic=topic,
    )


def traffic() -> list[Message]:
    """Two completed orders, each authorized; and a refund the ledger never saw a capture for (a
    poison message: it breaks a ledger rule on every attempt)."""
    out: list[Message] = []
    for _ in range(2):
        order = str(uuid.uuid4())
        out.append(
            event(
                "mercato.orders.order_completed",
                ORDERS,
                order,
                customer_id=str(uuid.uuid4()),
                total_minor=500,
                currency="EUR",
                items=[{"sku": "SKU-1", "quantity": 1, "unit_price_minor": 500}],
                completed_at="2026-11-25T12:00:00Z",
            )
        )
        out.append(
            event(
                PAYMENT_AUTHORIZED,
                PAYMENTS_TOPIC,
                order,
                authorization_id="a",
                amount_minor=500,
                currency="EUR",
            )
        )
    out.append(
        event(
            PAYMENT_REFUNDED,
            PAYMENTS_TOPIC,
            str(uuid.uuid4()),
            capture_id="c",
            amount_minor=1,
            currency="EUR",
        )
    )
    return out


async def drain(jobs: dict[str, PeriodicJob], *names: str) -> None:
    for name in names:
        while await jobs[name].run():
            pass


@pytest.fixture(params=["sql", "redis"])
async def worker(request: pytest.FixtureRequest, database_url: str) -> AsyncIterator[Container]:
    messaging = MessagingSettings(
        backend=request.param,
        redis_url=REDIS_URL,
        broker_prefix=f"test-{uuid.uuid4().hex[:12]}",
        max_attempts=2,
        visibility_timeout_s=5,
    )
    built = build_container(make_settings(database_url, messaging=messaging), clock=ManualClock())
    try:
        yield built
    finally:
        if isinstance(built.stream, RedisStream):
            await built.stream.delete_all()
        async with built.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(delete(table))
        await built.close()


async def test_the_workers_messaging_metrics_after_real_traffic(worker: Container) -> None:
    async with worker.db.write() as conn:
        await worker.outbox.add_many(conn, traffic())
    jobs = {job.name: job for job in shop_jobs(worker)}
    await drain(jobs, "outbox_relay")
    samples = scrape(worker)
    assert value(samples, "mercato_messaging_relay_published_total") == 5
    assert value(samples, "mercato_messaging_outbox_backlog_messages") == 0

    await drain(
        jobs, "notifications", "payments_ledger", "projection:order_summary", "projection:sales_by_day"
    )
    # The poison refund failed once; its second delivery is a redelivery, and it fails again: the
    # stream dead-letters it at max_attempts=2. Its visibility backoff is the clock's to pass.
    assert isinstance(worker.clock, ManualClock)
    worker.clock.advance(60)
    await drain(jobs, "payments_ledger")
    worker.clock.advance(60)
    await drain(jobs, "payments_ledger")

    samples = scrape(worker)
    ledger = {"group": "payments-ledger", "topic": PAYMENTS_TOPIC}
    assert value(samples, "mercato_messaging_consumer_processed_total", **ledger) == 2
    assert value(samples, "mercato_messaging_consumer_redelivered_total", **ledger) >= 1
    assert value(samples, "mercato_messaging_consumer_dead_lettered_total", **ledger) == 1
    assert value(samples, "mercato_messaging_consumer_lag_messages", **ledger) == 0
    notifications = {"group": "notifications", "topic": ORDERS}
    assert value(samples, "mercato_messaging_consumer_processed_total", **notifications) == 2
    assert value(samples, "mercato_messaging_consumer_lag_messages", **notifications) == 0

    # A replay redelivers what the groups already applied: the inbox (consumers) and the checkpoint
    # (stream projectors) absorb it, and each absorbed delivery is a dedup hit.
    await worker.stream.replay(ORDERS, "notifications", from_offset=0)
    if isinstance(worker.stream, RedisStream):
        await worker.stream.replay(ORDERS, "projection:sales_by_day", from_offset=0)
    await drain(jobs, "notifications", "projection:sales_by_day")
    samples = scrape(worker)
    assert value(samples, "mercato_messaging_consumer_dedup_hits_total", **notifications) == 2
    if isinstance(worker.stream, RedisStream):
        # On a broker the projectors are consumer groups and report like one.
        projector = {"group": "projection:sales_by_day", "topic": ORDERS}
        assert value(samples, "mercato_messaging_consumer_processed_total", **projector) == 2
        assert value(samples, "mercato_messaging_consumer_dedup_hits_total", **projector) == 2
        assert value(samples, "mercato_messaging_consumer_lag_messages", **projector) == 0
