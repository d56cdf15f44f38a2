"""The simulated carrier: app factory, service, wire models and client."""

from mercato.providers.carrier.app import create_carrier_app
from mercato.providers.carrier.client import CarrierClient
from mercato.providers.carrier.models import (
    Address,
    ShipmentItem,
    ShipmentOut,
    ShipmentPage,
    ShipmentsByOrder,
    ShipmentStatus,
    ShipmentSummary,
)
from mercato.providers.carrier.service import Carrier

__all__ = [
    "Address",
    "Carrier",
    "CarrierClient",
    "ShipmentItem",
    "ShipmentOut",
    "ShipmentPage",
    "ShipmentStatus",
    "ShipmentSummary",
    "ShipmentsByOrder",
    "create_carrier_app",
]
