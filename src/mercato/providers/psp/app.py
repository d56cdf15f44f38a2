"""The simulated payment service provider as a FastAPI app (`create_psp_app`)."""

from __future__ import annotations

import random
from typing import Annotated

from fastapi import Query, Request
from starlette.responses import Response

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.kit.web.problems import problem_responses
from mercato.providers._app import POST_PROBLEMS, IdempotencyKey, service_app
from mercato.providers._edge import ProviderApp
from mercato.providers._storage import provider_database
from mercato.providers.faults import FaultInjector, FaultSettings
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
from mercato.providers.psp.service import PaymentProvider

__all__ = ["create_psp_app"]


def create_psp_app(
    database_url: str,
    *,
    faults: FaultSettings | None = None,
    decline_rate: float = 0.0,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> ProviderApp:
    """Build the PSP app. No I/O here: tables are created when the app starts (lifespan)."""
    clock = clock or SystemClock()
    settings = faults or FaultSettings()
    rng = rng or random.Random(settings.seed)
    # Declines draw from their own stream so changing fault settings does not reshuffle them.
    psp = PaymentProvider(
        provider_database(database_url),
        clock=clock,
        rng=random.Random(rng.random()),
        decline_rate=decline_rate,
    )
    app = service_app(
        provider="psp",
        title="Mercato simulated PSP",
        service=psp,
        injector=FaultInjector(settings, clock=clock, rng=rng),
    )
    app.state.psp = psp

    @app.post(
        "/v1/authorizations",
        status_code=201,
        response_model=AuthorizationOut,
        responses=POST_PROBLEMS,
        tags=["payments"],
    )
    async def authorize(request: Request, body: AuthorizeIn, key: IdempotencyKey = None) -> Response:
        """Authorize (hold) an amount; `status` says `authorized` or `declined`."""
        return await psp.idempotency.handle(
            request, key=key, body=body, apply=lambda conn: psp.authorize(conn, body, key or "")
        )

    @app.post(
        "/v1/authorizations/{authorization_id}/capture",
        status_code=201,
        response_model=CaptureOut,
        responses=POST_PROBLEMS,
        tags=["payments"],
    )
    async def capture(
        request: Request, authorization_id: str, body: CaptureIn, key: IdempotencyKey = None
    ) -> Response:
        """Capture up to the authorized amount, once."""
        return await psp.idempotency.handle(
            request,
            key=key,
            body=body,
            apply=lambda conn: psp.capture(conn, authorization_id, body.amount_minor, key or ""),
        )

    @app.post(
        "/v1/authorizations/{authorization_id}/void",
        response_model=AuthorizationOut,
        responses=POST_PROBLEMS,
        tags=["payments"],
    )
    async def void(request: Request, authorization_id: str, key: IdempotencyKey = None) -> Response:
        """Release an authorization that was not captured."""
        return await psp.idempotency.handle(
            request, key=key, body=None, apply=lambda conn: psp.void(conn, authorization_id, key or "")
        )

    @app.post(
        "/v1/captures/{capture_id}/refund",
        status_code=201,
        response_model=RefundOut,
        responses=POST_PROBLEMS,
        tags=["payments"],
    )
    async def refund(
        request: Request, capture_id: str, body: RefundIn, key: IdempotencyKey = None
    ) -> Response:
        """Refund up to what was captured and not yet refunded (several partial refunds allowed)."""
        return await psp.idempotency.handle(
            request,
            key=key,
            body=body,
            apply=lambda conn: psp.refund(conn, capture_id, body.amount_minor, key or ""),
        )

    # The same four operations below the framework's route stack (ADR 0060): the routes above
    # stay for the schema and answer whatever the fast handlers leave to them (invalid requests).
    store = psp.idempotency
    app.add_fast_post(
        "/v1/authorizations",
        store.fast_handler(AuthorizeIn, lambda _p, body, key: lambda conn: psp.authorize(conn, body, key)),
    )
    app.add_fast_post(
        "/v1/authorizations/{authorization_id}/capture",
        store.fast_handler(
            CaptureIn,
            lambda p, body, key: (
                lambda conn: psp.capture(conn, p["authorization_id"], body.amount_minor, key)
            ),
        ),
    )
    app.add_fast_post(
        "/v1/authorizations/{authorization_id}/void",
        store.fast_handler(None, lambda p, _b, key: lambda conn: psp.void(conn, p["authorization_id"], key)),
    )
    app.add_fast_post(
        "/v1/captures/{capture_id}/refund",
        store.fast_handler(
            RefundIn,
            lambda p, body, key: lambda conn: psp.refund(conn, p["capture_id"], body.amount_minor, key),
        ),
    )

    @app.get(
        "/v1/authorizations/{authorization_id}",
        response_model=AuthorizationOut,
        responses=problem_responses(404),
        tags=["payments"],
    )
    async def get_authorization(authorization_id: str) -> AuthorizationOut:
        return await psp.get_authorization(authorization_id)

    @app.get(
        "/v1/captures/{capture_id}",
        response_model=CaptureOut,
        responses=problem_responses(404),
        tags=["payments"],
    )
    async def get_capture(capture_id: str) -> CaptureOut:
        return await psp.get_capture(capture_id)

    @app.get("/v1/ledger/summary", response_model=LedgerSummary, tags=["ledger"])
    async def ledger_summary(order_reference: str | None = None) -> LedgerSummary:
        """Counts and sums per kind, per order reference, plus totals: the chaos tests' oracle."""
        return await psp.summary(order_reference=order_reference)

    @app.get("/v1/ledger", response_model=LedgerPage, responses=problem_responses(400), tags=["ledger"])
    async def ledger_entries(
        order_reference: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> LedgerPage:
        """Every money movement, oldest first (keyset pagination)."""
        return await psp.ledger_page(order_reference=order_reference, limit=limit, cursor=cursor)

    return app
