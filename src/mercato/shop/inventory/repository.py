"""Inventory persistence: stock rows and reservations (this context's tables alone).

Every stock change is a single conditional UPDATE whose WHERE clause states the invariant it
needs (`available >= :q`, `reserved >= :q`). The database evaluates it under the row lock, so
concurrent transactions can never drive a bucket below zero, whatever the interleaving.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, case, delete, insert, literal_column, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage.statements import driver_prepared
from mercato.kit.storage.statements_in_tx import on_connection
from mercato.shop.inventory.model import (
    MAX_STOCK,
    Reservation,
    ReservationLine,
    ReservationStatus,
    StockLevel,
)
from mercato.shop.inventory.statements import commit_by_reference, reserve_statement
from mercato.shop.inventory.tables import reservation_lines, reservations, stock

# The saga's hot statements (release here; reserve and commit in `statements.py`), registered for the
# raw-driver layer (kit/storage/statements.py) and sent in the caller's transaction (`on_connection`):
# built once, compiled once per dialect. RETURNING tells whether a conditional UPDATE matched, on both
# drivers.
_sku = bindparam("sku", type_=stock.c.sku.type)
_quantity = bindparam("quantity", type_=stock.c.available.type)
_now = bindparam("now", type_=stock.c.updated_at.type)
_UNRESERVE = {
    to_committed: driver_prepared(
        update(stock)
        .where(stock.c.sku == _sku, stock.c.reserved >= _quantity)
        .values(
            reserved=stock.c.reserved - _quantity,
            version=stock.c.version + 1,
            updated_at=_now,
            **(
                {"committed": stock.c.committed + _quantity}
                if to_committed
                else {"available": stock.c.available + _quantity}
            ),
        )
        .returning(stock.c.sku)
    )
    for to_committed in (True, False)
}
_END = driver_prepared(
    update(reservations)
    .where(
        reservations.c.id == bindparam("id", type_=reservations.c.id.type),
        reservations.c.status == ReservationStatus.ACTIVE.value,
    )
    .values(status=bindparam("target", type_=reservations.c.status.type), updated_at=_now)
    .returning(reservations.c.id)
)


def _one_statement(condition: ColumnElement[bool]) -> Any:
    # One statement, header joined with its lines: every saga step that ends a reservation
    # starts with this read, and a round trip is the expensive part of it.
    return driver_prepared(
        select(*reservations.c, reservation_lines.c.sku, reservation_lines.c.quantity)
        .select_from(
            reservations.outerjoin(reservation_lines, reservation_lines.c.reservation_id == reservations.c.id)
        )
        .where(condition)
        .order_by(reservation_lines.c.sku)
    )


_BY_REFERENCE = _one_statement(
    reservations.c.reference == bindparam("key", type_=reservations.c.reference.type)
)
# A reservation header that took nothing (`reserve_new` returned False in a transaction that goes on).
_FORGET_HEADER = driver_prepared(
    delete(reservations).where(reservations.c.id == bindparam("id", type_=reservations.c.id.type))
)
_BY_ID = _one_statement(reservations.c.id == bindparam("key", type_=reservations.c.id.type))
_HEAD = tuple(c.name for c in reservations.c)

# A commit's status flip with the expiry rule in SQL (`Reservation.is_due`: past `expires_at` at
# `now`, it expires instead), only while active; with its stock moves and the reservation as it
# ended, header joined with its lines as `_BY_REFERENCE` returns them (`statements.py`).
_END_IF_ACTIVE = (
    update(reservations)
    .where(
        reservations.c.reference == bindparam("key", type_=reservations.c.reference.type),
        reservations.c.status == ReservationStatus.ACTIVE.value,
    )
    .values(
        status=case(
            (reservations.c.expires_at <= _now, ReservationStatus.EXPIRED.value),
            else_=ReservationStatus.COMMITTED.value,
        ),
        updated_at=_now,
    )
)
_COMMIT_BY_REFERENCE = commit_by_reference(_END_IF_ACTIVE, _BY_REFERENCE)


class DuplicateKey(Exception):
    """A concurrent transaction inserted the same reservation reference or stock SKU first."""


def _stock(row: Any) -> StockLevel:
    return StockLevel(
        sku=row.sku,
        available=int(row.available),
        reserved=int(row.reserved),
        committed=int(row.committed),
        version=int(row.version),
        updated_at=row.updated_at,
    )


class InventoryRepository:
    """Queries on the inventory tables. Every method runs on the connection it is given."""

    # ---- stock ---------------------------------------------------------------------------

    async def get_stock(self, conn: AsyncConnection, sku: str) -> StockLevel | None:
        row = (await conn.execute(select(stock).where(stock.c.sku == sku))).first()
        return _stock(row) if row else None

    async def get_stocks(self, conn: AsyncConnection, skus: Sequence[str]) -> list[StockLevel]:
        if not skus:
            return []
        rows = await conn.execute(select(stock).where(stock.c.sku.in_(list(skus))).order_by(stock.c.sku))
        return [_stock(r) for r in rows]

    async def insert_stock(self, conn: AsyncConnection, sku: str, available: int, now: datetime) -> None:
        try:
            await conn.execute(
                insert(stock).values(
                    sku=sku, available=available, reserved=0, committed=0, version=1, updated_at=now
                )
            )
        except IntegrityError as exc:
            raise DuplicateKey(sku) from exc

    async def insert_stocks(
        self, conn: AsyncConnection, levels: Sequence[tuple[str, int]], now: datetime
    ) -> None:
        if levels:
            await conn.execute(
                insert(stock),
                [
                    {
                        "sku": sku,
                        "available": available,
                        "reserved": 0,
                        "committed": 0,
                        "version": 1,
                        "updated_at": now,
                    }
                    for sku, available in levels
                ],
            )

    async def set_available(self, conn: AsyncConnection, sku: str, available: int, now: datetime) -> bool:
        result = await conn.execute(
            update(stock)
            .where(stock.c.sku == sku)
            .values(available=available, version=stock.c.version + 1, updated_at=now)
        )
        return result.rowcount == 1

    async def add_available(self, conn: AsyncConnection, sku: str, delta: int, now: datetime) -> bool:
        """Add `delta` to `available` if the result stays within 0..MAX_STOCK."""
        result = await conn.execute(
            update(stock)
            .where(
                stock.c.sku == sku,
                stock.c.available + delta >= 0,
                stock.c.available + delta <= MAX_STOCK,
            )
            .values(available=stock.c.available + delta, version=stock.c.version + 1, updated_at=now)
        )
        return result.rowcount == 1

    async def unreserve(
        self, conn: AsyncConnection, sku: str, quantity: int, *, to_committed: bool, now: datetime
    ) -> bool:
        """reserved -> committed (a sale) or reserved -> available (a release or an expiry)."""
        params = {"sku": sku, "quantity": quantity, "now": now}
        return bool(await on_connection(conn).rows(_UNRESERVE[to_committed], params))

    # ---- reservations ----------------------------------------------------------------------

    async def reserve_new(self, conn: AsyncConnection, reservation: Reservation, now: datetime) -> bool:
        """The reservation, header, takes and lines, all or nothing (`statements.reserve_statement`):
        whether it was made. False: its reference is taken, or a line was short or unknown; no stock
        was taken, and the caller rolls back the header of a short one with its transaction."""
        params: dict[str, Any] = {
            "id": reservation.id,
            "reference": reservation.reference,
            "status": reservation.status.value,
            "expires_at": reservation.expires_at,
            "created_at": reservation.created_at,
            "updated_at": reservation.updated_at,
            "now": now,
        }
        for i, line in enumerate(reservation.lines):  # ascending SKU (`normalize_lines`)
            params[f"sku_{i}"] = line.sku
            params[f"quantity_{i}"] = line.quantity
        statement = reserve_statement(len(reservation.lines))
        return bool(await on_connection(conn).rows(statement, params))

    async def forget_header(self, conn: AsyncConnection, reservation_id: uuid.UUID) -> None:
        """Delete the header `reserve_new` left when it took nothing (a line short or unknown), for a
        caller whose transaction goes on; no line or stock row was written for it."""
        await on_connection(conn).run(_FORGET_HEADER, {"id": reservation_id})

    async def get_reservation(self, conn: AsyncConnection, reservation_id: uuid.UUID) -> Reservation | None:
        return await self._one(conn, _BY_ID, reservation_id)

    async def get_by_reference(self, conn: AsyncConnection, reference: str) -> Reservation | None:
        return await self._one(conn, _BY_REFERENCE, reference)

    async def commit_active(self, conn: AsyncConnection, reference: str, now: datetime) -> Reservation | None:
        """The active reservation for `reference` ended, committed or expired if due at `now`, and its
        units moved (to committed, or back to available): one statement on PostgreSQL. The
        reservation as it ended, with its lines; None when there is no active one."""
        return await self._one(conn, _COMMIT_BY_REFERENCE, reference, now=now)

    async def _one(
        self, conn: AsyncConnection, statement: Any, key: object, **params: Any
    ) -> Reservation | None:
        rows = await on_connection(conn).rows(statement, {"key": key, **params})
        if not rows:
            return None
        head = dict(zip(_HEAD, rows[0], strict=False))
        return Reservation(
            id=head["id"],
            reference=head["reference"],
            status=ReservationStatus(head["status"]),
            lines=tuple(ReservationLine(r[-2], int(r[-1])) for r in rows if r[-2] is not None),
            expires_at=head["expires_at"],
            created_at=head["created_at"],
            updated_at=head["updated_at"],
        )

    async def get_reservations(
        self, conn: AsyncConnection, reservation_ids: Sequence[uuid.UUID]
    ) -> list[Reservation]:
        if not reservation_ids:
            return []
        rows = list(
            await conn.execute(select(reservations).where(reservations.c.id.in_(list(reservation_ids))))
        )
        return await self._with_lines(conn, rows)

    async def end(
        self, conn: AsyncConnection, reservation_id: uuid.UUID, target: ReservationStatus, now: datetime
    ) -> bool:
        """active -> `target`, only if still active: whoever flips the status owns the stock move."""
        params = {"id": reservation_id, "target": target.value, "now": now}
        return bool(await on_connection(conn).rows(_END, params))

    async def due_ids(self, conn: AsyncConnection, now: datetime, limit: int) -> list[uuid.UUID]:
        rows = await conn.execute(
            select(reservations.c.id)
            .where(
                and_(
                    # A literal: the partial index's predicate (`ACTIVE_RESERVATION_PREDICATE`).
                    reservations.c.status == literal_column(f"'{ReservationStatus.ACTIVE.value}'"),
                    reservations.c.expires_at <= now,
                )
            )
            # A fixed order, so concurrent expirers lock reservation rows in the same sequence.
            .order_by(reservations.c.expires_at, reservations.c.id)
            .limit(limit)
        )
        return [r.id for r in rows]

    async def _with_lines(self, conn: AsyncConnection, rows: Iterable[Any]) -> list[Reservation]:
        headers = list(rows)
        ids = [r.id for r in headers]
        by_id: dict[uuid.UUID, list[ReservationLine]] = {i: [] for i in ids}
        if ids:
            line_rows = await conn.execute(
                select(reservation_lines)
                .where(reservation_lines.c.reservation_id.in_(ids))
                .order_by(reservation_lines.c.reservation_id, reservation_lines.c.sku)
            )
            for line in line_rows:
                by_id[line.reservation_id].append(ReservationLine(line.sku, int(line.quantity)))
        return [
            Reservation(
                id=r.id,
                reference=r.reference,
                status=ReservationStatus(r.status),
                lines=tuple(by_id[r.id]),
                expires_at=r.expires_at,
                created_at=r.created_at,
                updated_at=r.updated_at,
            )
            for r in headers
        ]
