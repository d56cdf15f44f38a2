"""Payments: each order's event-sourced payment ledger, kept from the checkout's payment events."""

from mercato.shop.payments.model import LedgerRuleBroken, LedgerStatus, PaymentLedger, PaymentLedgerNotFound
from mercato.shop.payments.service import LEDGER_GROUP, LedgerView, PaymentsService

__all__ = [
    "LEDGER_GROUP",
    "LedgerRuleBroken",
    "LedgerStatus",
    "LedgerView",
    "PaymentLedger",
    "PaymentLedgerNotFound",
    "PaymentsService",
]
