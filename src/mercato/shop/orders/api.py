"""Orders HTTP routes: a customer's own orders under /v1/orders, every order under /admin/orders.

All orders are listed at `GET /admin/orders` rather than `GET /v1/orders?all=true`: one path
means one meaning ("my orders" never silently widens with a flag), the operator route sits with
the other operator routes, and each route's OpenAPI entry names the one scope it needs.

There is no `POST /v1/orders`: an order is created only by `POST /v1/checkout`, in the same
transaction as the saga that drives it to an outcome, so no order is ever left pending with
nothing to move it (a `POST` here is answered 405, `Allow: GET`).
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Header, Path, Query, Request, Response
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.errors import Forbidden
from mercato.kit.ids import parse_id
from mercato.kit.web import (
    Cursor,
    CursorError,
    InvalidCursor,
    Page,
    authenticated,
    problem_responses,
    require_scopes,
)
from mercato.kit.web.etags import ETAG_HEADER_DOC, IF_NONE_MATCH_MAX_LENGTH, content_etag, not_modified
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.kit.web.security import InsufficientScope
from mercato.shop.orders.model import Order, OrderNotFound
from mercato.shop.orders.service import OrdersService

CURSOR_SORT = "-id"


router = APIRouter(prefix="/v1/orders", tags=["orders"], route_class=PrivateRoute)
admin_router = APIRouter(prefix="/admin/orders", tags=["orders", "admin"], route_class=PrivateRoute)


class OrdersNeedCustomer(Forbidden):
    slug = "orders-customer-required"
    title = "Customer account required"
    description = "Own orders belong to a customer account; the token's subject is not one."


class OrderLineOut(BaseModel):
    line_no: int
    product_id: str
    sku: str
    name: str
    unit_price_minor: int
    quantity: int
    line_total_minor: int


class OrderSummaryOut(BaseModel):
    id: str
    customer_id: str
    status: str = Field(description="pending | confirmed | completed | cancelled | failed")
    currency: str
    total_minor: int
    item_count: int
    version: int
    created_at: datetime
    updated_at: datetime


class CheckoutStepOut(BaseModel):
    step: str
    direction: str = Field(description="forward | compensate")
    attempt: int
    outcome: str = Field(description="succeeded | failed | timed_out | rejected")
    error: str | None = Field(
        default=None, description="The attempt's internal error: staff (`orders:read_all`) only."
    )
    duration_ms: int
    recorded_at: datetime


class CheckoutProgressOut(BaseModel):
    saga_status: str = Field(description="running | compensating | completed | compensated | failed")
    reason: str | None = Field(
        default=None,
        description=(
            "Why the checkout failed, as a stable public code: out_of_stock | payment_declined | "
            "payment_unavailable | shipping_unavailable | timed_out | checkout_failed; null unless it failed."
        ),
    )
    failure: str | None = Field(
        default=None, description="The internal failure text: staff (`orders:read_all`) only."
    )
    steps: list[CheckoutStepOut] = Field(default_factory=list)


class OrderOut(OrderSummaryOut):
    lines: list[OrderLineOut]
    checkout: CheckoutProgressOut | None = Field(
        default=None, description="The order saga's state and step history, for orders placed by checkout."
    )


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def summary_dict(order: Order) -> dict[str, Any]:
    return {
        "id": str(order.id),
        "customer_id": str(order.customer_id),
        "status": order.status.value,
        "currency": order.currency,
        "total_minor": order.total_minor,
        "item_count": order.item_count,
        "version": order.version,
        "created_at": _ts(order.created_at),
        "updated_at": _ts(order.updated_at),
    }


def order_dict(order: Order, checkout: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        **summary_dict(order),
        "checkout": checkout,
        "lines": [
            {
                "line_no": line.line_no,
                "product_id": str(line.product_id),
                "sku": line.sku,
                "name": line.name,
                "unit_price_minor": line.unit_price_minor,
                "quantity": line.quantity,
                "line_total_minor": line.line_total_minor,
            }
            for line in order.lines
        ],
    }


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers
    )


def orders_service(request: Request) -> OrdersService:
    return cast(OrdersService, request.app.state.orders)


def _customer_id(principal: Principal) -> uuid.UUID:
    try:
        return uuid.UUID(principal.subject)
    except ValueError as exc:
        raise OrdersNeedCustomer("the caller is not a customer account") from exc


async def order_reader(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """`orders:read` (own orders) or `orders:read_all` (any order)."""
    if not (principal.has_scopes("orders:read") or principal.has_scopes("orders:read_all")):
        raise InsufficientScope("requires scope orders:read or orders:read_all")
    return principal


Service = Annotated[OrdersService, Depends(orders_service)]
OwnReader = Annotated[Principal, Depends(require_scopes("orders:read"))]
AnyReader = Annotated[Principal, Depends(order_reader)]
AllReader = Annotated[Principal, Depends(require_scopes("orders:read_all"))]
OrderIdPath = Annotated[str, Path(min_length=1, max_length=64)]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Page size, at most {MAX_PAGE_SIZE}.")]
CursorQuery = Annotated[
    str | None,
    Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description="`next_cursor` of the previous page."),
]

_PRIVATE_HEADER = PRIVATE_HEADER_DOC
IfNoneMatch = Annotated[
    str | None,
    Header(
        max_length=IF_NONE_MATCH_MAX_LENGTH,
        description="ETag(s) the client holds; a match answers 304 without a body.",
    ),
]
# The order's body includes its checkout saga's progress, which moves without the order's own
# `version` changing; so its ETag is a digest of the bytes sent, not the version.
ORDER_ETAG_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The order", "headers": {**_PRIVATE_HEADER, **ETAG_HEADER_DOC}},
    304: {
        "description": "Not modified: If-None-Match matched the current ETag",
        "headers": {**_PRIVATE_HEADER, **ETAG_HEADER_DOC},
    },
}


def conditional_json(content: Any, if_none_match: str | None) -> Response:
    """200 with a content ETag, or 304 when the client's If-None-Match already names it."""
    body = orjson.dumps(content)
    etag = content_etag(body)
    unchanged = not_modified(if_none_match, etag)
    if unchanged is not None:
        return unchanged
    return Response(body, media_type="application/json", headers={"ETag": etag})


