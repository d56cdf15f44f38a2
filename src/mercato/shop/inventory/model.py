"""Inventory entities and rules. Pure: no I/O.

A unit of stock is always in exactly one bucket: `available` (can be sold), `reserved` (held for
a pending order until the reservation is committed, released or expires) or `committed` (sold,
left the warehouse). Reservations move units between buckets; they never create or destroy them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from enum import StrEnum

from mercato.kit.errors import Conflict, NotFound, RuleViolated

SKU_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$")
MAX_STOCK = 10**9
MAX_LINE_QUANTITY = 10_000
MAX_RESERVATION_LINES = 100
MAX_REFERENCE_LENGTH = 100
MAX_TTL_S = 7 * 24 * 3600


class OutOfStock(Conflict):
    """A 409, not a 422: the request is valid and may well succeed later; it conflicts with the
    current stock level, which is state, not a rule the caller broke."""

    slug = "out-of-stock"
    title = "Out of stock"
    description = (
        "Not enough units are available for one or more SKUs; `short_skus` lists them. Nothing was reserved."
    )


class StockNotFound(NotFound):
    slug = "stock-not-found"
    title = "No stock record"
    description = "The inventory holds no stock record for this SKU."


class ReservationNotFound(NotFound):
    slug = "reservation-not-found"
    title = "Reservation not found"
    description = "No stock reservation with this id exists."


class ReservationNotActive(Conflict):
    slug = "reservation-not-active"
    title = "Reservation no longer active"
    description = (
        "The reservation already ended in another way (committed, released or expired), "
        "so it cannot be moved to the requested state."
    )


class ReservationReferenceReused(Conflict):
    slug = "reservation-reference-reused"
    title = "Reservation reference reused"
    description = "A reservation with this reference already exists with different lines."


class InvalidReservation(RuleViolated):
    slug = "invalid-reservation"
    title = "Invalid reservation"
    description = "The reservation request breaks a rule (no lines, bad SKU, quantity or time to live)."


class InvalidStockChange(RuleViolated):
    slug = "invalid-stock-change"
    title = "Invalid stock change"
    description = "The stock change is out of bounds or would leave a negative available quantity."


class ReservationStatus(StrEnum):
    ACTIVE = "active"
    RELEASED = "released"
    COMMITTED = "committed"
    EXPIRED = "expired"


@dataclass(frozen=True, slots=True)
class StockLevel:
    sku: str
    available: int
    reserved: int
    committed: int
    version: int
    updated_at: datetime

    @property
    def total(self) -> int:
        """Every unit ever received and not written off: the conserved quantity."""
        return self.available + self.reserved + self.committed


@dataclass(frozen=True, slots=True, order=True)
class ReservationLine:
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class Reservation:
    id: uuid.UUID
    reference: str
    status: ReservationStatus
    lines: tuple[ReservationLine, ...]
    expires_at: datetime
    created_at: datetime
    updated_at: datetime

    def is_due(self, now: datetime) -> bool:
        return self.status is ReservationStatus.ACTIVE and self.expires_at <= now

    def same_request(self, lines: tuple[ReservationLine, ...]) -> bool:
        return self.lines == lines

    def end(self, target: ReservationStatus, *, now: datetime) -> Reservation | None:
        """The reservation moved to `target`, or `None` when nothing is left to do (idempotent).

        Only an active reservation moves. Releasing one that expired is a no-op, as both mean
        "units back to available"; any other ended state refuses, because its units are no
        longer reserved (released/expired) or are gone (committed).
        """
        if target is ReservationStatus.ACTIVE:
            raise ValueError("a reservation cannot be re-activated")
        if self.status is target or (
            target is ReservationStatus.RELEASED and self.status is ReservationStatus.EXPIRED
        ):
            return None
        if self.status is not ReservationStatus.ACTIVE:
            raise ReservationNotActive(
                f"reservation {self.id} is {self.status.value}, cannot become {target.value}",
                status=self.status.value,
            )
        return replace(self, status=target, updated_at=now)


def normalize_lines(lines: Iterable[tuple[str, int]]) -> tuple[ReservationLine, ...]:
    """Validated lines, one per SKU (duplicates summed), sorted by SKU.

    The sort order is the lock order: every transaction that touches several stock rows takes
    them in this order, so two of them can never wait on each other in a cycle.
    """
    merged: dict[str, int] = {}
    for sku, quantity in lines:
        if not SKU_PATTERN.match(sku):
            raise InvalidReservation(f"invalid SKU {sku!r}", field="lines.sku")
        if not 1 <= quantity <= MAX_LINE_QUANTITY:
            raise InvalidReservation(
                f"quantity for {sku} must be 1..{MAX_LINE_QUANTITY}", field="lines.quantity"
            )
        merged[sku] = merged.get(sku, 0) + quantity
    if not merged:
        raise InvalidReservation("a reservation needs at least one line", field="lines")
    if len(merged) > MAX_RESERVATION_LINES:
        raise InvalidReservation(f"at most {MAX_RESERVATION_LINES} lines", field="lines")
    if any(q > MAX_LINE_QUANTITY for q in merged.values()):
        raise InvalidReservation(f"quantity per SKU must be at most {MAX_LINE_QUANTITY}", field="lines")
    return tuple(ReservationLine(sku, merged[sku]) for sku in sorted(merged))


def validate_reference(reference: str) -> str:
    if not 1 <= len(reference) <= MAX_REFERENCE_LENGTH or not reference.isprintable():
        raise InvalidReservation(
            f"reference must be 1..{MAX_REFERENCE_LENGTH} printable characters", field="reference"
        )
    return reference


def expiry(now: datetime, ttl_s: int) -> datetime:
    if not 1 <= ttl_s <= MAX_TTL_S:
        raise InvalidReservation(f"ttl_s must be 1..{MAX_TTL_S}", field="ttl_s")
    return now + timedelta(seconds=ttl_s)


def validate_sku(sku: str) -> str:
    if not SKU_PATTERN.match(sku):
        raise InvalidStockChange("sku must be 3-64 characters of A-Z, 0-9 and '-'", field="sku")
    return sku


def validate_available(available: int) -> int:
    if not 0 <= available <= MAX_STOCK:
        raise InvalidStockChange(f"available must be 0..{MAX_STOCK}", field="available")
    return available


def validate_delta(delta: int) -> int:
    if not -MAX_STOCK <= delta <= MAX_STOCK:
        raise InvalidStockChange(f"delta must be within ±{MAX_STOCK}", field="delta")
    return delta


def apply_delta(current_available: int, delta: int) -> int:
    """The available quantity after adding `delta` (negative to write units off)."""
    validate_delta(delta)
    result = current_available + delta
    if result < 0:
        raise InvalidStockChange(
            f"only {current_available} units are available; cannot remove {-delta}", field="delta"
        )
    return validate_available(result)
