"""The PSP's wire format: requests, resources, ledger entries and the ledger summary."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "AuthorizationOut",
    "AuthorizationStatus",
    "AuthorizeIn",
    "CaptureIn",
    "CaptureOut",
    "LedgerEntry",
    "LedgerKind",
    "LedgerPage",
    "LedgerSummary",
    "OrderLedger",
    "RefundIn",
    "RefundOut",
]

_CURRENCY = r"^[A-Z]{3}$"
_MAX_MINOR = 10**12


class AuthorizationStatus(StrEnum):
    AUTHORIZED = "authorized"
    DECLINED = "declined"
    CAPTURED = "captured"
    VOIDED = "voided"


class LedgerKind(StrEnum):
    AUTHORIZATION = "authorization"
    DECLINE = "decline"
    CAPTURE = "capture"
    VOID = "void"
    REFUND = "refund"


class AuthorizeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: int = Field(gt=0, le=_MAX_MINOR)
    currency: str = Field(pattern=_CURRENCY)
    order_reference: str = Field(min_length=1, max_length=128)
    card_token: str | None = Field(
        default=None,
        max_length=128,
        description="`tok_decline` and `tok_insufficient_funds` always decline; anything else follows "
        "the provider's decline rate.",
    )


class CaptureIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: int = Field(gt=0, le=_MAX_MINOR, description="At most the authorized amount.")


class RefundIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    amount_minor: int = Field(gt=0, le=_MAX_MINOR, description="At most captured minus already refunded.")


class AuthorizationOut(BaseModel):
    authorization_id: str
    order_reference: str
    amount_minor: int
    currency: str
    status: AuthorizationStatus
    decline_reason: str | None = None
    captured_minor: int = 0
    capture_id: str | None = None
    created_at: datetime
    updated_at: datetime


class CaptureOut(BaseModel):
    capture_id: str
    authorization_id: str
    order_reference: str
    amount_minor: int
    currency: str
    refunded_minor: int
    status: str = "captured"
    created_at: datetime


class RefundOut(BaseModel):
    refund_id: str
    capture_id: str
    authorization_id: str
    order_reference: str
    amount_minor: int
    currency: str
    status: str = "refunded"
    created_at: datetime


class LedgerEntry(BaseModel):
    entry_id: str
    kind: LedgerKind
    order_reference: str
    authorization_id: str
    capture_id: str | None = None
    amount_minor: int
    currency: str
    idempotency_key: str
    created_at: datetime


class LedgerPage(BaseModel):
    items: list[LedgerEntry] = Field(default_factory=list)
    next_cursor: str | None = None


class OrderLedger(BaseModel):
    """Counts and sums per kind for one order reference (or for all, in `totals`)."""

    order_reference: str
    authorizations: int = 0
    authorized_minor: int = 0
    declines: int = 0
    captures: int = 0
    captured_minor: int = 0
    voids: int = 0
    voided_minor: int = 0
    refunds: int = 0
    refunded_minor: int = 0


class LedgerSummary(BaseModel):
    orders: list[OrderLedger] = Field(default_factory=list)
    totals: OrderLedger