def _after(cursor: str | None) -> uuid.UUID | None:
    if cursor is None:
        return None
    try:
        after = parse_id(Cursor.decode(cursor, expected_sort=CURSOR_SORT).id)
    except CursorError as exc:
        raise _bad_cursor(str(exc)) from exc
    if after is None:
        raise _bad_cursor("malformed cursor")
    return after


def _bad_cursor(message: str) -> InvalidCursor:
    # Well-formed (the query's pattern held) but not ours: 422, not 400 (ADR 0028).
    return InvalidCursor(message)


def _page(items: list[Order], more: bool) -> Response:
    next_cursor = (
        Cursor(sort=CURSOR_SORT, value=None, id=str(items[-1].id)).encode() if more and items else None
    )
    return _json({"items": [summary_dict(o) for o in items], "next_cursor": next_cursor})


@router.get(
    "",
    response_model=Page[OrderSummaryOut],
    summary="List my orders",
    description="The caller's orders, newest first, keyset-paginated (`limit` ≤ 100; above it: 400).",
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "A page of orders", "headers": _PRIVATE_HEADER},
    },
)
async def list_my_orders(
    service: Service, principal: OwnReader, limit: Limit = DEFAULT_PAGE_SIZE, cursor: CursorQuery = None
) -> Response:
    items, more = await service.list_for_customer(
        _customer_id(principal), limit=limit, after_id=_after(cursor)
    )
    return _page(items, more)


@router.get(
    "/{order_id}",
    response_model=OrderOut,
    summary="Get an order",
    description="The caller's own order; with `orders:read_all`, any order. Another customer's order is 404.",
    responses={**problem_responses(401, 403, 404), **ORDER_ETAG_RESPONSES},
)
async def get_order(
    order_id: OrderIdPath, service: Service, principal: AnyReader, if_none_match: IfNoneMatch = None
) -> Response:
    order, checkout = await visible_order(order_id, service, principal)
    return conditional_json(order_dict(order, checkout), if_none_match)


async def visible_order(
    order_id: str, service: OrdersService, principal: Principal
) -> tuple[Order, dict[str, Any] | None]:
    """The order and its checkout progress, if the caller may see it (else OrderNotFound)."""
    parsed = parse_id(order_id)
    if parsed is None:
        raise OrderNotFound(f"order {order_id} not found")
    read_all = principal.has_scopes("orders:read_all")
    try:
        customer: uuid.UUID | None = uuid.UUID(principal.subject)
    except ValueError:
        customer = None
    order = await service.get(parsed, customer_id=customer, read_all=read_all)
    # Internal failure detail (exception names, provider messages) is for staff only.
    return order, await service.checkout_progress(order.id, internal=read_all)


@admin_router.get(
    "",
    response_model=Page[OrderSummaryOut],
    summary="List all orders",
    description="Every customer's orders, newest first, keyset-paginated. Needs `orders:read_all`.",
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "A page of orders", "headers": _PRIVATE_HEADER},
    },
)
async def list_all_orders(
    service: Service, _reader: AllReader, limit: Limit = DEFAULT_PAGE_SIZE, cursor: CursorQuery = None
) -> Response:
    items, more = await service.list_all(limit=limit, after_id=_after(cursor))
    return _page(items, more)
