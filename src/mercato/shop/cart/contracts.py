"""What other contexts may know of the cart: its priced view.

The orders context turns a cart into an order through its own `CartSource` port, which the cart
service implements. Prices in a `CartView` come from the catalog at the moment the view was made.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from enum import StrEnum


class UnavailableReason(StrEnum):
    ARCHIVED = "archived"
    UNKNOWN = "unknown"
    CURRENCY_CHANGED = "currency_changed"


@dataclass(frozen=True, slots=True)
class CartLineView:
    sku: str
    product_id: uuid.UUID | None
    name: str
    quantity: int
    unit_price_minor: int
    line_total_minor: int
    currency: str | None
    unavailable_reason: UnavailableReason | None = None

    @property
    def available(self) -> bool:
        return self.unavailable_reason is None


@dataclass(frozen=True, slots=True)
class CartView:
    customer_id: uuid.UUID
    lines: tuple[CartLineView, ...]
    currency: str | None
    total_minor: int
    item_count: int

    @property
    def has_unavailable_lines(self) -> bool:
        return any(not line.available for line in self.lines)
