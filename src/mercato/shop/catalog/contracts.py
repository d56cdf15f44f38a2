"""What other contexts may know of the catalog: a price quote per product, by id or by SKU."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class PriceQuote:
    product_id: uuid.UUID
    sku: str
    name: str
    unit_price_minor: int
    currency: str
    available_for_sale: bool


class PriceBook(Protocol):
    """Resolves current prices; the catalog service implements it."""

    async def quote(self, product_ids: list[uuid.UUID]) -> dict[uuid.UUID, PriceQuote]: ...

    async def quote_skus(self, skus: list[str]) -> dict[str, PriceQuote]:
        """Quotes by SKU, archived products included (flagged `available_for_sale=False`);
        SKUs the catalog never had are absent from the result."""
        ...
