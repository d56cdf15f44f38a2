"""Inventory use cases: stock levels and reservations that can never oversell.

Lock order, the reason this cannot deadlock: a transaction locks at most one new or existing
reservation row per reservation, always before any stock row, and stock rows always in
ascending SKU order (see `normalize_lines`). The expirer, the only transaction that ends several
reservations at once, claims them in (expires_at, id) order and only then touches stock, again
in SKU order. With one global order there is no wait cycle.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.storage import Database
from mercato.shop.inventory.model import (
    InvalidStockChange,
    OutOfStock,
    Reservation,
    ReservationLine,
    ReservationNotActive,
    ReservationNotFound,
    ReservationReferenceReused,
    ReservationStatus,
    StockLevel,
    StockNotFound,
    apply_delta,
    expiry,
    normalize_lines,
    validate_available,
    validate_delta,
    validate_reference,
    validate_sku,
)
from mercato.shop.inventory.repository import DuplicateKey, InventoryRepository


class ReservationExpired(ReservationNotActive):
    slug = "reservation-expired"
    title = "Reservation expired"
    description = "The reservation's time to live ran out before it was committed; its units were released."


class StockInvariantBroken(RuntimeError):
    """A reserved quantity the reservation says exists is missing from the stock row."""


class InventoryService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        reservation_ttl_s: int,
        repository: InventoryRepository | None = None,
    ) -> None:
        self._db = db
        self._clock = clock
        self._ttl_s = reservation_ttl_s
        self._repo = repository or InventoryRepository()

    # ---- stock -------------------------------------------------------------------------------

    async def stock(self, sku: str) -> StockLevel:
        async with self._db.read() as conn:
            level = await self._repo.get_stock(conn, sku)
        if level is None:
            raise StockNotFound(f"no stock record for SKU {sku}")
        return level

    async def stocks(self, skus: Sequence[str]) -> dict[str, StockLevel]:
        async with self._db.read() as conn:
            return {s.sku: s for s in await self._repo.get_stocks(conn, sorted(set(skus)))}

    async def set_available(self, sku: str, available: int) -> StockLevel:
        """Set the sellable quantity (a stock count); reserved and committed units are untouched."""
        validate_sku(sku)
        validate_available(available)
        return await self._upsert(sku, available=available, delta=None)

    async def adjust_available(self, sku: str, delta: int) -> StockLevel:
        """Add received units (delta > 0) or write units off (delta < 0), atomically."""
        validate_sku(sku)
        validate_delta(delta)
        return await self._upsert(sku, available=None, delta=delta)

    async def set_available_many(self, levels: Sequence[tuple[str, int]]) -> int:
        """Bulk stock count in one transaction (seeding, imports). Returns rows written."""
        for sku, available in levels:
            validate_sku(sku)
            validate_available(available)
        now = self._clock.now()
        async with self._db.write() as conn:
            existing = {s.sku for s in await self._repo.get_stocks(conn, [s for s, _ in levels])}
            for sku, available in sorted(levels):
                if sku in existing:
                    await self._repo.set_available(conn, sku, available, now)
            await self._repo.insert_stocks(conn, [lv for lv in levels if lv[0] not in existing], now)
        return len(levels)

    async def _upsert(self, sku: str, *, available: int | None, delta: int | None) -> StockLevel:
        # Two attempts: a concurrent first insert of the same SKU makes ours fail once, after
        # which the row exists and the update path wins.
        for attempt in range(2):
            try:
                return await self._upsert_once(sku, available=available, delta=delta)
            except DuplicateKey:
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    async def _upsert_once(self, sku: str, *, available: int | None, delta: int | None) -> StockLevel:
        now = self._clock.now()
        async with self._db.write() as conn:
            if available is not None:
                changed = await self._repo.set_available(conn, sku, available, now)
            else:
                assert delta is not None
                changed = await self._repo.add_available(conn, sku, delta, now)
            if not changed:
                current = await self._repo.get_stock(conn, sku)
                if current is not None:
                    assert delta is not None
                    apply_delta(current.available, delta)  # raises with the precise reason
                    raise InvalidStockChange(f"stock of {sku} changed concurrently; retry")
                initial = available if available is not None else apply_delta(0, delta or 0)
                await self._repo.insert_stock(conn, sku, initial, now)
            level = await self._repo.get_stock(conn, sku)
        assert level is not None
        return level

    # ---- reservations ------------------------------------------------------------------------

    async def reserve(
        self,
        reference: str,
        lines: Iterable[tuple[str, int]],
        *,
        ttl_s: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> Reservation:
        """Hold every line for `reference`, or nothing at all (OutOfStock lists the short SKUs).

        Idempotent per reference: asking again returns the reservation made the first time,
        whatever its state now; asking again with different lines is a conflict.
        """
        reservation, _ = await self.reserve_or_replay(reference, lines, ttl_s=ttl_s, conn=conn)
        return reservation

    async def reserve_or_replay(
        self,
        reference: str,
        lines: Iterable[tuple[str, int]],
        *,
        ttl_s: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> tuple[Reservation, bool]:
        """`reserve`, also telling whether this call created the reservation (True) or replayed it.

        With `conn`, the reservation joins the caller's transaction (a saga step) and commits or
        rolls back with it.
        """
        now = self._clock.now()
        reservation = self._new_reservation(reference, lines, ttl_s, now)
        wanted = reservation.lines
        async with self._db.join(conn) as tx:
            # The header, the takes and the lines in one statement (PostgreSQL; a few in turn on
            # SQLite), all or nothing; the header first, skipped when the reference is taken (a
            # replay, or a concurrent call that committed first: PostgreSQL makes the insert wait
            # for it) before any stock row is touched. Was 2 + lines statements.
            if not await self._repo.reserve_new(tx, reservation, now):
                existing = await self._repo.get_by_reference(tx, reference)
                if existing is None:  # pragma: no cover - the conflicting row committed before
                    raise ReservationNotFound(f"reference {reference} is taken but not readable")
                if existing.id != reservation.id:
                    return _replay(existing, wanted), False
                # Ours, so a line was short or unknown and nothing was taken: raising rolls back the
                # header. The stock rows were locked by the statement, so this read is what it saw.
                levels = {s.sku: s for s in await self._repo.get_stocks(tx, [w.sku for w in wanted])}
                short = [
                    w.sku for w in wanted if w.sku not in levels or levels[w.sku].available < w.quantity
                ] or [w.sku for w in wanted]  # one line: its row is not locked when short, may have changed
                raise OutOfStock(
                    "not enough stock for " + ", ".join(short), short_skus=short, reference=reference
                )
        return reservation, True

    async def reservation(self, reservation_id: uuid.UUID) -> Reservation:
        async with self._db.read() as conn:
            found = await self._repo.get_reservation(conn, reservation_id)
        if found is None:
            raise ReservationNotFound(f"reservation {reservation_id} not found")
        return found

    async def reservation_by_reference(self, reference: str) -> Reservation | None:
        async with self._db.read() as conn:
            return await self._repo.get_by_reference(conn, reference)

    async def reserve_if_available(
        self, reference: str, lines: Iterable[tuple[str, int]], *, conn: AsyncConnection
    ) -> bool:
        """Hold every line for `reference` in the caller's transaction when all are available now
        (True); otherwise leave nothing behind (False): a line short or unknown, or the reference
        taken. The caller's transaction goes on either way; a later `reserve` for the reference
        decides, and explains, as it would have without this attempt (checkout's fast path: the
        order's reservation made in the transaction that places it, ADR 0087)."""
        now = self._clock.now()
        reservation = self._new_reservation(reference, lines, None, now)
        if await self._repo.reserve_new(conn, reservation, now):
            return True
        await self._repo.forget_header(conn, reservation.id)
        return False

    def _new_reservation(
        self, reference: str, lines: Iterable[tuple[str, int]], ttl_s: int | None, now: datetime
    ) -> Reservation:
        """An active reservation of `lines` for `reference`, made `now`, to live `ttl_s` (default:
        the service's); the reference and the lines checked."""
        validate_reference(reference)
        return Reservation(
            id=new_id(),
            reference=reference,
            status=ReservationStatus.ACTIVE,
            lines=normalize_lines(lines),
            expires_at=expiry(now, ttl_s if ttl_s is not None else self._ttl_s),
            created_at=now,
            updated_at=now,
        )

    async def release(self, reservation_id: uuid.UUID, *, conn: AsyncConnection | None = None) -> Reservation:
        """Give the units back to `available`. Releasing a released/expired one is a no-op."""
        reservation, _ = await self._end(reservation_id, ReservationStatus.RELEASED, conn=conn)
        return reservation

    async def release_reference(self, reference: str, *, conn: AsyncConnection | None = None) -> bool:
        """Release the reservation made for `reference`, if any; False when there is none.

        A saga compensating "reserve inventory" calls this whether or not the reservation was
        ever made, so no reservation is not an error.
        """
        async with self._db.join(conn) as tx:
            found = await self._repo.get_by_reference(tx, reference)
            if found is None:
                return False
            await self._end(found.id, ReservationStatus.RELEASED, conn=tx, loaded=found)
        return True

    async def commit_reference(self, reference: str, *, conn: AsyncConnection | None = None) -> Reservation:
        """Commit the reservation made for `reference` (the units are sold), as `commit` does.

        The common case, an active reservation, is one statement on PostgreSQL: the status flip
        with the expiry rule in SQL, the stock moves, and the reservation as it ended (was a read,
        the flip, then a move per line). Anything else (committed already, released, expired,
        unknown) is read and judged as `commit` judges it."""
        async with self._db.join(conn) as tx:
            now = self._clock.now()
            ended = await self._repo.commit_active(tx, reference, now)
            if ended is None:
                found = await self._repo.get_by_reference(tx, reference)
                if found is None:
                    raise ReservationNotFound(f"no reservation for reference {reference}")
                return await self._commit(found.id, conn=tx, loaded=found)
            sold = ended.status is ReservationStatus.COMMITTED
            if not sold:
                raise ReservationExpired(f"reservation {ended.id} expired at {ended.expires_at.isoformat()}")
            return ended

    async def commit(self, reservation_id: uuid.UUID, *, conn: AsyncConnection | None = None) -> Reservation:
        """Turn the reserved units into committed (sold) ones. Committing twice is a no-op.

        A reservation past its expiry is expired here instead, and the commit refused: its
        time to live is a promise to the other shoppers waiting for those units.
        """
        return await self._commit(reservation_id, conn=conn)

    async def _commit(
        self, reservation_id: uuid.UUID, *, conn: AsyncConnection | None, loaded: Reservation | None = None
    ) -> Reservation:
        reservation, expired = await self._end(
            reservation_id, ReservationStatus.COMMITTED, conn=conn, loaded=loaded
        )
        if expired:
            raise ReservationExpired(
                f"reservation {reservation_id} expired at {reservation.expires_at.isoformat()}"
            )
        return reservation

    async def expire_due(self, now: datetime | None = None, *, limit: int = 500) -> int:
        """Expire up to `limit` active reservations past their time; returns how many."""
        now = now or self._clock.now()
        async with self._db.write() as conn:
            claimed = [
                rid
                for rid in await self._repo.due_ids(conn, now, limit)
                if await self._repo.end(conn, rid, ReservationStatus.EXPIRED, now)
            ]
            totals: dict[str, int] = {}
            for reservation in await self._repo.get_reservations(conn, claimed):
                for line in reservation.lines:
                    totals[line.sku] = totals.get(line.sku, 0) + line.quantity
            for sku in sorted(totals):
                await self._return_units(conn, sku, totals[sku], to_committed=False, now=now)
        return len(claimed)

    async def _end(
        self,
        reservation_id: uuid.UUID,
        target: ReservationStatus,
        *,
        conn: AsyncConnection | None = None,
        loaded: Reservation | None = None,
    ) -> tuple[Reservation, bool]:
        """End an active reservation. `loaded` is the reservation as already read in `conn`'s
        transaction (saves reading it again); the status flip below is conditional, so a stale
        copy can never move stock twice."""
        now = self._clock.now()
        expired = False
        async with self._db.join(conn) as conn:
            current = loaded if loaded is not None else await self._repo.get_reservation(conn, reservation_id)
            if current is None:
                raise ReservationNotFound(f"reservation {reservation_id} not found")
            if target is ReservationStatus.COMMITTED and current.is_due(now):
                target, expired = ReservationStatus.EXPIRED, True
            ended = current.end(target, now=now)
            if ended is None:
                return current, False
            if not await self._repo.end(conn, reservation_id, target, now):
                # Another transaction ended it between our read and our update: judge again
                # against what it did (idempotent if it did the same thing).
                latest = await self._repo.get_reservation(conn, reservation_id)
                assert latest is not None
                if latest.end(target, now=now) is None:
                    return latest, expired
                raise AssertionError("reservation still active after a failed claim")
            for line in ended.lines:
                await self._return_units(
                    conn, line.sku, line.quantity, to_committed=target is ReservationStatus.COMMITTED, now=now
                )
        return ended, expired

    async def _return_units(
        self, conn: AsyncConnection, sku: str, quantity: int, *, to_committed: bool, now: datetime
    ) -> None:
        if not await self._repo.unreserve(conn, sku, quantity, to_committed=to_committed, now=now):
            raise StockInvariantBroken(f"{quantity} units of {sku} should be reserved but are not")


def _replay(existing: Reservation, wanted: tuple[ReservationLine, ...]) -> Reservation:
    if existing.lines != wanted:
        raise ReservationReferenceReused(
            f"reference {existing.reference} was already used for other lines",
            reservation_id=str(existing.id),
        )
    return existing
