"""`GET /admin/notifications`: what the notifications context recorded, per order if asked."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.clock import Clock
from mercato.kit.ids import UUID_PATTERN, parse_id
from mercato.kit.storage import Database
from mercato.kit.web import Cursor, CursorError, InvalidCursor, Page, problem_responses, require_scopes
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.notifications.service import Notification, NotificationsService

__all__ = ["admin_router"]

CURSOR_SORT = "-id"

admin_router = APIRouter(
    prefix="/admin/notifications", tags=["notifications", "admin"], route_class=PrivateRoute
)


class NotificationOut(BaseModel):
    id: str
    event_id: str
    event_type: str
    channel: str = Field(description="email | webhook")
    order_id: str
    recipient: str = Field(description="`customer:<id>` for e-mail (resolved when sent), or a webhook name.")
    subject: str
    body: str
    status: str = Field(description="pending | sent | failed")
    created_at: datetime
    attempts: int = Field(description="Delivery attempts so far.")
    last_error: str | None = Field(description="Why the last attempt failed (null after a success).")
    sent_at: datetime | None = Field(description="When the provider accepted it.")


def notifications_service(request: Request) -> NotificationsService:
    return NotificationsService(cast(Database, request.app.state.db), cast(Clock, request.app.state.clock))


Service = Annotated[NotificationsService, Depends(notifications_service)]
AllReader = Annotated[Principal, Depends(require_scopes("orders:read_all"))]


def _invalid(field: str, message: str) -> RequestValidationError:
    return RequestValidationError([{"loc": ("query", field), "msg": message, "type": "value_error"}])


def _out(n: Notification) -> dict[str, Any]:
    return {
        "id": str(n.id),
        "event_id": str(n.event_id),
        "event_type": n.event_type,
        "channel": n.channel,
        "order_id": str(n.order_id),
        "recipient": n.recipient,
        "subject": n.subject,
        "body": n.body,
        "status": n.status,
        "created_at": n.created_at.isoformat().replace("+00:00", "Z"),
        "attempts": n.attempts,
        "last_error": n.last_error,
        "sent_at": n.sent_at.isoformat().replace("+00:00", "Z") if n.sent_at else None,
    }


@admin_router.get(
    "",
    response_model=Page[NotificationOut],
    summary="List notifications",
    description="Notification records, newest first, keyset-paginated; `order_id` narrows to one order.",
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "A page of notifications", "headers": PRIVATE_HEADER_DOC},
    },
)
async def list_notifications(
    service: Service,
    _reader: AllReader,
    order_id: Annotated[
        str | None, Query(max_length=64, pattern=UUID_PATTERN, description="Only this order's.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="Page size.")] = DEFAULT_PAGE_SIZE,
    cursor: Annotated[
        str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$", description="`next_cursor`.")
    ] = None,
) -> Response:
    order: uuid.UUID | None = None
    if order_id is not None:
        order = parse_id(order_id)
        if order is None:
            raise _invalid("order_id", "not an order id")
    after: uuid.UUID | None = None
    if cursor is not None:
        try:
            after = parse_id(Cursor.decode(cursor, expected_sort=CURSOR_SORT).id)
        except CursorError as exc:
            raise InvalidCursor(str(exc)) from exc
        if after is None:
            raise InvalidCursor("malformed cursor")
    items, more = await service.list(order_id=order, limit=limit, after_id=after)
    next_cursor = (
        Cursor(sort=CURSOR_SORT, value=None, id=str(items[-1].id)).encode() if more and items else None
    )
    return Response(
        orjson.dumps({"items": [_out(n) for n in items], "next_cursor": next_cursor}),
        media_type="application/json",
    )
