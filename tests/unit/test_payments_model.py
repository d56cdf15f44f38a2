"""The payment ledger's rules and state machine, without a database; replay equals snapshot."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.shop.payments.model import (
    AUTHORIZED,
    CAPTURED,
    REFUNDED,
    VOIDED,
    LedgerRuleBroken,
    LedgerStatus,
    PaymentLedger,
)


def authorized(amount: int = 1_000) -> PaymentLedger:
    ledger = PaymentLedger("order-1")
    ledger.authorize(authorization_id="auth-1", amount_minor=amount, currency="EUR")
    return ledger


def test_the_happy_path_moves_through_every_status() -> None:
    ledger = PaymentLedger("order-1")
    assert ledger.status is LedgerStatus.PENDING
    ledger.authorize(authorization_id="auth-1", amount_minor=1_000, currency="EUR")
    assert ledger.status is LedgerStatus.AUTHORIZED
    ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=1_000, currency="EUR")
    assert ledger.status is LedgerStatus.CAPTURED
    ledger.refund(capture_id="cap-1", amount_minor=400, currency="EUR")
    assert (ledger.status, ledger.refundable_minor) == (LedgerStatus.PARTIALLY_REFUNDED, 600)
    ledger.refund(capture_id="cap-1", amount_minor=600, currency="EUR")
    assert (ledger.status, ledger.refundable_minor) == (LedgerStatus.REFUNDED, 0)
    assert [event_type for event_type, _ in ledger.pending] == [AUTHORIZED, CAPTURED, REFUNDED, REFUNDED]
    assert (ledger.version, ledger.saved_version) == (4, 0)


def test_no_capture_above_the_authorization() -> None:
    ledger = authorized(1_000)
    ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=700, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="exceeds the 300 still authorized"):
        ledger.capture(authorization_id="auth-1", capture_id="cap-2", amount_minor=301, currency="EUR")
    ledger.capture(authorization_id="auth-1", capture_id="cap-2", amount_minor=300, currency="EUR")
    assert ledger.captured_minor == 1_000


def test_no_refund_above_the_capture() -> None:
    ledger = authorized(1_000)
    ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=500, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="exceeds the 500 refundable"):
        ledger.refund(capture_id="cap-1", amount_minor=501, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="unknown capture"):
        ledger.refund(capture_id="cap-9", amount_minor=1, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="no authorization"):
        PaymentLedger("order-2").capture(authorization_id="a", capture_id="c", amount_minor=1, currency="EUR")


def test_no_capture_after_void_and_no_void_after_capture() -> None:
    ledger = authorized()
    ledger.void(authorization_id="auth-1")
    assert ledger.status is LedgerStatus.VOIDED
    with pytest.raises(LedgerRuleBroken, match="voided"):
        ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=1, currency="EUR")
    captured = authorized()
    captured.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=10, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="cannot be voided"):
        captured.void(authorization_id="auth-1")


def test_a_void_may_be_the_first_word_about_an_authorization() -> None:
    # The checkout voids what the provider holds when the authorize answer was lost.
    ledger = PaymentLedger("order-1")
    ledger.void(authorization_id="auth-lost")
    assert (ledger.status, ledger.authorization_id, ledger.pending) == (
        LedgerStatus.VOIDED,
        "auth-lost",
        [(VOIDED, {"authorization_id": "auth-lost"})],
    )


def test_repeated_facts_record_nothing_and_other_clashes_are_refused() -> None:
    ledger = authorized()
    ledger.authorize(authorization_id="auth-1", amount_minor=1_000, currency="EUR")
    ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=100, currency="EUR")
    ledger.capture(authorization_id="auth-1", capture_id="cap-1", amount_minor=100, currency="EUR")
    assert (ledger.version, ledger.captured_minor) == (2, 100)
    with pytest.raises(LedgerRuleBroken, match="already authorized"):
        ledger.authorize(authorization_id="auth-2", amount_minor=5, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="not USD"):
        ledger.capture(authorization_id="auth-1", capture_id="cap-2", amount_minor=1, currency="USD")
    with pytest.raises(LedgerRuleBroken, match="unknown authorization"):
        ledger.capture(authorization_id="auth-2", capture_id="cap-2", amount_minor=1, currency="EUR")
    with pytest.raises(LedgerRuleBroken, match="positive"):
        ledger.capture(authorization_id="auth-1", capture_id="cap-2", amount_minor=0, currency="EUR")
    with pytest.raises(ValueError, match="unknown payment ledger event"):
        ledger.apply("payment_disputed", {})


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["authorize", "capture", "void", "refund"]),
            st.integers(min_value=-5, max_value=2_000),
            st.integers(min_value=0, max_value=3),
        ),
        max_size=40,
    )
)
def test_any_command_sequence_keeps_the_invariants_and_replays_to_the_same_state(
    commands: list[tuple[str, int, int]],
) -> None:
    ledger = PaymentLedger("order-1")
    for name, amount, pick in commands:
        try:
            if name == "authorize":
                ledger.authorize(authorization_id=f"a{pick % 2}", amount_minor=amount, currency="EUR")
            elif name == "capture":
                ledger.capture(
                    authorization_id="a0", capture_id=f"c{pick}", amount_minor=amount, currency="EUR"
                )
            elif name == "void":
                ledger.void(authorization_id=f"a{pick % 2}")
            else:
                ledger.refund(capture_id=f"c{pick}", amount_minor=amount, currency="EUR")
        except LedgerRuleBroken:
            pass
        assert 0 <= ledger.refunded_minor <= ledger.captured_minor <= ledger.authorized_minor
        assert not (ledger.voided and ledger.captured_minor)
    replayed = PaymentLedger("order-1")
    for event_type, data in ledger.pending:
        replayed.replay(event_type, data)
    restored = PaymentLedger.from_snapshot("order-1", version=ledger.version, state=ledger.snapshot())
    assert replayed.snapshot() == restored.snapshot() == ledger.snapshot()
    assert replayed.version == restored.version == ledger.version
    assert replayed.status == restored.status == ledger.status
