"""The carrier's wire format: shipment requests, shipments and the per-order summary."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "Address",
    "ShipmentIn",
    "ShipmentItem",
    "ShipmentOut",
    "ShipmentPage",
    "ShipmentStatus",
    "ShipmentSummary",
    "ShipmentsByOrder",
]


class ShipmentStatus(StrEnum):
    CREATED = "created"
    CANCELLED = "cancelled"


class ShipmentItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sku: str = Field(min_length=1, max_length=64)
    quantity: int = Field(gt=0, le=10_000)


class Address(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    line1: str = Field(min_length=1, max_length=200)
    line2: str = Field(default="", max_length=200)
    city: str = Field(min_length=1, max_length=100)
    postal_code: str = Field(min_length=1, max_length=20)
    country: str = Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")


class ShipmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    order_reference: str = Field(min_length=1, max_length=128)
    items: list[ShipmentItem] = Field(min_length=1, max_length=200)
    address: Address | None = None


class ShipmentOut(BaseModel):
    shipment_id: str
    order_reference: str
    status: ShipmentStatus
    tracking_number: str
    items: list[ShipmentItem]
    address: Address | None = None
    created_at: datetime
    cancelled_at: datetime | None = None


class ShipmentPage(BaseModel):
    items: list[ShipmentOut] = Field(default_factory=list)
    next_cursor: str | None = None


class ShipmentsByOrder(BaseModel):
    order_reference: str
    created: int = 0
    cancelled: int = 0
    active: int = 0


class ShipmentSummary(BaseModel):
    orders: list[ShipmentsByOrder] = Field(default_factory=list)
    totals: ShipmentsByOrder
