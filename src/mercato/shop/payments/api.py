"""Payments HTTP routes: an order's payment ledger and its event history (its customer, or staff)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, Protocol, cast

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.ids import parse_id
from mercato.kit.web import authenticated, problem_responses
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.kit.web.security import InsufficientScope
from mercato.shop.payments.model import PaymentLedgerNotFound
from mercato.shop.payments.service import LedgerView, PaymentsService

__all__ = ["router"]

router = APIRouter(prefix="/v1/payments", tags=["payments"], route_class=PrivateRoute)


class LedgerEventOut(BaseModel):
    version: int = Field(description="1 for the ledger's first event; gapless")
    type: str = Field(description="payment_authorized | payment_captured | payment_voided | payment_refunded")
    data: dict[str, Any]
    recorded_at: datetime
    message_id: str | None = Field(default=None, description="The integration event that caused it")


class PaymentLedgerOut(BaseModel):
    order_id: str
    status: str = Field(
        description="pending | authorized | captured | voided | partially_refunded | refunded"
    )
    currency: str | None
    authorization_id: str | None
    authorized_minor: int
    captured_minor: int
    refunded_minor: int
    refundable_minor: int
    voided: bool
    capture_ids: list[str]
    version: int
    events: list[LedgerEventOut]


def payments_service(request: Request) -> PaymentsService:
    return cast(PaymentsService, request.app.state.payments)


class OrderVisibility(Protocol):
    """The orders context, as this route asks it "may this caller see that order?" (OrdersService):
    it raises its not-found error for an order the caller does not own, so both answers are 404."""

    async def get(self, order_id: uuid.UUID, *, customer_id: uuid.UUID | None, read_all: bool) -> object: ...


async def ledger_reader(principal: Annotated[Principal, Depends(authenticated)]) -> Principal:
    """`orders:read` (ledgers of one's own orders) or `orders:read_all` (any order's)."""
    if not (principal.has_scopes("orders:read") or principal.has_scopes("orders:read_all")):
        raise InsufficientScope("requires scope orders:read or orders:read_all")
    return principal


Service = Annotated[PaymentsService, Depends(payments_service)]
Reader = Annotated[Principal, Depends(ledger_reader)]
OrderIdPath = Annotated[str, Path(min_length=1, max_length=64)]


@router.get(
    "/{order_id}",
    response_model=PaymentLedgerOut,
    summary="Get an order's payment ledger",
    description=(
        "The ledger's current state and every event that built it: the order's customer "
        "(`orders:read`) or staff (`orders:read_all`). Another customer's order is 404, like one "
        "that does not exist."
    ),
    responses={
        **problem_responses(401, 403, 404),
        200: {"description": "The ledger", "headers": PRIVATE_HEADER_DOC},
    },
)
async def get_payment_ledger(
    order_id: OrderIdPath, service: Service, principal: Reader, request: Request
) -> PaymentLedgerOut:
    if not principal.has_scopes("orders:read_all"):
        parsed = parse_id(order_id)
        try:
            customer = uuid.UUID(principal.subject)
        except ValueError:
            customer = None
        if parsed is None or customer is None:
            raise PaymentLedgerNotFound(f"no payment recorded for order {order_id}")
        orders = cast(OrderVisibility, request.app.state.orders)
        await orders.get(parsed, customer_id=customer, read_all=False)  # not the caller's: 404
    return ledger_out(await service.ledger(order_id))


def ledger_out(view: LedgerView) -> PaymentLedgerOut:
    ledger = view.ledger
    return PaymentLedgerOut(
        order_id=ledger.order_id,
        status=ledger.status.value,
        currency=ledger.currency,
        authorization_id=ledger.authorization_id,
        authorized_minor=ledger.authorized_minor,
        captured_minor=ledger.captured_minor,
        refunded_minor=ledger.refunded_minor,
        refundable_minor=ledger.refundable_minor,
        voided=ledger.voided,
        capture_ids=list(ledger.capture_ids),
        version=ledger.version,
        events=[
            LedgerEventOut(
                version=event.version,
                type=event.type,
                data=event.data,
                recorded_at=event.recorded_at,
                message_id=event.metadata.get("message_id"),
            )
            for event in view.history
        ],
    )
