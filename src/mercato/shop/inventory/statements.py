"""The saga's two inventory steps as one statement each on PostgreSQL (ADR 0075).

Reserve (the header, a take per line, the lines) and commit by reference (the status flip, a stock
move per line) were 2 + lines statements each. Here each is one statement of data-modifying CTEs on
PostgreSQL, registered for the raw-driver layer with the same work as a few statements in turn for
SQLite, which has no data-modifying CTEs (`driver_prepared(..., in_turn=...)`). Both run in the
caller's transaction (the saga step's), whose rollback undoes a reservation that came up short.

Lock order, as `service.py` states it: the reservation row first, then the stock rows in ascending
SKU order. A multi-row UPDATE locks rows in whatever order its plan visits them, so the stock rows
are first locked by a `SELECT … ORDER BY sku FOR UPDATE` (a materialized CTE: the lock step runs
above the sort, so rows are locked in SKU order), read in full by an aggregate before the UPDATE
writes its first row (an uncorrelated scalar subquery: evaluated once, up front). The UPDATE then
finds its rows already locked by its own transaction and waits on nobody.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    case,
    exists,
    func,
    insert,
    literal_column,
    select,
    true,
    update,
)
from sqlalchemy.dialects import postgresql

from mercato.kit.storage.statements import driver_prepared
from mercato.shop.inventory.model import ReservationStatus
from mercato.shop.inventory.tables import reservation_lines, reservations, stock

__all__ = ["commit_by_reference", "reserve_statement"]

_now = bindparam("now", type_=stock.c.updated_at.type)
_key = bindparam("key", type_=reservations.c.reference.type)

_RESERVE: dict[int, Any] = {}


def _line_params(count: int) -> tuple[list[Any], list[Any]]:
    skus = [bindparam(f"sku_{i}", type_=stock.c.sku.type) for i in range(count)]
    quantities = [bindparam(f"quantity_{i}", type_=stock.c.available.type) for i in range(count)]
    return skus, quantities


def _wanted(skus: list[Any], quantities: list[Any]) -> ColumnElement[Any]:
    """The quantity asked for the stock row's SKU (`sku_<i>` → `quantity_<i>`)."""
    return case(*((stock.c.sku == sku, quantity) for sku, quantity in zip(skus, quantities, strict=True)))


def _take(skus: list[Any], quantities: list[Any], *only_if: ColumnElement[bool]) -> Any:
    """available → reserved on every asked row that has enough, RETURNING (sku, quantity)."""
    wanted = _wanted(skus, quantities)
    return (
        update(stock)
        .where(stock.c.sku.in_(skus), stock.c.available >= wanted, *only_if)
        .values(
            available=stock.c.available - wanted,
            reserved=stock.c.reserved + wanted,
            version=stock.c.version + 1,
            updated_at=_now,
        )
        .returning(stock.c.sku, wanted.label("quantity"))
    )


def reserve_statement(count: int) -> Any:
    """A new reservation of `count` lines, all or nothing: its header (parameters named after the
    columns, skipped when the reference is taken), every line's take (`sku_<i>`, `quantity_<i>`, in
    ascending SKU order, and `now`) and its lines. It returns one row per line when it reserved,
    none otherwise (the reference was taken, or a line was short or unknown: nothing was taken; the
    header of a short one is rolled back with the caller's transaction). Registered once per count.

    PostgreSQL: one statement. The header comes first (the stock rows are gated on it: a
    concurrent duplicate waits on the unique reference before touching any stock row, and then
    takes nothing), then the locks in SKU order and the all-or-nothing check on the locked rows,
    then the takes, then the lines. SQLite: the header, a check that every line has enough (a
    writer there holds the database's one write lock, so nothing changes in between), the takes in
    one UPDATE and the lines, stopping at the first that returns nothing."""
    statement = _RESERVE.get(count)
    if statement is not None:
        return statement
    skus, quantities = _line_params(count)
    wanted = _wanted(skus, quantities)
    new_header = (
        postgresql.insert(reservations)
        .values({c.name: bindparam(c.name, type_=c.type) for c in reservations.c})
        .on_conflict_do_nothing(index_elements=["reference"])
        .returning(reservations.c.id)
    )
    header = new_header.cte("new_reservation")
    header_first = exists(select(header.c.id))
    if count == 1:
        # One row: the UPDATE's own lock is the whole lock order, its condition the whole check.
        taken = _take(skus, quantities, header_first).cte("taken")
        ctes: tuple[Any, ...] = (header, taken)
    else:
        locked = (
            select(stock.c.sku, (stock.c.available >= wanted).label("enough"))
            .where(stock.c.sku.in_(skus), header_first)
            .order_by(stock.c.sku)
            .with_for_update()
            .cte("locked")
            .prefix_with("MATERIALIZED")
        )
        every_line_has_enough = select(func.count()).select_from(locked).where(
            locked.c.enough
        ).scalar_subquery() == literal_column(str(count))
        taken = _take(skus, quantities, every_line_has_enough).cte("taken")
        ctes = (header, locked, taken)
    new_lines = (
        insert(reservation_lines)
        .from_select(
            ["reservation_id", "sku", "quantity"],
            select(header.c.id, taken.c.sku, taken.c.quantity).select_from(header.join(taken, true())),
        )
        .returning(reservation_lines.c.sku)
        .cte("new_lines")
    )
    enough_of_each = (
        select(func.count())
        .select_from(stock)
        .where(stock.c.sku.in_(skus), stock.c.available >= wanted)
        .having(func.count() == literal_column(str(count)))
    )
    plain_lines = insert(reservation_lines).values(
        [
            {"reservation_id": bindparam("id", type_=reservation_lines.c.reservation_id.type)}
            | {"sku": sku, "quantity": quantity}
            for sku, quantity in zip(skus, quantities, strict=True)
        ]
    )
    statement = _RESERVE[count] = driver_prepared(
        select(new_lines.c.sku).add_cte(*ctes, new_lines),
        in_turn=(
            new_header,
            enough_of_each,
            _take(skus, quantities),
            plain_lines.returning(reservation_lines.c.sku),
        ),
        rows_from=3,
    )
    return statement


