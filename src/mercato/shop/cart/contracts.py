"""What other contexts may know of the cart: its priced view and a port to take its lines.

The orders context turns a cart into an order through `CartSource`; the cart service implements
it. Prices in a `CartView` come from the catalog at the moment the view was made.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol


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


class CartSource(Protocol):
    """The cart as the orders context sees it."""

    async def view(self, customer_id: uuid.UUID) -> CartView:
        """The cart priced now."""
        ...

    async def take(self, customer_id: uuid.UUID, lines: Sequence[tuple[str, int]]) -> None:
        """Remove exactly these (sku, quantity) lines, all or none; raises a Conflict
        (`cart-changed`) if any of them is no longer in the cart with that quantity."""
        ...

    async def restore(self, customer_id: uuid.UUID, lines: Sequence[tuple[str, int]]) -> None:
        """Put taken lines back (a compensation); lines re-added meanwhile are left as they are."""
        ...
