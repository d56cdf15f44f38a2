"""After the chaos run: wait, bounded, until every saga is terminal and the outbox drained, then collect
the evidence from every side (orders, stock, sagas, outbox, stream, the PSP's ledger, the carrier's
shipments) for the invariants in `chaos_invariants`."""

import asyncio
import time
import uuid
from collections import Counter

from sqlalchemy import func, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container
from mercato.kit.messaging import Consumer, Inbox, Message
from mercato.kit.messaging.tables import outbox, stream_log
from mercato.kit.sagas.store import ACTIVE, saga_instances
from mercato.lab.chaos_driver import Driver
from mercato.lab.chaos_invariants import (
    CheckoutAttempt,
    Evidence,
    LedgerEntry,
    OrderRecord,
    OutboxRecord,
    SagaRecord,
    ShipmentRecord,
    StockRecord,
    StreamRecord,
)
from mercato.lab.chaos_model import TERMINAL, Log
from mercato.shop.inventory.tables import reservations, stock
from mercato.shop.orders.tables import order_lines, orders


async def _pending(container: Container) -> tuple[int, int]:
    """Sagas not yet terminal, and outbox rows not yet published."""
    async with container.db.read() as conn:
        sagas = (
            await conn.execute(
                select(func.count()).select_from(saga_instances).where(saga_instances.c.status.in_(ACTIVE))
            )
        ).scalar_one()
        unpublished = (
            await conn.execute(
                select(func.count()).select_from(outbox).where(outbox.c.published_at.is_(None))
            )
        ).scalar_one()
    return int(sagas), int(unpublished)


async def settle(container: Container, timeout_s: float, log: Log) -> bool:
    deadline = time.monotonic() + timeout_s
    last_report = 0.0
    while time.monotonic() < deadline:
        try:
            sagas, unpublished = await _pending(container)
        except (DBAPIError, TimeoutError, OSError):  # a failover drill: the pool reconnects next try
            await asyncio.sleep(0.5)
            continue
        if sagas == 0 and unpublished == 0:
            return True
        if time.monotonic() - last_report > 5.0:
            log(f"waiting: {sagas} sagas active, {unpublished} outbox rows unpublished")
            last_report = time.monotonic()
        await asyncio.sleep(0.5)
    return False


async def _downstream(container: Container) -> tuple[dict[str, int], int]:
    """Consume every topic from the start with a fresh group through the inbox: how many times each
    message id was applied (must be once), and how many deliveries that took."""
    async with container.db.read() as conn:
        topics = sorted({str(t) for t in (await conn.execute(select(outbox.c.topic).distinct())).scalars()})
    applied: Counter[str] = Counter()

    async def record(conn: AsyncConnection, message: Message) -> None:
        applied[str(message.id)] += 1

    group = f"chaos-audit-{uuid.uuid4().hex[:8]}"
    deliveries = 0
    for topic in topics:
        consumer = Consumer(
            container.db,
            container.stream,
            topic=topic,
            group=group,
            name="auditor",
            handler=record,
            max_messages=500,
            inbox_store=Inbox(clock=container.clock),
        )
        while handled := await consumer.run_once():
            deliveries += handled
    return dict(applied), deliveries


async def _ledger(container: Container) -> list[LedgerEntry]:
    entries: list[LedgerEntry] = []
    cursor: str | None = None
    while True:
        page = await container.psp.ledger(limit=100, cursor=cursor)
        entries.extend(
            LedgerEntry(
                kind=e.kind.value,
                order_reference=e.order_reference,
                authorization_id=e.authorization_id,
                capture_id=e.capture_id,
                amount_minor=e.amount_minor,
            )
            for e in page.items
        )
        if page.next_cursor is None:
            return entries
        cursor = page.next_cursor


async def _shipments(container: Container) -> list[ShipmentRecord]:
    records: list[ShipmentRecord] = []
    cursor: str | None = None
    while True:
        page = await container.carrier.shipments(limit=100, cursor=cursor)
        records.extend(
            ShipmentRecord(
                shipment_id=s.shipment_id, order_reference=s.order_reference, status=s.status.value
            )
            for s in page.items
        )
        if page.next_cursor is None:
            return records
        cursor = page.next_cursor


