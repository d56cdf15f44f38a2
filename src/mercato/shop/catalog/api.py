"""Catalog HTTP routes: public browsing and admin product management."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mercato.kit.auth import Principal
from mercato.kit.flags import EvaluationContext, Flags
from mercato.kit.ids import parse_id
from mercato.kit.web import (
    CURSOR_MAX_LENGTH,
    CURSOR_PATTERN,
    Cursor,
    CursorError,
    InvalidCursor,
    Page,
    problem_responses,
    require_scopes,
)
from mercato.kit.web.etags import (
    ETAG_HEADER_DOC,
    IF_MATCH_MAX_LENGTH,
    IF_NONE_MATCH_MAX_LENGTH,
    VersionTag,
    if_match_versions,
    not_modified,
)
from mercato.kit.web.numbers import WHOLE_NUMBER, JsonInt
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.shop.catalog.cache import ProductCache, product_tags
from mercato.shop.catalog.model import (
    NewProduct,
    Product,
    ProductChanges,
    ProductNotFound,
    ProductQuery,
    ProductSort,
)
from mercato.shop.catalog.service import CatalogService

router = APIRouter(prefix="/v1/products", tags=["catalog"])

AttributeValue = str | int | float | bool


class ProductOut(BaseModel):
    id: str
    sku: str
    name: str
    description: str
    price_minor: int
    currency: str
    category: str
    attributes: dict[str, AttributeValue]
    archived: bool
    version: int
    created_at: datetime
    updated_at: datetime


class ProductIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sku: str = Field(min_length=3, max_length=64, pattern=r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$")
    name: str = Field(min_length=1, max_length=200)
    description: str = Field(default="", max_length=5000)
    price_minor: JsonInt = Field(ge=0, le=10**12)
    currency: str = Field(min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")
    category: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
    attributes: dict[Annotated[str, Field(min_length=1, max_length=64)], AttributeValue] = Field(
        default_factory=dict, max_length=32
    )

    @field_validator("attributes")
    @classmethod
    def _bounded_values(cls, value: dict[str, AttributeValue]) -> dict[str, AttributeValue]:
        for key, item in value.items():
            if isinstance(item, str) and len(item) > 500:
                raise ValueError(f"attribute {key!r} is longer than 500 characters")
        return value


class ProductPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(default=None, min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=5000)
    price_minor: Annotated[int, Field(ge=0, le=10**12), WHOLE_NUMBER] | None = None
    currency: str | None = Field(default=None, min_length=3, max_length=3, pattern=r"^[A-Z]{3}$")
    category: str | None = Field(
        default=None, min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$"
    )
    attributes: dict[Annotated[str, Field(min_length=1, max_length=64)], AttributeValue] | None = Field(
        default=None, max_length=32
    )


def product_dict(product: Product) -> dict[str, Any]:
    return {
        "id": str(product.id),
        "sku": product.sku,
        "name": product.name,
        "description": product.description,
        "price_minor": product.price_minor,
        "currency": product.currency,
        "category": product.category,
        "attributes": product.attributes,
        "archived": product.archived,
        "version": product.version,
        "created_at": product.created_at.isoformat().replace("+00:00", "Z"),
        "updated_at": product.updated_at.isoformat().replace("+00:00", "Z"),
    }


def product_body(product: Product) -> bytes:
    """The v1 body of a product: what the product cache stores and `GET /v1/products/{id}` sends."""
    return orjson.dumps(product_dict(product))


def product_etag(product: Product, representation: str = "v1") -> str:
    """Strong ETag of one stored version in one representation; every change bumps `version`."""
    return VersionTag("product", str(product.id), product.version, representation).render()


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers
    )


SEARCH_V2_FLAG = "catalog.search_v2"


def search_v2(request: Request) -> bool:
    """Flag `catalog.search_v2` for this caller: targeted by the serving process's release track (a
    canary runs it), or rolled out by the caller's address (the same client, the same search)."""
    flags: Flags | None = getattr(request.app.state, "flags", None)
    if flags is None:
        return False
    context = EvaluationContext(
        targeting_key=request.client.host if request.client else None,
        track=getattr(request.app.state, "release_track", None),
    )
    return flags.is_on(SEARCH_V2_FLAG, context)


