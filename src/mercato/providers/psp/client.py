"""A thin typed async client for the simulated PSP (no retries: the saga's adapters add resilience)."""

from __future__ import annotations

from mercato.providers._client import ProviderHttpClient
from mercato.providers.psp.models import (
    AuthorizationOut,
    AuthorizeIn,
    CaptureIn,
    CaptureOut,
    LedgerPage,
    LedgerSummary,
    RefundIn,
    RefundOut,
)

__all__ = ["PspClient"]


class PspClient(ProviderHttpClient):
    """Every call that changes state takes the caller's `idempotency_key`: retry with the same one."""

    async def authorize(
        self,
        *,
        amount_minor: int,
        currency: str,
        order_reference: str,
        idempotency_key: str,
        card_token: str | None = None,
    ) -> AuthorizationOut:
        body = AuthorizeIn(
            amount_minor=amount_minor,
            currency=currency,
            order_reference=order_reference,
            card_token=card_token,
        )
        response = await self._post(
            "/v1/authorizations", idempotency_key=idempotency_key, json=body.model_dump(exclude_none=True)
        )
        return AuthorizationOut.model_validate_json(response.content)

    async def capture(self, authorization_id: str, *, amount_minor: int, idempotency_key: str) -> CaptureOut:
        response = await self._post(
            f"/v1/authorizations/{authorization_id}/capture",
            idempotency_key=idempotency_key,
            json=CaptureIn(amount_minor=amount_minor).model_dump(),
        )
        return CaptureOut.model_validate_json(response.content)

    async def void(self, authorization_id: str, *, idempotency_key: str) -> AuthorizationOut:
        response = await self._post(
            f"/v1/authorizations/{authorization_id}/void", idempotency_key=idempotency_key
        )
        return AuthorizationOut.model_validate_json(response.content)

    async def refund(self, capture_id: str, *, amount_minor: int, idempotency_key: str) -> RefundOut:
        response = await self._post(
            f"/v1/captures/{capture_id}/refund",
            idempotency_key=idempotency_key,
            json=RefundIn(amount_minor=amount_minor).model_dump(),
        )
        return RefundOut.model_validate_json(response.content)

    async def get_authorization(self, authorization_id: str) -> AuthorizationOut:
        response = await self._get(f"/v1/authorizations/{authorization_id}")
        return AuthorizationOut.model_validate_json(response.content)

    async def ledger(
        self, *, order_reference: str | None = None, limit: int = 100, cursor: str | None = None
    ) -> LedgerPage:
        response = await self._get(
            "/v1/ledger", {"order_reference": order_reference, "limit": limit, "cursor": cursor}
        )
        return LedgerPage.model_validate_json(response.content)

    async def summary(self, *, order_reference: str | None = None) -> LedgerSummary:
        response = await self._get("/v1/ledger/summary", {"order_reference": order_reference})
        return LedgerSummary.model_validate_json(response.content)
