"""The carrier's shipments on its own tables: create, cancel (guarded UPDATE), list, summarize."""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

import orjson
from sqlalchemy import Column, Index, String, Table, Text, func, select

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.inline_sqlite import SqlConnection, SqlDatabase
from mercato.kit.web.pagination import Cursor, CursorError
from mercato.providers._edge import ProviderProblem
from mercato.providers._idempotency import IdempotencyStore, Outcome, idempotency_table
from mercato.providers._storage import create_tables, new_metadata, row_insert
from mercato.providers.carrier.models import (
    Address,
    ShipmentIn,
    ShipmentItem,
    ShipmentOut,
    ShipmentPage,
    ShipmentsByOrder,
    ShipmentStatus,
    ShipmentSummary,
)

__all__ = ["Carrier", "carrier_metadata"]

carrier_metadata = new_metadata()

shipments = Table(
    "carrier_shipments",
    carrier_metadata,
    Column("id", String(36), primary_key=True),
    Column("order_reference", String(128), nullable=False),
    Column("status", String(16), nullable=False),
    Column("tracking_number", String(32), nullable=False),
    Column("items", Text, nullable=False),
    Column("address", Text, nullable=True),
    Column("idempotency_key", String(255), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("cancelled_at", UTCDateTime, nullable=True),
    Index("ix_carrier_shipments_order_reference_id", "order_reference", "id"),
)

idempotency_keys = idempotency_table(carrier_metadata, "carrier")


def _out(row: Any) -> ShipmentOut:
    address = orjson.loads(row["address"]) if row["address"] else None
    return ShipmentOut(
        shipment_id=row["id"],
        order_reference=row["order_reference"],
        status=ShipmentStatus(row["status"]),
        tracking_number=row["tracking_number"],
        items=[ShipmentItem(**item) for item in orjson.loads(row["items"])],
        address=Address(**address) if address else None,
        created_at=row["created_at"],
        cancelled_at=row["cancelled_at"],
    )


# Built once: a statement built per call (`.values(...)`, `.where(... == value)`) has its elements and
# cache key made again every time, which cost more CPU than SQLite's own work (ADR 0071).
_INSERT_SHIPMENT = row_insert(shipments)


class Carrier:
    def __init__(self, db: SqlDatabase, *, clock: Clock, rng: random.Random) -> None:
        self.db = db
        self.clock = clock
        self.rng = rng
        self.idempotency = IdempotencyStore(db, idempotency_keys, clock)

    async def start(self) -> None:
        await create_tables(self.db, carrier_metadata)

    async def close(self) -> None:
        await self.db.dispose()

    async def create(self, conn: SqlConnection, body: ShipmentIn, key: str) -> Outcome:
        shipment_id = str(new_id())
        row = {
            "id": shipment_id,
            "order_reference": body.order_reference,
            "status": ShipmentStatus.CREATED.value,
            "tracking_number": f"MC{self.rng.randrange(10**11, 10**12)}",
            "items": orjson.dumps([item.model_dump() for item in body.items]).decode(),
            "address": orjson.dumps(body.address.model_dump()).decode() if body.address else None,
            "idempotency_key": key,
            "created_at": self.clock.now(),
            "cancelled_at": None,
        }
        await conn.execute(_INSERT_SHIPMENT, row)
        return Outcome(201, _out(row).model_dump(mode="json"), {"Location": f"/v1/shipments/{shipment_id}"})

    async def cancel(self, conn: SqlConnection, shipment_id: str) -> Outcome:
        updated = await conn.execute(
            shipments.update()
            .where(shipments.c.id == shipment_id, shipments.c.status == ShipmentStatus.CREATED.value)
            .values(status=ShipmentStatus.CANCELLED.value, cancelled_at=self.clock.now())
        )
        row = (await conn.execute(select(shipments).where(shipments.c.id == shipment_id))).mappings().first()
        if row is None:
            raise _not_found(shipment_id)
        if updated.rowcount != 1:
            raise ProviderProblem(
                409, "already-cancelled", "Shipment already cancelled", f"shipment {shipment_id}"
            )
        return Outcome(200, _out(row).model_dump(mode="json"))

    async def get(self, shipment_id: str) -> ShipmentOut:
        async with self.db.read() as conn:
            row = (
                (await conn.execute(select(shipments).where(shipments.c.id == shipment_id)))
                .mappings()
                .first()
            )
        if row is None:
            raise _not_found(shipment_id)
        return _out(row)

    async def page(self, *, order_reference: str | None, limit: int, cursor: str | None) -> ShipmentPage:
        query = select(shipments).order_by(shipments.c.id).limit(limit + 1)
        if order_reference is not None:
            query = query.where(shipments.c.order_reference == order_reference)
        if cursor:
            try:
                after = Cursor.decode(cursor, expected_sort="id").id
            except CursorError as exc:
                raise ProviderProblem(400, "invalid-cursor", "Invalid cursor", str(exc)) from exc
            query = query.where(shipments.c.id > after)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).mappings().all()
        items = [_out(r) for r in rows[:limit]]
        next_cursor = (
            Cursor(sort="id", value=None, id=items[-1].shipment_id).encode() if len(rows) > limit else None
        )
        return ShipmentPage(items=items, next_cursor=next_cursor)

    async def summary(self, *, order_reference: str | None = None) -> ShipmentSummary:
        query = select(shipments.c.order_reference, shipments.c.status, func.count()).group_by(
            shipments.c.order_reference, shipments.c.status
        )
        if order_reference is not None:
            query = query.where(shipments.c.order_reference == order_reference)
        async with self.db.read() as conn:
            rows = (await conn.execute(query)).all()
        per_order: dict[str, ShipmentsByOrder] = defaultdict(lambda: ShipmentsByOrder(order_reference=""))
        totals = ShipmentsByOrder(order_reference="*")
        for ref, status, count in rows:
            entry = per_order[ref]
            entry.order_reference = ref
            for target in (entry, totals):
                # Every shipment was created once; cancelled ones are no longer active.
                target.created += int(count)
                if status == ShipmentStatus.CANCELLED.value:
                    target.cancelled += int(count)
                else:
                    target.active += int(count)
        return ShipmentSummary(orders=[per_order[k] for k in sorted(per_order)], totals=totals)


def _not_found(shipment_id: str) -> ProviderProblem:
    return ProviderProblem(404, "shipment-not-found", "Shipment not found", f"no shipment {shipment_id}")
