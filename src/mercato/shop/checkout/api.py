"""POST /v1/checkout: place the cart as an order and let the order saga finish it."""

from __future__ import annotations

import uuid
from typing import Annotated, cast

import orjson
from fastapi import APIRouter, Depends, Header, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from mercato.kit.auth import Principal
from mercato.kit.errors import Forbidden
from mercato.kit.idempotency.fingerprint import IDEMPOTENCY_KEY_PATTERN
from mercato.kit.observability import current_request_id
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.checkout.service import CheckoutService

router = APIRouter(prefix="/v1/checkout", tags=["checkout"], route_class=PrivateRoute)


class CheckoutNeedsCustomer(Forbidden):
    slug = "checkout-customer-required"
    title = "Customer account required"
    description = "Checkout places an order for a customer account; the token's subject is not one."


class CheckoutIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    card_token: str | None = Field(
        default=None,
        min_length=1,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="The payment method token from the PSP (test tokens: `tok_decline`).",
    )


class CheckoutAccepted(BaseModel):
    order_id: str
    status: str = Field(description="Always `pending` here; poll the order for its outcome.")
    total_minor: int
    currency: str


async def checkout_service(request: Request) -> CheckoutService:
    return cast(CheckoutService, request.app.state.checkout)


Service = Annotated[CheckoutService, Depends(checkout_service)]
# Named for the edge's answer to the same request (gateway/fast_writes.py): one dependency, one check.
ORDERS_WRITE = require_scopes("orders:write")
Buyer = Annotated[Principal, Depends(ORDERS_WRITE)]
CHECKOUT_ROUTE = "/v1/checkout"
IDEMPOTENCY_KEY_MAX_LENGTH = 255


@router.post(
    "",
    status_code=202,
    response_model=CheckoutAccepted,
    summary="Check out the cart",
    description=(
        "Creates a pending order from the caller's cart and starts the order saga (reserve stock, "
        "authorize payment, ship, capture). Answers 202 at once; poll `Location` for the outcome. "
        "Requires an `Idempotency-Key`: a retry with the same key and body replays this answer "
        "(`Idempotent-Replayed: true`) and never creates a second order."
    ),
    responses={
        **problem_responses(400, 401, 403, 409, 422),
        202: {
            "description": "Order placed; the saga is running",
            "headers": {
                **PRIVATE_HEADER_DOC,
                "Location": {"schema": {"type": "string"}, "description": "The order to poll"},
            },
        },
    },
)
async def checkout(
    service: Service,
    principal: Buyer,
    idempotency_key: Annotated[
        str,
        Header(
            alias="Idempotency-Key",
            min_length=1,
            max_length=IDEMPOTENCY_KEY_MAX_LENGTH,
            pattern=IDEMPOTENCY_KEY_PATTERN,
            description="Unique per checkout attempt; reuse it to retry safely.",
        ),
    ],
    body: CheckoutIn | None = None,
) -> Response:
    return await checkout_answer(service, principal, body.card_token if body else None)


async def checkout_answer(service: CheckoutService, principal: Principal, card_token: str | None) -> Response:
    """The route's work once its parameters are valid; the edge's answer to the same request calls it
    too (gateway/fast_writes.py)."""
    try:
        customer_id = uuid.UUID(principal.subject)
    except ValueError as exc:
        raise CheckoutNeedsCustomer("the caller is not a customer account") from exc
    order = await service.start(
        customer_id,
        correlation_id=current_request_id() or str(uuid.uuid4()),
        card_token=card_token,
    )
    accepted = {
        "order_id": str(order.id),
        "status": order.status,
        "total_minor": order.total_minor,
        "currency": order.currency,
    }
    return Response(
        orjson.dumps(accepted),
        status_code=202,
        media_type="application/json",
        headers={"Location": f"/v1/orders/{order.id}"},
    )
