"""What to send for an order event. Pure: no I/O.

The e-mail recipient is a customer reference (`customer:<id>`), not an address: the sender
resolves it at delivery time, so no e-mail address (PII) is copied into this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson

ORDER_COMPLETED = "mercato.orders.order_completed"
ORDER_CANCELLED = "mercato.orders.order_cancelled"
WEBHOOK_RECIPIENT = "webhook:orders"


class Channel(StrEnum):
    EMAIL = "email"
    WEBHOOK = "webhook"


@dataclass(frozen=True, slots=True)
class Draft:
    channel: Channel
    recipient: str
    subject: str
    body: str


def _money(minor: int, currency: str) -> str:
    return f"{minor / 100:.2f} {currency}"


def drafts_for(event_type: str, event_id: str, data: dict[str, Any]) -> list[Draft]:
    """The notifications an event asks for: none for events this context ignores."""
    if event_type not in (ORDER_COMPLETED, ORDER_CANCELLED):
        return []
    order_id = str(data["order_id"])
    total = _money(int(data["total_minor"]), str(data["currency"]))
    if event_type == ORDER_COMPLETED:
        subject = f"Your order {order_id} is on its way"
        text = f"Thank you for your order {order_id}. We charged {total} and handed it to the carrier."
    else:
        subject = f"Your order {order_id} was cancelled"
        text = f"We could not complete your order {order_id}. Nothing was charged for {total}."
    webhook = orjson.dumps({"event_id": event_id, "type": event_type, "data": data}).decode()
    return [
        Draft(Channel.EMAIL, f"customer:{data['customer_id']}", subject, text),
        Draft(Channel.WEBHOOK, WEBHOOK_RECIPIENT, event_type, webhook),
    ]
