from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.shop.orders.model import EmptyCart, InvalidOrder, LineDraft, OrderStatus, place_order

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def draft(sku: str, price: int, quantity: int, currency: str = "EUR") -> LineDraft:
    return LineDraft(uuid.uuid4(), sku, f"Name {sku}", price, quantity, currency)


@given(st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 999)), min_size=1, max_size=30))
def test_totals_are_exact_sums_of_integer_lines(raw: list[tuple[int, int]]) -> None:
    lines = [draft(f"SKU-{n:03d}", price, quantity) for n, (price, quantity) in enumerate(raw)]
    order = place_order(order_id=uuid.uuid4(), customer_id=uuid.uuid4(), lines=lines, now=NOW)
    assert order.status is OrderStatus.PENDING
    assert order.total_minor == sum(p * q for p, q in raw)
    assert order.item_count == sum(q for _, q in raw)
    assert [line.line_no for line in order.lines] == list(range(1, len(raw) + 1))
    assert all(line.line_total_minor == line.unit_price_minor * line.quantity for line in order.lines)


def place(lines: list[LineDraft]) -> None:
    place_order(order_id=uuid.uuid4(), customer_id=uuid.uuid4(), lines=lines, now=NOW)


def test_rules() -> None:
    with pytest.raises(EmptyCart):
        place([])
    with pytest.raises(InvalidOrder):
        place([draft("SKU-A", 1, 1), draft("SKU-B", 1, 1, "USD")])
    with pytest.raises(InvalidOrder):
        place([draft("SKU-A", 1, 1), draft("SKU-A", 1, 1)])
    with pytest.raises(InvalidOrder):
        place([draft("SKU-A", 1, 0)])


def test_visibility() -> None:
    owner, stranger = uuid.uuid4(), uuid.uuid4()
    order = place_order(order_id=uuid.uuid4(), customer_id=owner, lines=[draft("SKU-A", 1, 1)], now=NOW)
    assert order.visible_to(owner, read_all=False)
    assert not order.visible_to(stranger, read_all=False)
    assert not order.visible_to(None, read_all=False)
    assert order.visible_to(None, read_all=True)
