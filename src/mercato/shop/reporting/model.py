"""How events fold into an order summary. Pure: no I/O.

Events of one order arrive in order within a topic, but `mercato.orders` and `mercato.payments`
are separate logs, so a payment event may be applied before the `order_placed` it follows. The
fold is therefore order-insensitive across topics: status and payment state only move up a rank
(a later-ranked state never goes back), known fields are filled by whichever event carries them
first, and `updated_at` is the latest event time. The same events in any interleaving give the
same row, which is what lets a rebuild equal the live projection.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum
from typing import Any

ORDER_PLACED = "mercato.orders.order_placed"
ORDER_COMPLETED = "mercato.orders.order_completed"
ORDER_CANCELLED = "mercato.orders.order_cancelled"
PAYMENT_EVENTS = {
    "mercato.payments.payment_authorized": "authorized",
    "mercato.payments.payment_captured": "captured",
    "mercato.payments.payment_voided": "voided",
    "mercato.payments.payment_refunded": "refunded",
}


class PaymentState(StrEnum):
    NONE = "none"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    VOIDED = "voided"
    REFUNDED = "refunded"


# Voided follows authorized and refunded follows captured; an order never has both.
_PAYMENT_RANK = {
    PaymentState.NONE: 0,
    PaymentState.AUTHORIZED: 1,
    PaymentState.CAPTURED: 2,
    PaymentState.VOIDED: 3,
    PaymentState.REFUNDED: 3,
}
_STATUS_RANK = {"pending": 0, "completed": 1, "cancelled": 1}


@dataclass(frozen=True, slots=True)
class Summary:
    order_id: str
    customer_id: str | None = None
    status: str = "pending"
    currency: str | None = None
    total_minor: int | None = None
    item_count: int = 0
    items: tuple[dict[str, Any], ...] = ()
    payment_state: PaymentState = PaymentState.NONE
    placed_at: datetime | None = None
    updated_at: datetime | None = None


def relevant(event_type: str) -> bool:
    return event_type in (ORDER_PLACED, ORDER_COMPLETED, ORDER_CANCELLED) or event_type in PAYMENT_EVENTS


def fold(current: Summary | None, event_type: str, data: dict[str, Any], at: datetime) -> Summary:
    """The summary after one event (`relevant(event_type)` must hold)."""
    row = current or Summary(order_id=str(data["order_id"]))
    updated_at = at if row.updated_at is None else max(row.updated_at, at)
    row = replace(row, updated_at=updated_at)
    if event_type in PAYMENT_EVENTS:
        state = PaymentState(PAYMENT_EVENTS[event_type])
        if _PAYMENT_RANK[state] > _PAYMENT_RANK[row.payment_state]:
            row = replace(row, payment_state=state)
        return row
    row = replace(
        row,
        customer_id=row.customer_id or str(data["customer_id"]),
        currency=row.currency or str(data["currency"]),
        total_minor=row.total_minor if row.total_minor is not None else int(data["total_minor"]),
    )
    if event_type == ORDER_PLACED:
        items: tuple[dict[str, Any], ...] = tuple(
            {
                "sku": str(i["sku"]),
                "product_id": str(i["product_id"]),
                "quantity": int(i["quantity"]),
                "unit_price_minor": int(i["unit_price_minor"]),
            }
            for i in data.get("items", [])
        )
        return replace(row, items=items, item_count=sum(i["quantity"] for i in items), placed_at=at)
    status = "completed" if event_type == ORDER_COMPLETED else "cancelled"
    if _STATUS_RANK[status] > _STATUS_RANK[row.status]:
        row = replace(row, status=status)
    return row
