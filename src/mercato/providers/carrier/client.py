"""A thin typed async client for the simulated carrier (no retries: the saga's adapters add resilience)."""

from __future__ import annotations

from collections.abc import Sequence

from mercato.providers._client import ProviderHttpClient
from mercato.providers.carrier.models import (
    Address,
    ShipmentIn,
    ShipmentItem,
    ShipmentOut,
    ShipmentPage,
    ShipmentSummary,
)

__all__ = ["CarrierClient"]


class CarrierClient(ProviderHttpClient):
    async def create_shipment(
        self,
        *,
        order_reference: str,
        items: Sequence[ShipmentItem],
        idempotency_key: str,
        address: Address | None = None,
    ) -> ShipmentOut:
        body = ShipmentIn(order_reference=order_reference, items=list(items), address=address)
        response = await self._post(
            "/v1/shipments",
            idempotency_key=idempotency_key,
            json=body.model_dump(mode="json", exclude_none=True),
        )
        return ShipmentOut.model_validate_json(response.content)

    async def cancel_shipment(self, shipment_id: str, *, idempotency_key: str) -> ShipmentOut:
        response = await self._post(f"/v1/shipments/{shipment_id}/cancel", idempotency_key=idempotency_key)
        return ShipmentOut.model_validate_json(response.content)

    async def get_shipment(self, shipment_id: str) -> ShipmentOut:
        response = await self._get(f"/v1/shipments/{shipment_id}")
        return ShipmentOut.model_validate_json(response.content)

    async def shipments(
        self, *, order_reference: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> ShipmentPage:
        response = await self._get(
            "/v1/shipments", {"order_reference": order_reference, "limit": limit, "cursor": cursor}
        )
        return ShipmentPage.model_validate_json(response.content)

    async def summary(self, *, order_reference: str | None = None) -> ShipmentSummary:
        response = await self._get("/v1/shipments/summary", {"order_reference": order_reference})
        return ShipmentSummary.model_validate_json(response.content)
