"""Orders HTTP routes, API v2: the caller's own orders in the v2 representation.

What changed from v1 (docs/decisions/0014-api-versioning-and-etags.md):
- money is one object per amount, `{"amount": "47.48", "currency": "EUR"}` with a decimal string in
  major units: `total` replaces `total_minor` + `currency`, each line's `unit_price` and
  `line_total` replace `unit_price_minor` and `line_total_minor`;
- `version` left the body: the ETag identifies the representation.

Placing an order is `POST /v1/checkout` (its 202 body names the order to poll), and the operator
list stays `/admin/orders`: the operator space is not versioned.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel, Field

from mercato.kit.web import Cursor, Page, problem_responses
from mercato.kit.web.money import MoneyOut, money
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.orders.api import (
    CURSOR_SORT,
    ORDER_ETAG_RESPONSES,
    AnyReader,
    CheckoutProgressOut,
    CursorQuery,
    IfNoneMatch,
    Limit,
    OrderIdPath,
    OwnReader,
    Service,
    _after,
    _customer_id,
    _json,
    _ts,
    conditional_json,
    visible_order,
)
from mercato.shop.orders.model import Order

router = APIRouter(prefix="/v2/orders", tags=["orders"], route_class=PrivateRoute)


class OrderLineV2Out(BaseModel):
    line_no: int
    product_id: str
    sku: str
    name: str
    unit_price: MoneyOut
    quantity: int
    line_total: MoneyOut


class OrderSummaryV2Out(BaseModel):
    id: str
    customer_id: str
    status: str = Field(description="pending | confirmed | completed | cancelled | failed")
    total: MoneyOut
    item_count: int
    created_at: datetime
    updated_at: datetime


class OrderV2Out(OrderSummaryV2Out):
    lines: list[OrderLineV2Out]
    checkout: CheckoutProgressOut | None = Field(
        default=None, description="The order saga's state and step history, for orders placed by checkout."
    )


def summary_v2_dict(order: Order) -> dict[str, Any]:
    return {
        "id": str(order.id),
        "customer_id": str(order.customer_id),
        "status": order.status.value,
        "total": money(order.total_minor, order.currency),
        "item_count": order.item_count,
        "created_at": _ts(order.created_at),
        "updated_at": _ts(order.updated_at),
    }


def order_v2_dict(order: Order, checkout: dict[str, Any] | None) -> dict[str, Any]:
    return {
        **summary_v2_dict(order),
        "checkout": checkout,
        "lines": [
            {
                "line_no": line.line_no,
                "product_id": str(line.product_id),
                "sku": line.sku,
                "name": line.name,
                "unit_price": money(line.unit_price_minor, order.currency),
                "quantity": line.quantity,
                "line_total": money(line.line_total_minor, order.currency),
            }
            for line in order.lines
        ],
    }


@router.get(
    "",
    response_model=Page[OrderSummaryV2Out],
    summary="List my orders (v2)",
    description="The caller's orders, newest first, keyset-paginated (`limit` ≤ 100; above it: 400).",
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "A page of orders", "headers": PRIVATE_HEADER_DOC},
    },
)
async def list_my_orders_v2(
    service: Service, principal: OwnReader, limit: Limit = DEFAULT_PAGE_SIZE, cursor: CursorQuery = None
) -> Response:
    items, more = await service.list_for_customer(
        _customer_id(principal), limit=limit, after_id=_after(cursor)
    )
    # The same cursor as v1: a page boundary is an order id, whatever the representation.
    next_cursor = (
        Cursor(sort=CURSOR_SORT, value=None, id=str(items[-1].id)).encode() if more and items else None
    )
    return _json({"items": [summary_v2_dict(o) for o in items], "next_cursor": next_cursor})


@router.get(
    "/{order_id}",
    response_model=OrderV2Out,
    summary="Get an order (v2)",
    description="The caller's own order; with `orders:read_all`, any order. Another customer's order is 404.",
    responses={**problem_responses(401, 403, 404), **ORDER_ETAG_RESPONSES},
)
async def get_order_v2(
    order_id: OrderIdPath, service: Service, principal: AnyReader, if_none_match: IfNoneMatch = None
) -> Response:
    order, checkout = await visible_order(order_id, service, principal)
    return conditional_json(order_v2_dict(order, checkout), if_none_match)