def catalog_service(request: Request) -> CatalogService:
    return cast(CatalogService, request.app.state.catalog)


def product_cache(request: Request) -> ProductCache | None:
    return cast(ProductCache | None, getattr(request.app.state, "product_cache", None))


Service = Annotated[CatalogService, Depends(catalog_service)]
Products = Annotated[ProductCache | None, Depends(product_cache)]
# Public catalog responses name what they show, so an edge cache can purge exactly those.
SURROGATE_KEY = "Surrogate-Key"
CATALOG_TAG = "products"
Admin = Annotated[Principal, Depends(require_scopes("catalog:write"))]
ProductIdPath = Annotated[str, Path(min_length=1, max_length=64)]
# The listing's query parameters, in v1 and v2 alike.
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)]
PageCursor = Annotated[
    str | None,
    Query(
        max_length=CURSOR_MAX_LENGTH,
        pattern=CURSOR_PATTERN,
        description="`next_cursor` of the previous page; one this listing did not issue is 422.",
    ),
]
CategoryFilter = Annotated[
    str | None, Query(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9-]{0,62}$")
]
NameSearch = Annotated[str | None, Query(min_length=1, max_length=100, description="Name contains")]
IfNoneMatch = Annotated[
    str | None,
    Header(
        max_length=IF_NONE_MATCH_MAX_LENGTH,
        description="ETag(s) the client holds; a match answers 304 without a body.",
    ),
]
IfMatch = Annotated[
    str | None,
    Header(
        min_length=1,
        max_length=IF_MATCH_MAX_LENGTH,
        description=(
            "Required: the ETag of the product the change is based on. Missing: 428; no longer "
            "current: 412, and nothing is written."
        ),
    ),
]

# OpenAPI entries for the conditional-request answers of a single product.
# Served from the cache past its freshness (the primary unreachable or revalidating): docs/consistency.md.
STALENESS_HEADER_DOC: dict[str, Any] = {
    "Mercato-Staleness": {
        "schema": {"type": "integer", "minimum": 0},
        "description": "Present when the product came from the cache past its freshness lifetime (the "
        "primary database unreachable or being revalidated): by how many seconds (RFC 9111 staleness).",
    }
}
ETAG_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "The product", "headers": {**ETAG_HEADER_DOC, **STALENESS_HEADER_DOC}}
}
NOT_MODIFIED: dict[int | str, dict[str, Any]] = {
    304: {"description": "Not modified: If-None-Match matched the current ETag", "headers": ETAG_HEADER_DOC}
}


def _product_id(raw: str) -> uuid.UUID:
    parsed = parse_id(raw)
    if parsed is None:
        raise ProductNotFound(f"product {raw} not found")
    return parsed


