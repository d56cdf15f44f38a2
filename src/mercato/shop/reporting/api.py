"""Reporting routes: projection-backed order lists and the sales-by-day report.

Why `/v1/order-summaries` beside `/v1/orders` instead of switching `/v1/orders` to the read
model: `/v1/orders` promises read-your-writes (its `version` and `created_at` come from the write
model, so an order is listed the moment `POST /v1/checkout` answers). The summaries are the CQRS read side:
denormalized (items and payment state in one row, no join), eventually consistent (a just-placed
order appears once the projector has applied its `order_placed`, typically well under a second in
embedded mode).
"""

from __future__ import annotations

import uuid
from datetime import date, datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.errors import Forbidden, RuleViolated
from mercato.kit.ids import parse_id
from mercato.kit.storage import Database
from mercato.kit.web import Cursor, CursorError, InvalidCursor, Page, problem_responses, require_scopes
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.reporting.model import Summary
from mercato.shop.reporting.service import ReportingService

__all__ = ["admin_router", "router"]

CURSOR_SORT = "-order_id"
MAX_REPORT_DAYS = 366

router = APIRouter(prefix="/v1/order-summaries", tags=["reporting"], route_class=PrivateRoute)
admin_router = APIRouter(prefix="/admin", tags=["reporting", "admin"], route_class=PrivateRoute)


class SummariesNeedCustomer(Forbidden):
    slug = "order-summaries-customer-required"
    title = "Customer account required"
    description = "Own order summaries belong to a customer account; the token's subject is not one."


class SummaryItemOut(BaseModel):
    sku: str
    product_id: str
    quantity: int
    unit_price_minor: int


class OrderSummaryOut(BaseModel):
    order_id: str
    customer_id: str
    status: str = Field(description="pending | completed | cancelled")
    currency: str | None = Field(description="Null only until the order's own event is applied.")
    total_minor: int | None
    item_count: int
    items: list[SummaryItemOut]
    payment_state: str = Field(description="none | authorized | captured | voided | refunded")
    placed_at: datetime | None
    updated_at: datetime


class DaySalesOut(BaseModel):
    day: date
    currency: str
    orders: int = Field(description="Orders completed that UTC day.")
    revenue_minor: int


class SalesByDayOut(BaseModel):
    items: list[DaySalesOut] = Field(default_factory=list)


def reporting_service(request: Request) -> ReportingService:
    return ReportingService(cast(Database, request.app.state.db))


Service = Annotated[ReportingService, Depends(reporting_service)]
OwnReader = Annotated[Principal, Depends(require_scopes("orders:read"))]
AllReader = Annotated[Principal, Depends(require_scopes("orders:read_all"))]
Limit = Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description=f"Page size, at most {MAX_PAGE_SIZE}.")]
CursorQuery = Annotated[
    str | None,
    Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description="`next_cursor` of the previous page."),
]
_LIST_RESPONSES: dict[int | str, dict[str, Any]] = {
    **problem_responses(400, 401, 403),
    200: {"description": "A page of order summaries", "headers": PRIVATE_HEADER_DOC},
}


def _ts(moment: datetime | None) -> str | None:
    return moment.isoformat().replace("+00:00", "Z") if moment is not None else None


def _summary(s: Summary) -> dict[str, Any]:
    return {
        "order_id": s.order_id,
        "customer_id": s.customer_id,
        "status": s.status,
        "currency": s.currency,
        "total_minor": s.total_minor,
        "item_count": s.item_count,
        "items": list(s.items),
        "payment_state": s.payment_state.value,
        "placed_at": _ts(s.placed_at),
        "updated_at": _ts(s.updated_at),
    }


def _json(content: Any) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")


class InvalidReportRange(RuleViolated):
    """Both days are well-formed dates; their order or span breaks the report's rule (422, ADR 0028)."""

    slug = "invalid-report-range"
    title = "Invalid report range"
    description = "`to` must not be before `from`, and the range may span at most 366 days."


def _after(cursor: str | None) -> uuid.UUID | None:
    if cursor is None:
        return None
    try:
        after = parse_id(Cursor.decode(cursor, expected_sort=CURSOR_SORT).id)
    except CursorError as exc:
        raise InvalidCursor(str(exc)) from exc
    if after is None:
        raise InvalidCursor("malformed cursor")
    return after


def _page(items: list[Summary], more: bool) -> Response:
    next_cursor = (
        Cursor(sort=CURSOR_SORT, value=None, id=items[-1].order_id).encode() if more and items else None
    )
    return _json({"items": [_summary(s) for s in items], "next_cursor": next_cursor})


@router.get(
    "",
    response_model=Page[OrderSummaryOut],
    summary="List my order summaries (read model)",
    description=(
        "The caller's orders from the `order_summary` read model: items and payment state in one "
        "row, newest first, keyset-paginated. Eventually consistent: an order placed a moment ago "
        "appears once the projector has applied its event."
    ),
    responses=_LIST_RESPONSES,
)
async def list_my_summaries(
    service: Service, principal: OwnReader, limit: Limit = DEFAULT_PAGE_SIZE, cursor: CursorQuery = None
) -> Response:
    try:
        customer = uuid.UUID(principal.subject)
    except ValueError as exc:
        raise SummariesNeedCustomer("the caller is not a customer account") from exc
    items, more = await service.summaries(customer_id=customer, limit=limit, after_id=_after(cursor))
    return _page(items, more)


@admin_router.get(
    "/order-summaries",
    response_model=Page[OrderSummaryOut],
    summary="List all order summaries (read model)",
    description="Every order from the `order_summary` read model, newest first. Needs `orders:read_all`.",
    responses=_LIST_RESPONSES,
)
async def list_all_summaries(
    service: Service, _reader: AllReader, limit: Limit = DEFAULT_PAGE_SIZE, cursor: CursorQuery = None
) -> Response:
    items, more = await service.summaries(customer_id=None, limit=limit, after_id=_after(cursor))
    return _page(items, more)


@admin_router.get(
    "/reports/sales-by-day",
    response_model=SalesByDayOut,
    summary="Sales by day",
    description=(
        "Completed orders and revenue per UTC day and currency, `from` to `to` inclusive "
        f"(at most {MAX_REPORT_DAYS} days). Needs `orders:read_all`."
    ),
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "One row per day and currency with sales", "headers": PRIVATE_HEADER_DOC},
    },
)
async def sales_by_day(
    service: Service,
    _reader: AllReader,
    start: Annotated[date, Query(alias="from", description="First UTC day (YYYY-MM-DD).")],
    end: Annotated[date, Query(alias="to", description="Last UTC day (YYYY-MM-DD), inclusive.")],
) -> Response:
    if end < start:
        raise InvalidReportRange("`to` is before `from`", field="query.to")
    if (end - start).days >= MAX_REPORT_DAYS:
        raise InvalidReportRange(f"the range spans more than {MAX_REPORT_DAYS} days", field="query.to")
    rows = await service.sales_by_day(start=start, end=end)
    return _json(
        {
            "items": [
                {
                    "day": r.day.isoformat(),
                    "currency": r.currency,
                    "orders": r.orders,
                    "revenue_minor": r.revenue_minor,
                }
                for r in rows
            ]
        }
    )