async def collect_evidence(
    container: Container, initial: dict[str, int], attempts: list[CheckoutAttempt], bound_s: float
) -> tuple[Evidence, int]:
    async with container.db.read() as conn:
        lines: dict[str, list[tuple[str, int]]] = {}
        for row in await conn.execute(
            select(order_lines.c.order_id, order_lines.c.sku, order_lines.c.quantity)
        ):
            lines.setdefault(str(row.order_id), []).append((str(row.sku), int(row.quantity)))
        order_rows = [
            OrderRecord(
                order_id=str(r.id),
                status=str(r.status),
                total_minor=int(r.total_minor),
                lines=tuple(lines.get(str(r.id), [])),
            )
            for r in await conn.execute(select(orders.c.id, orders.c.status, orders.c.total_minor))
        ]
        saga_rows = [
            SagaRecord(
                saga_id=str(r.id),
                status=str(r.status),
                failure=r.failure,
                created_at=r.created_at,
                finished_at=r.finished_at,
            )
            for r in await conn.execute(select(saga_instances))
        ]
        stock_rows = [
            StockRecord(
                sku=str(r.sku),
                initial=initial.get(str(r.sku), 0),
                available=int(r.available),
                reserved=int(r.reserved),
                committed=int(r.committed),
            )
            for r in await conn.execute(select(stock))
        ]
        active = (
            await conn.execute(
                select(func.count()).select_from(reservations).where(reservations.c.status == "active")
            )
        ).scalar_one()
        outbox_rows = [
            OutboxRecord(
                message_id=str(r.id),
                type=str(r.type),
                subject=str(r.key),
                published=r.published_at is not None,
            )
            for r in await conn.execute(
                select(outbox.c.id, outbox.c.type, outbox.c.key, outbox.c.published_at)
            )
        ]
        log_rows = []
        for r in await conn.execute(select(stream_log.c.message_id, stream_log.c.envelope)):
            message = Message.from_json(r.envelope)
            log_rows.append(
                StreamRecord(message_id=str(r.message_id), type=message.type, subject=message.subject)
            )
    applied, deliveries = await _downstream(container)
    evidence = Evidence(
        orders=order_rows,
        sagas=saga_rows,
        ledger=await _ledger(container),
        shipments=await _shipments(container),
        stock=stock_rows,
        outbox=outbox_rows,
        stream_log=log_rows,
        downstream_applied=applied,
        checkouts=attempts,
        active_reservations=int(active),
        bound_s=bound_s,
    )
    return evidence, deliveries


def count_outcomes(evidence: Evidence, driver: Driver, kills: int, deliveries: int) -> dict[str, int]:
    order_status = Counter(o.status for o in evidence.orders)
    saga_status = Counter(s.status for s in evidence.sagas)
    ledger = Counter(e.kind for e in evidence.ledger)
    shipments = Counter(s.status for s in evidence.shipments)
    attempts = driver.attempts
    counts = {
        "checkouts_driven": len(attempts),
        "checkouts_accepted": sum(1 for a in attempts if a.order_ids),
        "checkouts_refused": sum(1 for a in attempts if a.answered and not a.order_ids),
        "checkouts_unanswered": sum(1 for a in attempts if not a.answered),
        "checkout_posts": sum(a.posts for a in attempts),
        "worker_kills": kills,
        "orders": len(evidence.orders),
        "orders_completed": order_status["completed"],
        "orders_cancelled": order_status["cancelled"],
        "orders_other": len(evidence.orders) - order_status["completed"] - order_status["cancelled"],
        "sagas_completed": saga_status["completed"],
        "sagas_compensated": saga_status["compensated"],
        "sagas_failed": saga_status["failed"],
        "sagas_active": sum(n for s, n in saga_status.items() if s not in TERMINAL),
        "psp_authorizations": ledger["authorization"],
        "psp_declines": ledger["decline"],
        "psp_captures": ledger["capture"],
        "psp_voids": ledger["void"],
        "psp_refunds": ledger["refund"],
        "shipments_created": len(evidence.shipments),
        "shipments_cancelled": shipments["cancelled"],
        "outbox_messages": len(evidence.outbox),
        "stream_messages": len(evidence.stream_log),
        "downstream_deliveries": deliveries,
        "downstream_applied": sum(evidence.downstream_applied.values()),
    }
    counts.update({f"client_{k}": v for k, v in sorted(driver.stats.items())})
    return counts