@router.get(
    "",
    response_model=Page[ProductOut],
    summary="List products",
    description=(
        "Live products, keyset-paginated. Filter by category, price range and a name search. A "
        "category's first page (no cursor, price range or search) is served from the application "
        "cache with a strong `ETag` (`If-None-Match` → 304), dropped on every product change."
    ),
    responses={
        **problem_responses(400, 422),
        200: {"description": "A page of products", "headers": ETAG_HEADER_DOC},
        **NOT_MODIFIED,
    },
)
async def list_products(
    request: Request,
    service: Service,
    products: Products,
    limit: PageLimit = DEFAULT_PAGE_SIZE,
    cursor: PageCursor = None,
    sort: ProductSort = ProductSort.NEWEST,
    category: CategoryFilter = None,
    min_price_minor: Annotated[
        int | None,
        Query(ge=0, le=10**12, description="Inclusive; above `max_price_minor` the request is 422."),
    ] = None,
    max_price_minor: Annotated[
        int | None,
        Query(ge=0, le=10**12, description="Inclusive; below `min_price_minor` the request is 422."),
    ] = None,
    q: NameSearch = None,
    if_none_match: IfNoneMatch = None,
) -> Response:
    if (
        category is not None
        and products is not None
        and first_page_only(cursor, min_price_minor, max_price_minor, q)
    ):
        body, etag, surrogate_key = await read_category_page(service, products, category, sort, limit)
        if (unchanged := not_modified(if_none_match, etag)) is not None:
            unchanged.headers[SURROGATE_KEY] = surrogate_key
            return unchanged
        return Response(
            body, media_type="application/json", headers={"ETag": etag, SURROGATE_KEY: surrogate_key}
        )
    items, next_cursor = await browse_page(
        service,
        limit=limit,
        cursor=cursor,
        sort=sort,
        category=category,
        min_price_minor=min_price_minor,
        max_price_minor=max_price_minor,
        q=q,
        search_words=q is not None and search_v2(request),
    )
    return _json(
        {"items": [product_dict(p) for p in items], "next_cursor": next_cursor},
        headers={SURROGATE_KEY: CATALOG_TAG},
    )


def first_page_only(cursor: object, min_price: object, max_price: object, q: object) -> bool:
    """A category's first page with no other filter: the listing the application cache keeps."""
    return cursor is None and min_price is None and max_price is None and q is None


def page_body(items: list[Product], next_cursor: str | None) -> bytes:
    return orjson.dumps({"items": [product_dict(p) for p in items], "next_cursor": next_cursor})


async def read_category_page(
    service: CatalogService, products: ProductCache, category: str, sort: ProductSort, limit: int
) -> tuple[bytes, str, str]:
    """`GET /v1/products?category=C[&sort=S][&limit=N]`'s body, ETag and `Surrogate-Key`, from the
    application cache (invalidated by every product change: `ProductCache.page`). Shared by the route
    and the edge, which answers it before routing (ADR 0061); a hit and its 304 touch no database."""

    async def load() -> bytes:
        query = ProductQuery(limit=limit, sort=sort, category=category)
        items, more = await service.browse(query, primary=True)
        return page_body(items, _next_cursor(items, more, sort))

    page = await products.page(category, sort.value, limit, load)
    return page.body, page.etag, page.surrogate_key


def _next_cursor(items: list[Product], more: bool, sort: ProductSort) -> str | None:
    if more and items:
        last = items[-1]
        return Cursor(sort=sort.value, value=last.sort_value(sort), id=str(last.id)).encode()
    return None


async def browse_page(
    service: CatalogService,
    *,
    limit: int,
    cursor: str | None,
    sort: ProductSort,
    category: str | None,
    min_price_minor: int | None,
    max_price_minor: int | None,
    q: str | None,
    search_words: bool = False,
) -> tuple[list[Product], str | None]:
    """One page of live products and the cursor of the next; shared by every API version."""
    after_value: Any = None
    after_id: uuid.UUID | None = None
    if cursor is not None:
        try:
            decoded = Cursor.decode(cursor, expected_sort=sort.value)
        except CursorError as exc:
            raise InvalidCursor(str(exc)) from exc
        after_id = parse_id(decoded.id)
        if after_id is None:
            raise InvalidCursor("malformed cursor")
        after_value = decoded.value
        if sort.key == "price" and not isinstance(after_value, int):
            raise InvalidCursor("malformed cursor")
        if sort.key == "name" and not isinstance(after_value, str):
            raise InvalidCursor("malformed cursor")
    query = ProductQuery(
        limit=limit,
        sort=sort,
        category=category,
        min_price_minor=min_price_minor,
        max_price_minor=max_price_minor,
        search=q,
        search_words=search_words,
        after_value=after_value,
        after_id=after_id,
    )
    items, more = await service.browse(query)
    return items, _next_cursor(items, more, sort)


