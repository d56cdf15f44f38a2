"""`GET /v1/orders/{id}/events`: the order's status changes and checkout steps as Server-Sent Events."""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, Header, Request, Response

from mercato.kit.auth import Principal
from mercato.kit.realtime import Hub, channel_event_response, parse_last_event_id
from mercato.kit.web import problem_responses
from mercato.kit.web.private import PrivateRoute
from mercato.shop.orders.api import OrderIdPath, Service, order_reader, visible_order
from mercato.shop.orders.live import order_channel

router = APIRouter(prefix="/v1/orders", tags=["orders"], route_class=PrivateRoute)


@router.get(
    "/{order_id}/events",
    summary="Follow an order live (SSE)",
    description=(
        "`text/event-stream`: one `status` event per status change and one `step` event per checkout "
        "step, `id:` a per-order sequence. Reconnect with `Last-Event-ID` to resume with no gap and no "
        "duplicate. A comment line every 15 s keeps the stream open; it ends after a terminal status "
        "(completed, cancelled). 204 when the client already has the terminal event. Owner or staff only."
    ),
    responses={200: {"content": {"text/event-stream": {}}}, **problem_responses(401, 403, 404)},
    response_model=None,
)
async def order_events(
    order_id: OrderIdPath,
    request: Request,
    service: Service,
    principal: Annotated[Principal, Depends(order_reader)],
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID", max_length=20)] = None,
) -> Response:
    order, _checkout = await visible_order(order_id, service, principal)
    hub = cast(Hub, request.app.state.hub)
    channel = order_channel(order.id)
    since = parse_last_event_id(last_event_id) or 0
    head = await hub.history.head(channel)
    if head and since >= head:
        [last] = await hub.history.after(channel, head - 1, limit=1)
        if last.data.get("terminal"):
            return Response(status_code=204)
    settings = request.app.state.container.settings.realtime
    return channel_event_response(
        hub,
        user=principal.subject,
        channel=channel,
        since=since,
        is_last=lambda body: bool(body.get("terminal")),
        heartbeat_s=settings.sse_heartbeat_s,
    )
