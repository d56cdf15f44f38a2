"""Payments' integration events: published by the checkout saga, kept in the ledger by this context."""

from __future__ import annotations

__all__ = [
    "PAYMENTS_TOPIC",
    "PAYMENT_AUTHORIZED",
    "PAYMENT_CAPTURED",
    "PAYMENT_REFUNDED",
    "PAYMENT_VOIDED",
]

PAYMENTS_TOPIC = "mercato.payments"
PAYMENT_AUTHORIZED = "mercato.payments.payment_authorized"
PAYMENT_CAPTURED = "mercato.payments.payment_captured"
PAYMENT_VOIDED = "mercato.payments.payment_voided"
PAYMENT_REFUNDED = "mercato.payments.payment_refunded"