@router.get(
    "/{product_id}",
    response_model=ProductOut,
    summary="Get a product",
    responses={**problem_responses(404), **ETAG_OK, **NOT_MODIFIED},
)
async def get_product(
    product_id: ProductIdPath, service: Service, products: Products, if_none_match: IfNoneMatch = None
) -> Response:
    body, etag, surrogate_key = await read_product(service, products, product_id)
    headers = {"ETag": etag, SURROGATE_KEY: surrogate_key}
    if (unchanged := not_modified(if_none_match, etag)) is not None:
        unchanged.headers[SURROGATE_KEY] = surrogate_key
        return unchanged
    return Response(body, media_type="application/json", headers=headers)


async def read_product(
    service: CatalogService, products: ProductCache | None, product_id: str
) -> tuple[bytes, str, str]:
    """`GET /v1/products/{id}`'s body, ETag and `Surrogate-Key`; `ProductNotFound` if there is none.
    Shared by the route and the edge, which answers this read before routing (ADR 0054)."""
    if products is None:
        product = await service.get(_product_id(product_id))
        return product_body(product), product_etag(product), product_tags(str(product.id))
    # From the application cache: a hit (and its 304) touches no database.
    cached = await products.get_text(product_id)
    return cached.body, cached.etag, cached.surrogate_key


@router.post(
    "",
    response_model=ProductOut,
    status_code=201,
    summary="Create a product",
    responses={
        **problem_responses(401, 403, 409, 422),
        201: {
            "description": "Created",
            "headers": {"Location": {"schema": {"type": "string"}}, **ETAG_HEADER_DOC},
        },
    },
)
async def create_product(body: ProductIn, service: Service, _admin: Admin) -> Response:
    product = await service.create(
        NewProduct(
            sku=body.sku,
            name=body.name,
            description=body.description,
            price_minor=body.price_minor,
            currency=body.currency,
            category=body.category,
            attributes=dict(body.attributes),
        )
    )
    return _json(
        product_dict(product), 201, {"Location": f"/v1/products/{product.id}", "ETag": product_etag(product)}
    )


@router.patch(
    "/{product_id}",
    response_model=ProductOut,
    summary="Update a product",
    description=(
        "A conditional write: `If-Match` must carry the product's current ETag (from GET or the last "
        "write). Without it: 428 `precondition-required`; when another change got there first: 412 "
        "`precondition-failed` and nothing is written, so no update is ever silently lost."
    ),
    responses={
        **problem_responses(401, 403, 404, 409, 412, 422, 428),
        200: {"description": "The updated product", "headers": ETAG_HEADER_DOC},
    },
)
async def update_product(
    product_id: ProductIdPath,
    body: ProductPatch,
    service: Service,
    _admin: Admin,
    if_match: IfMatch = None,
) -> Response:
    parsed_id = _product_id(product_id)
    expected = if_match_versions(if_match, kind="product", resource_id=str(parsed_id))
    changes = ProductChanges(
        name=body.name,
        description=body.description,
        price_minor=body.price_minor,
        currency=body.currency,
        category=body.category,
        attributes=dict(body.attributes) if body.attributes is not None else None,
    )
    product = await service.update(parsed_id, changes, expected_versions=expected)
    return _json(product_dict(product), headers={"ETag": product_etag(product)})


@router.post(
    "/{product_id}/archive",
    response_model=ProductOut,
    summary="Archive a product",
    description="Hides the product from the public catalog; existing orders keep their lines.",
    responses={
        **problem_responses(401, 403, 404, 409),
        200: {"description": "The archived product", "headers": ETAG_HEADER_DOC},
    },
)
async def archive_product(product_id: ProductIdPath, service: Service, _admin: Admin) -> Response:
    product = await service.archive(_product_id(product_id))
    return _json(product_dict(product), headers={"ETag": product_etag(product)})
