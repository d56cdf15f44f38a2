"""The payment ledger of one order, event-sourced: what was authorized, captured, voided, refunded.

Pure: stdlib and the kit's pure `Aggregate` base. Each command checks the ledger's rules against the
current state, then records one event; `apply` folds events into state without checks (an event is
a fact that already happened). A command repeating a fact the ledger already holds (the same
authorization or capture id) records nothing, so a provider's retried answer is harmless.

State machine: pending -> authorized -> captured | voided; captured -> partially_refunded ->
refunded. Rules: one authorization per order; captures never exceed the authorization and never
follow a void; refunds never exceed what was captured and not yet refunded; one currency per ledger.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

from mercato.kit.errors import NotFound, RuleViolated
from mercato.kit.eventstore.aggregate import Aggregate

__all__ = [
    "AUTHORIZED",
    "CAPTURED",
    "REFUNDED",
    "VOIDED",
    "LedgerRuleBroken",
    "LedgerStatus",
    "PaymentLedger",
    "PaymentLedgerNotFound",
]

AUTHORIZED = "payment_authorized"
CAPTURED = "payment_captured"
VOIDED = "payment_voided"
REFUNDED = "payment_refunded"


class PaymentLedgerNotFound(NotFound):
    slug = "payment-ledger-not-found"
    title = "Payment ledger not found"
    description = "No payment was recorded for this order (or the caller may not see it)."


class LedgerRuleBroken(RuleViolated):
    slug = "payment-ledger-rule-broken"
    title = "Payment ledger rule broken"
    description = "The payment operation breaks a rule of the order's payment ledger."


class LedgerStatus(StrEnum):
    PENDING = "pending"
    AUTHORIZED = "authorized"
    CAPTURED = "captured"
    VOIDED = "voided"
    PARTIALLY_REFUNDED = "partially_refunded"
    REFUNDED = "refunded"


class PaymentLedger(Aggregate):
    category = "payment_ledger"

    def __init__(self, aggregate_id: str) -> None:
        super().__init__(aggregate_id)
        self.currency: str | None = None
        self.authorization_id: str | None = None
        self.authorized_minor = 0
        self.captured_minor = 0
        self.refunded_minor = 0
        self.voided = False
        self.capture_ids: list[str] = []

    @property
    def order_id(self) -> str:
        return self.id

    @property
    def status(self) -> LedgerStatus:
        if self.refunded_minor:
            full = self.refunded_minor >= self.captured_minor
            return LedgerStatus.REFUNDED if full else LedgerStatus.PARTIALLY_REFUNDED
        if self.captured_minor:
            return LedgerStatus.CAPTURED
        if self.voided:
            return LedgerStatus.VOIDED
        if self.authorization_id is not None:
            return LedgerStatus.AUTHORIZED
        return LedgerStatus.PENDING

    @property
    def refundable_minor(self) -> int:
        return self.captured_minor - self.refunded_minor

    # Commands: check, then record.

    def authorize(self, *, authorization_id: str, amount_minor: int, currency: str) -> None:
        if self.authorization_id == authorization_id:
            return
        if self.authorization_id is not None:
            raise LedgerRuleBroken(
                f"order {self.id} is already authorized ({self.authorization_id}); "
                f"a second authorization {authorization_id} is not allowed"
            )
        _positive(amount_minor)
        self.record(
            AUTHORIZED,
            {"authorization_id": authorization_id, "amount_minor": amount_minor, "currency": currency},
        )

    def capture(self, *, authorization_id: str, capture_id: str, amount_minor: int, currency: str) -> None:
        if capture_id in self.capture_ids:
            return
        self._require_authorization(authorization_id)
        self._require_currency(currency)
        _positive(amount_minor)
        if self.voided:
            raise LedgerRuleBroken(f"order {self.id}: the authorization was voided; nothing can be captured")
        uncaptured = self.authorized_minor - self.captured_minor
        if amount_minor > uncaptured:
            raise LedgerRuleBroken(
                f"order {self.id}: capture of {amount_minor} exceeds the {uncaptured} still authorized"
            )
        self.record(
            CAPTURED,
            {
                "authorization_id": authorization_id,
                "capture_id": capture_id,
                "amount_minor": amount_minor,
                "currency": currency,
            },
        )

    def void(self, *, authorization_id: str) -> None:
        # The checkout voids authorizations found at the provider when an authorize answer was
        # lost, so a void may be the first this ledger hears of its authorization.
        if self.authorization_id is not None:
            self._require_authorization(authorization_id)
        if self.voided:
            return
        if self.captured_minor:
            raise LedgerRuleBroken(f"order {self.id}: a captured authorization cannot be voided (refund it)")
        self.record(VOIDED, {"authorization_id": authorization_id})

    def refund(self, *, capture_id: str, amount_minor: int, currency: str) -> None:
        if capture_id not in self.capture_ids:
            raise LedgerRuleBroken(f"order {self.id}: unknown capture {capture_id}")
        self._require_currency(currency)
        _positive(amount_minor)
        if amount_minor > self.refundable_minor:
            raise LedgerRuleBroken(
                f"order {self.id}: refund of {amount_minor} exceeds the {self.refundable_minor} refundable"
            )
        self.record(REFUNDED, {"capture_id": capture_id, "amount_minor": amount_minor, "currency": currency})

    def _require_authorization(self, authorization_id: str) -> None:
        if self.authorization_id is None:
            raise LedgerRuleBroken(f"order {self.id} has no authorization yet")
        if authorization_id != self.authorization_id:
            raise LedgerRuleBroken(f"order {self.id}: unknown authorization {authorization_id}")

    def _require_currency(self, currency: str) -> None:
        if currency != self.currency:
            raise LedgerRuleBroken(f"order {self.id} is in {self.currency}, not {currency}")

    # Events: fold without checks.

    def apply(self, event_type: str, data: Mapping[str, Any]) -> None:
        if event_type == AUTHORIZED:
            self.authorization_id = str(data["authorization_id"])
            self.authorized_minor = int(data["amount_minor"])
            self.currency = str(data["currency"])
        elif event_type == CAPTURED:
            self.captured_minor += int(data["amount_minor"])
            self.capture_ids = [*self.capture_ids, str(data["capture_id"])]
        elif event_type == VOIDED:
            self.voided = True
            self.authorization_id = str(data["authorization_id"])
        elif event_type == REFUNDED:
            self.refunded_minor += int(data["amount_minor"])
        else:
            # An unknown type means a newer writer: folding past it would give a wrong balance.
            raise ValueError(f"unknown payment ledger event {event_type!r}")

    def snapshot(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "authorization_id": self.authorization_id,
            "authorized_minor": self.authorized_minor,
            "captured_minor": self.captured_minor,
            "refunded_minor": self.refunded_minor,
            "voided": self.voided,
            "capture_ids": list(self.capture_ids),
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        self.currency = state["currency"]
        self.authorization_id = state["authorization_id"]
        self.authorized_minor = int(state["authorized_minor"])
        self.captured_minor = int(state["captured_minor"])
        self.refunded_minor = int(state["refunded_minor"])
        self.voided = bool(state["voided"])
        self.capture_ids = [str(item) for item in state["capture_ids"]]


def _positive(amount_minor: int) -> None:
    if amount_minor <= 0:
        raise LedgerRuleBroken(f"amounts are positive minor units, got {amount_minor}")
