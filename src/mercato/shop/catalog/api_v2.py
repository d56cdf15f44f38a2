"""Catalog HTTP routes, API v2: the same products, a different representation.

What changed from v1 (docs/decisions/0014-api-versioning-and-etags.md):
- money is one object, `price: {"amount": "19.99", "currency": "EUR"}`, the amount a decimal string
  in major units (v1: `price_minor` + `currency`);
- `archived: bool` became `status: "active" | "archived"`, an enum that can grow;
- `version` left the body: the ETag carries it, and it is what a conditional write sends back.

Only reads are offered in v2. Admin writes stay on v1 (PATCH with If-Match), whose ETags name the
same stored versions, so a v2 reader can hand its ETag to a v1 write.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel

from mercato.kit.web import Page, problem_responses
from mercato.kit.web.etags import VersionTag, not_modified
from mercato.kit.web.money import MoneyOut, money
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE
from mercato.shop.catalog.api import (
    CATALOG_TAG,
    ETAG_OK,
    NOT_MODIFIED,
    SURROGATE_KEY,
    AttributeValue,
    CategoryFilter,
    IfNoneMatch,
    NameSearch,
    PageCursor,
    PageLimit,
    ProductIdPath,
    Products,
    Service,
    _json,
    _product_id,
    browse_page,
    product_etag,
)
from mercato.shop.catalog.cache import product_tags
from mercato.shop.catalog.model import Product, ProductSort

router = APIRouter(prefix="/v2/products", tags=["catalog"])

REPRESENTATION = "v2"


class ProductStatus(StrEnum):
    ACTIVE = "active"
    ARCHIVED = "archived"


class ProductV2Out(BaseModel):
    id: str
    sku: str
    name: str
    description: str
    price: MoneyOut
    category: str
    attributes: dict[str, AttributeValue]
    status: ProductStatus
    created_at: datetime
    updated_at: datetime


def product_v2_dict(product: Product) -> dict[str, Any]:
    return {
        "id": str(product.id),
        "sku": product.sku,
        "name": product.name,
        "description": product.description,
        "price": money(product.price_minor, product.currency),
        "category": product.category,
        "attributes": product.attributes,
        "status": ProductStatus.ARCHIVED.value if product.archived else ProductStatus.ACTIVE.value,
        "created_at": product.created_at.isoformat().replace("+00:00", "Z"),
        "updated_at": product.updated_at.isoformat().replace("+00:00", "Z"),
    }


@router.get(
    "",
    response_model=Page[ProductV2Out],
    summary="List products (v2)",
    description=(
        "Live products, keyset-paginated; filter by category and a name search. The v1 price-range "
        "filters are not offered: a range in major units means nothing without a currency."
    ),
    responses=problem_responses(400),
)
async def list_products_v2(
    service: Service,
    limit: PageLimit = DEFAULT_PAGE_SIZE,
    cursor: PageCursor = None,
    sort: ProductSort = ProductSort.NEWEST,
    category: CategoryFilter = None,
    q: NameSearch = None,
) -> Response:
    items, next_cursor = await browse_page(
        service,
        limit=limit,
        cursor=cursor,
        sort=sort,
        category=category,
        min_price_minor=None,
        max_price_minor=None,
        q=q,
    )
    return _json(
        {"items": [product_v2_dict(p) for p in items], "next_cursor": next_cursor},
        headers={SURROGATE_KEY: CATALOG_TAG},
    )


@router.get(
    "/{product_id}",
    response_model=ProductV2Out,
    summary="Get a product (v2)",
    responses={**problem_responses(404), **ETAG_OK, **NOT_MODIFIED},
)
async def get_product_v2(
    product_id: ProductIdPath, service: Service, products: Products, if_none_match: IfNoneMatch = None
) -> Response:
    parsed = _product_id(product_id)
    if products is None:
        product = await service.get(parsed)
        etag, body = product_etag(product, REPRESENTATION), product_v2_dict(product)
    else:
        # The cache holds the v1 body; a 304 needs only its id and version (no database).
        cached = await products.get(parsed)
        etag = VersionTag("product", cached.id, cached.version, REPRESENTATION).render()
        body = None
    tags = product_tags(str(parsed))
    if (unchanged := not_modified(if_none_match, etag)) is not None:
        unchanged.headers[SURROGATE_KEY] = tags
        return unchanged
    if body is None:
        body = v2_from_v1(cached.as_dict())
    return _json(body, headers={"ETag": etag, SURROGATE_KEY: tags})


def v2_from_v1(v1: dict[str, Any]) -> dict[str, Any]:
    """The v2 representation from the cached v1 body (the same fields, reshaped as ADR 0014 says)."""
    return {
        "id": v1["id"],
        "sku": v1["sku"],
        "name": v1["name"],
        "description": v1["description"],
        "price": money(v1["price_minor"], v1["currency"]),
        "category": v1["category"],
        "attributes": v1["attributes"],
        "status": ProductStatus.ARCHIVED.value if v1["archived"] else ProductStatus.ACTIVE.value,
        "created_at": v1["created_at"],
        "updated_at": v1["updated_at"],
    }
