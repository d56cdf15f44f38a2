"""The simulated payment service provider: app factory, service, wire models and client."""

from mercato.providers.psp.app import create_psp_app
from mercato.providers.psp.client import PspClient
from mercato.providers.psp.models import (
    AuthorizationOut,
    AuthorizationStatus,
    CaptureOut,
    LedgerEntry,
    LedgerKind,
    LedgerPage,
    LedgerSummary,
    OrderLedger,
    RefundOut,
)
from mercato.providers.psp.service import DECLINING_TOKENS, PaymentProvider

__all__ = [
    "DECLINING_TOKENS",
    "AuthorizationOut",
    "AuthorizationStatus",
    "CaptureOut",
    "LedgerEntry",
    "LedgerKind",
    "LedgerPage",
    "LedgerSummary",
    "OrderLedger",
    "PaymentProvider",
    "PspClient",
    "RefundOut",
    "create_psp_app",
]
