from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from mercato.shop.cart.contracts import UnavailableReason
from mercato.shop.cart.model import (
    CartFull,
    CartItem,
    CartLimits,
    CatalogPrice,
    CurrencyMismatch,
    InvalidCartItem,
    ProductUnavailable,
    check_set_item,
    price_cart,
)

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LIMITS = CartLimits(max_quantity_per_line=10, max_lines=2)


def item(sku: str, quantity: int, minutes: int = 0) -> CartItem:
    moment = NOW + timedelta(minutes=minutes)
    return CartItem(sku, quantity, moment, moment)


def price(amount: int, currency: str = "EUR", *, for_sale: bool = True) -> CatalogPrice:
    return CatalogPrice(uuid.uuid4(), "Thing", amount, currency, for_sale)


def test_totals_are_integer_minor_units_of_available_lines() -> None:
    prices = {"SKU-A": price(199), "SKU-B": price(1000, for_sale=False), "SKU-D": price(5, "USD")}
    items = [item("SKU-A", 3), item("SKU-B", 1, 1), item("SKU-C", 2, 2), item("SKU-D", 1, 3)]
    view = price_cart(uuid.uuid4(), items, prices)
    assert (view.currency, view.total_minor, view.item_count) == ("EUR", 597, 3)
    assert [line.unavailable_reason for line in view.lines] == [
        None,
        UnavailableReason.ARCHIVED,
        UnavailableReason.UNKNOWN,
        UnavailableReason.CURRENCY_CHANGED,
    ]
    assert view.has_unavailable_lines


def test_empty_cart_has_no_currency() -> None:
    view = price_cart(uuid.uuid4(), [], {})
    assert (view.lines, view.currency, view.total_minor) == ((), None, 0)


def test_set_item_rules() -> None:
    prices = {"SKU-A": price(1), "SKU-B": price(1), "SKU-C": price(1), "SKU-U": price(1, "USD")}
    check_set_item([], "SKU-A", 10, prices, LIMITS)
    with pytest.raises(InvalidCartItem):
        check_set_item([], "SKU-A", 11, prices, LIMITS)
    with pytest.raises(InvalidCartItem):
        check_set_item([], "sku a", 1, prices, LIMITS)
    with pytest.raises(ProductUnavailable):
        check_set_item([], "SKU-X", 1, prices, LIMITS)
    with pytest.raises(CurrencyMismatch):
        check_set_item([item("SKU-A", 1)], "SKU-U", 1, prices, LIMITS)
    full = [item("SKU-A", 1), item("SKU-B", 1)]
    with pytest.raises(CartFull):
        check_set_item(full, "SKU-C", 1, prices, LIMITS)
    check_set_item(full, "SKU-B", 5, prices, LIMITS)


def test_per_line_limit_is_capped_by_storage() -> None:
    assert CartLimits(max_quantity_per_line=5000, max_lines=1).max_quantity == 999