def _commit_stock_moves(reserved: ColumnElement[Any], sold: ColumnElement[bool]) -> dict[str, Any]:
    """reserved → committed (sold) or reserved → available (expired), by `reserved` units. The stock
    table's CHECK (`reserved >= 0`) refuses a move of units that are not reserved (an invariant
    broken elsewhere): the statement fails and the caller's transaction rolls back."""
    back = case((sold, literal_column("0")), else_=reserved)
    return {
        "reserved": stock.c.reserved - reserved,
        "committed": stock.c.committed + case((sold, reserved), else_=literal_column("0")),
        "available": stock.c.available + back,
        "version": stock.c.version + 1,
        "updated_at": _now,
    }


def commit_by_reference(end_if_active: Any, by_reference: Any) -> Any:
    """The active reservation for `key` ended at `now` (committed, or expired if due: the flip
    `end_if_active` says which) and its units moved accordingly, returning the reservation as it
    ended, header joined with its lines as `by_reference` reads it; nothing when none was active.

    PostgreSQL: one statement (the flip, its lines, the stock rows locked in SKU order, the moves,
    the result). SQLite: the flip, the moves (each stock row's quantity read from the reservation's
    lines), then the read."""
    ended = end_if_active.returning(*reservations.c).cte("ended")
    ended_lines = (
        select(
            reservation_lines.c.sku,
            reservation_lines.c.quantity,
            (ended.c.status == ReservationStatus.COMMITTED.value).label("sold"),
        )
        .select_from(ended.join(reservation_lines, reservation_lines.c.reservation_id == ended.c.id))
        .cte("ended_lines")
    )
    locked = (
        select(stock.c.sku)
        .where(stock.c.sku.in_(select(ended_lines.c.sku)))
        .order_by(stock.c.sku)
        .with_for_update()
        .cte("locked")
        .prefix_with("MATERIALIZED")
    )
    all_locked_first = select(func.count()).select_from(locked).scalar_subquery() >= literal_column("0")
    moved = (
        update(stock)
        .where(stock.c.sku == ended_lines.c.sku, all_locked_first)
        .values(_commit_stock_moves(ended_lines.c.quantity, ended_lines.c.sold))
        .returning(stock.c.sku)
        .cte("moved")
    )
    result = (
        select(*ended.c, ended_lines.c.sku, ended_lines.c.quantity)
        .select_from(ended.outerjoin(ended_lines, true()))
        .order_by(ended_lines.c.sku)
        .add_cte(ended_lines, locked, moved)
    )

    # SQLite: each stock row's units from this reference's lines, after the flip in this transaction.
    theirs = and_(reservations.c.reference == _key, reservation_lines.c.reservation_id == reservations.c.id)
    units = (
        select(reservation_lines.c.quantity)
        .where(theirs, reservation_lines.c.sku == stock.c.sku)
        .scalar_subquery()
    )
    was_sold = (
        select(reservations.c.status).where(reservations.c.reference == _key).scalar_subquery()
        == ReservationStatus.COMMITTED.value
    )
    moves_in_turn = (
        update(stock)
        .where(stock.c.sku.in_(select(reservation_lines.c.sku).where(theirs)))
        .values(_commit_stock_moves(units, was_sold))
        .returning(stock.c.sku)
    )
    return driver_prepared(
        result,
        in_turn=(end_if_active.returning(reservations.c.id), moves_in_turn, by_reference),
        rows_from=2,
    )
