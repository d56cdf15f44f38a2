"""Payments HTTP routes: an order's payment ledger and its event history (operators)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Path, Request
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
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


Service = Annotated[PaymentsService, Depends(payments_service)]
Operator = Annotated[Principal, Depends(require_scopes("orders:read_all"))]
OrderIdPath = Annotated[str, Path(min_length=1, max_length=64)]


@router.get(
    "/{order_id}",
    response_model=PaymentLedgerOut,
    summary="Get an order's payment ledger",
    description="The ledger's current state and every event that built it. Needs `orders:read_all`.",
    responses={
        **problem_responses(401, 403, 404),
        200: {"description": "The ledger", "headers": PRIVATE_HEADER_DOC},
    },
)
async def get_payment_ledger(
    order_id: OrderIdPath, service: Service, _operator: Operator
) -> PaymentLedgerOut:
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
