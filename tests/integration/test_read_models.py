# ruff: noqa: F811 - `shop` is the fixture imported from test_checkout, used as a parameter
"""Read models and notifications fed by real checkouts (simulated PSP and carrier over HTTP).

The events come from the real saga through the outbox and relay to the SQL log; then the
projectors and the notifications consumer run as the worker's jobs would.
"""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import func, select

from mercato.kit.messaging import SqlLogStream
from mercato.kit.projections import Projector
from mercato.kit.sagas import SagaStatus
from mercato.shop.notifications import CONSUMER_GROUP, NotificationsService
from mercato.shop.notifications.tables import notifications
from mercato.shop.reporting.tables import order_summary, sales_by_day
from mercato.workers import shop_jobs
from mercato.workers.projections import build_projectors, notifications_consumer
from tests.integration.shop_support import account, admin, api, bearer
from tests.integration.test_checkout import Shop, checkout, finish, shop  # noqa: F401

ORDER_TOPIC = "mercato.orders"


async def _run_checkouts(shop: Shop) -> tuple[uuid.UUID, uuid.UUID, uuid.UUID]:
    done_1 = await checkout(shop, quantity=2)
    assert await finish(shop, done_1) is SagaStatus.COMPLETED
    done_2 = await checkout(shop, quantity=1)
    assert await finish(shop, done_2) is SagaStatus.COMPLETED
    declined = await checkout(shop, quantity=1, card_token="tok_decline")
    assert await finish(shop, declined) is SagaStatus.COMPENSATED
    relay = next(j for j in shop_jobs(shop.container) if j.name == "outbox_relay")
    while await relay.run():
        pass
    return done_1, done_2, declined


async def _table(shop: Shop, table: Any) -> list[tuple[Any, ...]]:
    async with shop.container.db.read() as conn:
        result = await conn.execute(select(table).order_by(*table.primary_key.columns))
        return [tuple(r) for r in result]


async def _project(projectors: dict[str, Projector]) -> None:
    for projector in projectors.values():
        while await projector.run_once():
            pass


async def test_order_summary_and_sales_follow_real_checkouts_and_rebuild_equals_live(shop: Shop) -> None:
    done_1, done_2, declined = await _run_checkouts(shop)
    projectors = build_projectors(shop.container)
    assert await projectors["order_summary"].lag() > 0
    await _project(projectors)
    assert await projectors["order_summary"].lag() == 0

    names = [c.name for c in order_summary.columns]
    summaries = {row[0]: dict(zip(names, row, strict=True)) for row in await _table(shop, order_summary)}
    first = await shop.container.orders.get(done_1, customer_id=None, read_all=True)
    unit = first.lines[0].unit_price_minor
    assert summaries[done_1]["status"] == "completed"
    assert summaries[done_1]["payment_state"] == "captured"
    assert summaries[done_1]["item_count"] == 2
    assert summaries[done_1]["total_minor"] == 2 * unit
    assert summaries[done_1]["items"] == [
        {
            "sku": shop.sku,
            "product_id": summaries[done_1]["items"][0]["product_id"],
            "quantity": 2,
            "unit_price_minor": unit,
        }
    ]
    assert summaries[done_2]["payment_state"] == "captured"
    assert summaries[declined]["status"] == "cancelled"
    assert summaries[declined]["payment_state"] == "none"
    # Read model agrees with the write model on status.
    for order_id, row in summaries.items():
        order = await shop.container.orders.get(order_id, customer_id=None, read_all=True)
        assert order.status.value == row["status"]

    [(day, currency, orders, revenue)] = await _table(shop, sales_by_day)
    assert (orders, revenue) == (2, 3 * unit)

    live_summary, live_sales = await _table(shop, order_summary), await _table(shop, sales_by_day)
    for projector in projectors.values():
        await projector.rebuild()
    assert await _table(shop, order_summary) == live_summary
    assert await _table(shop, sales_by_day) == live_sales

    async with api(shop.container) as client:
        customer_id = summaries[done_1]["customer_id"]
        await account(shop.container, user_id=uuid.UUID(str(customer_id)))
        own = await bearer(
            shop.container, subject=str(customer_id), roles={"customer"}, scopes=frozenset({"orders:read"})
        )
        mine = (await client.get("/v1/order-summaries", headers=own)).json()
        assert [i["order_id"] for i in mine["items"]] == [str(done_1)]
        assert mine["items"][0]["payment_state"] == "captured"
        everyone = await client.get(
            "/admin/order-summaries", params={"limit": 2}, headers=await admin(shop.container)
        )
        page = everyone.json()
        assert [i["order_id"] for i in page["items"]] == sorted(map(str, summaries), reverse=True)[:2]
        rest = await client.get(
            "/admin/order-summaries",
            params={"cursor": page["next_cursor"]},
            headers=await admin(shop.container),
        )
        assert [i["order_id"] for i in rest.json()["items"]] == [str(min(summaries))]
        report = await client.get(
            "/admin/reports/sales-by-day",
            params={"from": day.isoformat(), "to": day.isoformat()},
            headers=await admin(shop.container),
        )
        assert report.json() == {
            "items": [{"day": day.isoformat(), "currency": currency, "orders": 2, "revenue_minor": 3 * unit}]
        }
        backwards = await client.get(
            "/admin/reports/sales-by-day",
            params={"from": "2026-02-02", "to": "2026-02-01"},
            headers=await admin(shop.container),
        )
        # Two well-formed dates in the wrong order: a rule the schema cannot state, so 422 (ADR 0028).
        assert backwards.status_code == 422
        assert backwards.json()["type"] == "/problems/invalid-report-range"


async def test_notifications_are_recorded_once_under_redelivery_and_duplicate_publishes(shop: Shop) -> None:
    _, _, declined = await _run_checkouts(shop)
    consumer = notifications_consumer(shop.container)
    while await consumer.run_once():
        pass

    async def count() -> int:
        async with shop.container.db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(notifications))).scalar_one())

    # Two completed and one cancelled order: an e-mail and a webhook record each.
    assert await count() == 6
    stream = shop.container.stream
    assert isinstance(stream, SqlLogStream)
    # Redelivery: rewind the group to the start of the topic and consume everything again.
    await stream.replay(ORDER_TOPIC, CONSUMER_GROUP, from_offset=0)
    redelivered = 0
    while handled := await consumer.run_once():
        redelivered += handled
    assert redelivered >= 5  # placed x3 + completed x2 + cancelled x1, all skipped by the inbox
    assert await count() == 6
    # Duplicate publishes of the same events are stored once by the stream...
    deliveries = await stream.read(ORDER_TOPIC, "test-reader", "r", max_messages=100, block_s=0)
    await stream.publish([d.message for d in deliveries])
    assert await consumer.run_once() == 0
    # ...and even a handler called past the inbox (its records purged) makes no second row.
    service = NotificationsService(shop.container.db, shop.container.clock)
    async with shop.container.db.write() as conn:
        for delivery in deliveries:
            await service.handle(conn, delivery.message)
    assert await count() == 6

    async with api(shop.container) as client:
        response = await client.get(
            "/admin/notifications", params={"order_id": str(declined)}, headers=await admin(shop.container)
        )
        items = response.json()["items"]
        assert sorted(i["channel"] for i in items) == ["email", "webhook"]
        email = next(i for i in items if i["channel"] == "email")
        assert email["subject"] == f"Your order {declined} was cancelled"
        assert email["status"] == "pending"
        assert email["recipient"].startswith("customer:")
        assert {i["event_type"] for i in items} == {"mercato.orders.order_cancelled"}
