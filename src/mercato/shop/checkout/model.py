"""Checkout's vocabulary: the order saga's name, its steps, and what payment/shipping answer.

Pure: no I/O. The saga itself (service.py) wires these to the other contexts and providers.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

ORDER_SAGA = "order_checkout"


class OrderStep(StrEnum):
    """The guide's order saga, in order. CreateOrder happens in the checkout request itself."""

    CREATE_ORDER = "create_order"
    RESERVE_INVENTORY = "reserve_inventory"
    AUTHORIZE_PAYMENT = "authorize_payment"
    CREATE_SHIPMENT = "create_shipment"
    CAPTURE_PAYMENT = "capture_payment"
    MARK_COMPLETE = "mark_complete"


@dataclass(frozen=True, slots=True)
class Authorization:
    authorization_id: str
    approved: bool
    decline_reason: str = ""


@dataclass(frozen=True, slots=True)
class PaymentRecord:
    """What the provider holds for an order: an authorization, and its capture if any."""

    authorization_id: str
    status: str  # authorized | declined | captured | voided
    capture_id: str | None = None


@dataclass(frozen=True, slots=True)
class Capture:
    capture_id: str


@dataclass(frozen=True, slots=True)
class Shipment:
    shipment_id: str


class PaymentDeclined(Exception):
    """The provider said no: a definite outcome, nothing to undo."""


class ProviderConflict(Exception):
    """The provider refused a state change (e.g. void after capture): the state is already final."""


class ProviderRejected(Exception):
    """The provider refused the request for good (a 4xx other than a conflict): retrying is futile."""
