"""A failed checkout's public reason comes from the saga's structured history, never its error text."""

from __future__ import annotations

import pytest

from mercato.shop.checkout.model import FailureReason, failure_reason


@pytest.mark.parametrize(
    ("history", "expected"),
    [
        ([("reserve_inventory", "rejected")], FailureReason.OUT_OF_STOCK),
        (
            [("reserve_inventory", "succeeded"), ("authorize_payment", "rejected")],
            FailureReason.PAYMENT_DECLINED,
        ),
        ([("authorize_payment", "failed")] * 3, FailureReason.PAYMENT_UNAVAILABLE),
        (
            [("authorize_payment", "succeeded"), ("create_shipment", "failed")],
            FailureReason.SHIPPING_UNAVAILABLE,
        ),
        ([("create_shipment", "rejected")], FailureReason.SHIPPING_UNAVAILABLE),
        ([("capture_payment", "failed"), ("capture_payment", "timed_out")], FailureReason.TIMED_OUT),
        ([("mark_complete", "failed")], FailureReason.CHECKOUT_FAILED),
        ([], FailureReason.CHECKOUT_FAILED),
    ],
)
def test_reason_from_the_step_that_stopped_the_order(
    history: list[tuple[str, str]], expected: FailureReason
) -> None:
    assert (
        failure_reason("authorize_payment: StepRejected: payment declined: insufficient_funds", history)
        is expected
    )


def test_no_failure_no_reason_and_the_deadline_is_a_timeout() -> None:
    assert failure_reason(None, [("reserve_inventory", "succeeded")]) is None
    assert (
        failure_reason("saga deadline exceeded", [("authorize_payment", "failed")]) is FailureReason.TIMED_OUT
    )
