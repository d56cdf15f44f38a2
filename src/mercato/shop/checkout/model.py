"""Checkout's vocabulary: the order saga's name, its steps, and what payment/shipping answer.

Pure: no I/O. The saga itself (service.py) wires these to the other contexts and providers.
"""

from __future__ import annotations

from collections.abc import Iterable
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


class FailureReason(StrEnum):
    """Why a checkout failed, as its customer is told: stable public codes, never internal detail
    (exception names, provider messages stay on staff routes and in logs)."""

    OUT_OF_STOCK = "out_of_stock"
    PAYMENT_DECLINED = "payment_declined"
    PAYMENT_UNAVAILABLE = "payment_unavailable"
    SHIPPING_UNAVAILABLE = "shipping_unavailable"
    TIMED_OUT = "timed_out"
    CHECKOUT_FAILED = "checkout_failed"


_REJECTED = {
    OrderStep.RESERVE_INVENTORY.value: FailureReason.OUT_OF_STOCK,
    OrderStep.AUTHORIZE_PAYMENT.value: FailureReason.PAYMENT_DECLINED,
    OrderStep.CAPTURE_PAYMENT.value: FailureReason.PAYMENT_DECLINED,
    OrderStep.CREATE_SHIPMENT.value: FailureReason.SHIPPING_UNAVAILABLE,
}
_GAVE_UP = {
    OrderStep.AUTHORIZE_PAYMENT.value: FailureReason.PAYMENT_UNAVAILABLE,
    OrderStep.CAPTURE_PAYMENT.value: FailureReason.PAYMENT_UNAVAILABLE,
    OrderStep.CREATE_SHIPMENT.value: FailureReason.SHIPPING_UNAVAILABLE,
}


def failure_reason(failure: str | None, forward_outcomes: Iterable[tuple[str, str]]) -> FailureReason | None:
    """The public reason of a failed checkout, from the saga's structured step history.

    `forward_outcomes` are (step, outcome) of the forward attempts, oldest first; the last one that
    did not succeed is what stopped the order: `rejected` is a definite no (out of stock, declined),
    `timed_out` a provider too slow, `failed` a provider that kept failing. A saga stopped by its
    deadline timed out. None while nothing failed.
    """
    if failure is None:
        return None
    if failure.startswith("saga deadline"):
        return FailureReason.TIMED_OUT
    stopped = [(step, outcome) for step, outcome in forward_outcomes if outcome != "succeeded"]
    if not stopped:
        return FailureReason.CHECKOUT_FAILED
    step, outcome = stopped[-1]
    if outcome == "rejected":
        return _REJECTED.get(step, FailureReason.CHECKOUT_FAILED)
    if outcome == "timed_out":
        return FailureReason.TIMED_OUT
    return _GAVE_UP.get(step, FailureReason.CHECKOUT_FAILED)
