"""Adapters from checkout's ports to the payment provider and carrier HTTP APIs.

They translate provider answers into checkout's vocabulary: a decline is `Authorization(approved=
False)`; a 409 state conflict (void after capture, cancel after cancel) is `ProviderConflict`; any
other 4xx is `ProviderRejected` (a definite no); a 5xx, a timeout or a dropped connection stays an
exception the saga treats as an uncertain outcome, to retry with the same idempotency key.

Each adapter runs every provider call through its `ProviderCalls` (the dependency's resilience
policy, see `resilient.py`); translation happens outside the policy, so retries and the breaker see
the provider's own errors. The lookups compensations make ("what did I do?") can go through a policy
of their own (`reads`): an outage of the provider's write path then trips the writes' breaker only,
and compensations keep reading the provider's records instead of parking behind that open circuit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial

from mercato.providers._client import ProviderError
from mercato.providers.carrier.client import CarrierClient
from mercato.providers.carrier.models import ShipmentItem, ShipmentStatus
from mercato.providers.psp.client import PspClient
from mercato.providers.psp.models import AuthorizationStatus, LedgerKind
from mercato.shop.checkout.model import (
    Authorization,
    Capture,
    PaymentRecord,
    ProviderConflict,
    ProviderRejected,
    Shipment,
)
from mercato.shop.checkout.resilient import ProviderCalls


@asynccontextmanager
async def _translated() -> AsyncIterator[None]:
    try:
        yield
    except ProviderError as exc:
        if exc.retryable:
            raise
        if exc.status == 409:
            raise ProviderConflict(str(exc)) from exc
        raise ProviderRejected(str(exc)) from exc


class HttpPaymentGateway:
    def __init__(
        self,
        client: PspClient,
        calls: ProviderCalls | None = None,
        *,
        reads: ProviderCalls | None = None,
        undo: ProviderCalls | None = None,
    ) -> None:
        self._client = client
        self._calls = calls or ProviderCalls()
        self._reads = reads or self._calls
        self._undo = undo or self._calls  # the compensations' writes (void, refund, cancel)

    async def authorize(
        self,
        *,
        order_reference: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
        card_token: str | None = None,
    ) -> Authorization:
        async with _translated():
            result = await self._calls(
                lambda: self._client.authorize(
                    amount_minor=amount_minor,
                    currency=currency,
                    order_reference=order_reference,
                    idempotency_key=idempotency_key,
                    card_token=card_token,
                )
            )
        return Authorization(
            authorization_id=result.authorization_id,
            approved=result.status is not AuthorizationStatus.DECLINED,
            decline_reason=result.decline_reason or "",
        )

    async def capture(self, *, authorization_id: str, amount_minor: int, idempotency_key: str) -> Capture:
        async with _translated():
            result = await self._calls(
                lambda: self._client.capture(
                    authorization_id, amount_minor=amount_minor, idempotency_key=idempotency_key
                )
            )
        return Capture(capture_id=result.capture_id)

    async def void(self, *, authorization_id: str, idempotency_key: str) -> None:
        async with _translated():
            await self._undo(lambda: self._client.void(authorization_id, idempotency_key=idempotency_key))

    async def refund(self, *, capture_id: str, amount_minor: int, idempotency_key: str) -> None:
        async with _translated():
            await self._undo(
                lambda: self._client.refund(
                    capture_id, amount_minor=amount_minor, idempotency_key=idempotency_key
                )
            )

    async def payments_for(self, order_reference: str) -> list[PaymentRecord]:
        async with _translated():
            page = await self._reads(lambda: self._client.ledger(order_reference=order_reference, limit=100))
            authorization_ids = sorted(
                {e.authorization_id for e in page.items if e.kind == LedgerKind.AUTHORIZATION}
            )
            records = []
            for authorization_id in authorization_ids:
                auth = await self._reads(partial(self._client.get_authorization, authorization_id))
                records.append(
                    PaymentRecord(
                        authorization_id=auth.authorization_id,
                        status=auth.status.value,
                        capture_id=auth.capture_id,
                    )
                )
        return records


class HttpShippingCarrier:
    def __init__(
        self,
        client: CarrierClient,
        calls: ProviderCalls | None = None,
        *,
        reads: ProviderCalls | None = None,
        undo: ProviderCalls | None = None,
    ) -> None:
        self._client = client
        self._calls = calls or ProviderCalls()
        self._reads = reads or self._calls
        self._undo = undo or self._calls  # the compensations' writes (void, refund, cancel)

    async def create_shipment(
        self, *, order_reference: str, items: Sequence[tuple[str, int]], idempotency_key: str
    ) -> Shipment:
        async with _translated():
            result = await self._calls(
                lambda: self._client.create_shipment(
                    order_reference=order_reference,
                    items=[ShipmentItem(sku=sku, quantity=quantity) for sku, quantity in items],
                    idempotency_key=idempotency_key,
                )
            )
        return Shipment(shipment_id=result.shipment_id)

    async def cancel_shipment(self, *, shipment_id: str, idempotency_key: str) -> None:
        async with _translated():
            await self._undo(
                lambda: self._client.cancel_shipment(shipment_id, idempotency_key=idempotency_key)
            )

    async def active_shipments_for(self, order_reference: str) -> list[Shipment]:
        async with _translated():
            page = await self._reads(
                lambda: self._client.shipments(order_reference=order_reference, limit=100)
            )
        return [
            Shipment(shipment_id=s.shipment_id) for s in page.items if s.status != ShipmentStatus.CANCELLED
        ]
