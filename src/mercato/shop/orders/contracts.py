"""What other contexts may know of an order: a snapshot of what was bought and for how much."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime


@dataclass(frozen=True, slots=True)
class OrderedItem:
    sku: str
    product_id: uuid.UUID
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True, slots=True)
class OrderSnapshot:
    id: uuid.UUID
    customer_id: uuid.UUID
    status: str
    currency: str
    total_minor: int
    items: tuple[OrderedItem, ...]
    # When the order last changed (for a completed order: when it completed); None where unknown.
    updated_at: datetime | None = None
