"""Catalog entities and rules. Pure: no I/O."""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

from mercato.kit.errors import Conflict, NotFound, RuleViolated

SKU_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$")
CURRENCY_PATTERN = re.compile(r"^[A-Z]{3}$")
CATEGORY_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
MAX_ATTRIBUTES = 32


class ProductNotFound(NotFound):
    slug = "product-not-found"
    title = "Product not found"
    description = "No product with this id exists (or it was never visible to the caller)."


class DuplicateSku(Conflict):
    slug = "duplicate-sku"
    title = "SKU already in use"
    description = "Another product already has this SKU; SKUs are unique across the catalog."


class InvalidProduct(RuleViolated):
    slug = "invalid-product"
    title = "Invalid product"
    description = "The product data breaks a catalog rule (SKU format, currency, category, attributes)."


class ProductSort(StrEnum):
    NEWEST = "-created_at"
    OLDEST = "created_at"
    PRICE_ASC = "price"
    PRICE_DESC = "-price"
    NAME_ASC = "name"
    NAME_DESC = "-name"

    @property
    def descending(self) -> bool:
        return self.value.startswith("-")

    @property
    def key(self) -> str:
        return self.value.lstrip("-")


@dataclass(frozen=True, slots=True)
class Product:
    id: uuid.UUID
    sku: str
    name: str
    description: str
    price_minor: int
    currency: str
    category: str
    attributes: dict[str, Any]
    archived: bool
    version: int
    created_at: datetime
    updated_at: datetime

    def sort_value(self, sort: ProductSort) -> Any:
        if sort.key == "price":
            return self.price_minor
        if sort.key == "name":
            return self.name
        # Ids are UUIDv7, so id order is creation order: the id alone is the key.
        return None

    def with_changes(self, changes: ProductChanges, *, now: datetime) -> Product:
        values = {k: v for k, v in changes.as_dict().items() if v is not None}
        if not values:
            return self
        updated = replace(self, **values, version=self.version + 1, updated_at=now)
        validate_product_fields(
            updated.sku, updated.currency, updated.category, updated.attributes, updated.price_minor
        )
        return updated

    def archive(self, *, now: datetime) -> Product:
        if self.archived:
            return self
        return replace(self, archived=True, version=self.version + 1, updated_at=now)


@dataclass(frozen=True, slots=True)
class NewProduct:
    sku: str
    name: str
    price_minor: int
    currency: str
    category: str
    description: str = ""
    attributes: dict[str, Any] = field(default_factory=dict)

    def create(self, *, product_id: uuid.UUID, now: datetime) -> Product:
        validate_product_fields(self.sku, self.currency, self.category, self.attributes, self.price_minor)
        return Product(
            id=product_id,
            sku=self.sku,
            name=self.name.strip(),
            description=self.description,
            price_minor=self.price_minor,
            currency=self.currency,
            category=self.category,
            attributes=dict(self.attributes),
            archived=False,
            version=1,
            created_at=now,
            updated_at=now,
        )


@dataclass(frozen=True, slots=True)
class ProductChanges:
    name: str | None = None
    description: str | None = None
    price_minor: int | None = None
    currency: str | None = None
    category: str | None = None
    attributes: dict[str, Any] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "price_minor": self.price_minor,
            "currency": self.currency,
            "category": self.category,
            "attributes": self.attributes,
        }


@dataclass(frozen=True, slots=True)
class ProductQuery:
    limit: int = 20
    sort: ProductSort = ProductSort.NEWEST
    category: str | None = None
    min_price_minor: int | None = None
    max_price_minor: int | None = None
    search: str | None = None
    # The new search (flag `catalog.search_v2`, ADR 0047): every word of `search` must occur in the
    # name, in any order ("shoe red" finds "Red running shoe"); off: the whole string as typed.
    search_words: bool = False
    after_value: Any = None
    after_id: uuid.UUID | None = None

    def __post_init__(self) -> None:
        if (
            self.min_price_minor is not None
            and self.max_price_minor is not None
            and self.min_price_minor > self.max_price_minor
        ):
            raise InvalidProduct(
                "min_price_minor is greater than max_price_minor", field="query.min_price_minor"
            )


def validate_product_fields(
    sku: str, currency: str, category: str, attributes: dict[str, Any], price_minor: int
) -> None:
    if not SKU_PATTERN.match(sku):
        raise InvalidProduct("sku must be 3-64 characters of A-Z, 0-9 and '-'", field="sku")
    if not CURRENCY_PATTERN.match(currency):
        raise InvalidProduct("currency must be an ISO 4217 code such as EUR", field="currency")
    if not CATEGORY_PATTERN.match(category):
        raise InvalidProduct("category must be lower-case a-z, 0-9 and '-'", field="category")
    if price_minor < 0:
        raise InvalidProduct("price_minor must not be negative", field="price_minor")
    if len(attributes) > MAX_ATTRIBUTES:
        raise InvalidProduct(f"at most {MAX_ATTRIBUTES} attributes", field="attributes")
