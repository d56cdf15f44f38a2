from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.shop.inventory.model import (
    MAX_LINE_QUANTITY,
    InvalidReservation,
    InvalidStockChange,
    Reservation,
    ReservationLine,
    ReservationNotActive,
    ReservationStatus,
    apply_delta,
    expiry,
    normalize_lines,
    validate_reference,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def reservation(status: ReservationStatus = ReservationStatus.ACTIVE) -> Reservation:
    return Reservation(
        id=uuid.uuid4(),
        reference="order-1",
        status=status,
        lines=(ReservationLine("SKU-A", 1),),
        expires_at=NOW + timedelta(minutes=15),
        created_at=NOW,
        updated_at=NOW,
    )


@given(st.lists(st.tuples(st.sampled_from(["SKU-C", "SKU-A", "SKU-B"]), st.integers(1, 50)), min_size=1))
def test_lines_are_merged_and_sorted_into_the_lock_order(raw: list[tuple[str, int]]) -> None:
    lines = normalize_lines(raw)
    assert [line.sku for line in lines] == sorted({sku for sku, _ in raw})
    for line in lines:
        assert line.quantity == sum(q for sku, q in raw if sku == line.sku)


@pytest.mark.parametrize(
    "raw",
    [[], [("SKU-A", 0)], [("SKU-A", -1)], [("bad sku", 1)], [("SKU-A", MAX_LINE_QUANTITY + 1)]],
)
def test_invalid_lines_are_refused(raw: list[tuple[str, int]]) -> None:
    with pytest.raises(InvalidReservation):
        normalize_lines(raw)


def test_transitions_are_idempotent_and_only_from_active() -> None:
    active = reservation()
    committed = active.end(ReservationStatus.COMMITTED, now=NOW)
    assert committed is not None
    assert committed.status is ReservationStatus.COMMITTED
    assert committed.end(ReservationStatus.COMMITTED, now=NOW) is None
    with pytest.raises(ReservationNotActive):
        committed.end(ReservationStatus.RELEASED, now=NOW)
    expired = reservation(ReservationStatus.EXPIRED)
    assert expired.end(ReservationStatus.RELEASED, now=NOW) is None
    with pytest.raises(ReservationNotActive):
        expired.end(ReservationStatus.COMMITTED, now=NOW)
    with pytest.raises(ValueError):
        active.end(ReservationStatus.ACTIVE, now=NOW)


def test_due_only_when_active_and_past_expiry() -> None:
    active = reservation()
    assert not active.is_due(NOW)
    assert active.is_due(active.expires_at)
    assert not reservation(ReservationStatus.RELEASED).is_due(NOW + timedelta(days=1))


def test_bounds() -> None:
    assert apply_delta(5, -5) == 0
    with pytest.raises(InvalidStockChange):
        apply_delta(5, -6)
    with pytest.raises(InvalidReservation):
        expiry(NOW, 0)
    with pytest.raises(InvalidReservation):
        validate_reference("")
    with pytest.raises(InvalidReservation):
        validate_reference("x" * 101)
