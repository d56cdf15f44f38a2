"""The catalog's integration event: `mercato.catalog.product_changed`, written to the outbox in the
same transaction as the change (schema: src/mercato/schemas/mercato.catalog.product_changed/).

Its consumers: the product cache's invalidation (workers/jobs.py, `catalog_cache_invalidation`),
and anything else that mirrors the catalog (a search index, a price watcher).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, Protocol

from mercato.kit.clock import Clock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.shop.catalog.model import Product

__all__ = ["PRODUCT_CHANGED", "TOPIC", "EventContract", "ProductEvents"]

TOPIC = "mercato.catalog"
PRODUCT_CHANGED = "mercato.catalog.product_changed"
SOURCE = "mercato/catalog"

Change = Literal["created", "updated", "archived"]


class EventContract(Protocol):
    """Validates `data` against the type's current schema and returns the `dataschema` to stamp."""

    def dataschema_for(self, event_type: str, data: Mapping[str, Any]) -> str: ...


class ProductEvents:
    def __init__(self, *, clock: Clock, contract: EventContract | None = None) -> None:
        self._clock = clock
        self._contract = contract

    def changed(self, product: Product, change: Change) -> Message:
        data: dict[str, Any] = {
            "product_id": str(product.id),
            "sku": product.sku,
            "version": product.version,
            "change": change,
            "price_minor": product.price_minor,
            "currency": product.currency,
            "archived": product.archived,
        }
        dataschema = None if self._contract is None else self._contract.dataschema_for(PRODUCT_CHANGED, data)
        return Message(
            id=new_id(),
            source=SOURCE,
            type=PRODUCT_CHANGED,
            subject=str(product.id),
            time=self._clock.now(),
            data=data,
            topic=TOPIC,
            dataschema=dataschema,
        )
