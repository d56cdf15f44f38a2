"""The simulated carrier as a FastAPI app (`create_carrier_app`)."""

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
from mercato.providers.carrier.models import ShipmentIn, ShipmentOut, ShipmentPage, ShipmentSummary
from mercato.providers.carrier.service import Carrier
from mercato.providers.faults import FaultInjector, FaultSettings

__all__ = ["create_carrier_app"]


def create_carrier_app(
    database_url: str,
    *,
    faults: FaultSettings | None = None,
    clock: Clock | None = None,
    rng: random.Random | None = None,
) -> ProviderApp:
    """Build the carrier app. No I/O here: tables are created when the app starts (lifespan)."""
    clock = clock or SystemClock()
    settings = faults or FaultSettings()
    rng = rng or random.Random(settings.seed)
    carrier = Carrier(provider_database(database_url), clock=clock, rng=random.Random(rng.random()))
    app = service_app(
        provider="carrier",
        title="Mercato simulated carrier",
        service=carrier,
        injector=FaultInjector(settings, clock=clock, rng=rng),
    )
    app.state.carrier = carrier

    @app.post(
        "/v1/shipments",
        status_code=201,
        response_model=ShipmentOut,
        responses=POST_PROBLEMS,
        tags=["shipments"],
    )
    async def create_shipment(request: Request, body: ShipmentIn, key: IdempotencyKey = None) -> Response:
        """Book a shipment for an order."""
        return await carrier.idempotency.handle(
            request, key=key, body=body, apply=lambda conn: carrier.create(conn, body, key or "")
        )

    @app.post(
        "/v1/shipments/{shipment_id}/cancel",
        response_model=ShipmentOut,
        responses=POST_PROBLEMS,
        tags=["shipments"],
    )
    async def cancel_shipment(request: Request, shipment_id: str, key: IdempotencyKey = None) -> Response:
        """Cancel a shipment that was created (409 when it already was cancelled)."""
        return await carrier.idempotency.handle(
            request, key=key, body=None, apply=lambda conn: carrier.cancel(conn, shipment_id)
        )

    # Both operations below the framework's route stack too (ADR 0060); the routes above keep
    # the schema and answer what the fast handlers leave to them.
    store = carrier.idempotency
    app.add_fast_post(
        "/v1/shipments",
        store.fast_handler(ShipmentIn, lambda _p, body, key: lambda conn: carrier.create(conn, body, key)),
    )
    app.add_fast_post(
        "/v1/shipments/{shipment_id}/cancel",
        store.fast_handler(None, lambda p, _b, _k: lambda conn: carrier.cancel(conn, p["shipment_id"])),
    )

    # Registered before `/v1/shipments/{shipment_id}` so "summary" is not taken for an id.
    @app.get("/v1/shipments/summary", response_model=ShipmentSummary, tags=["shipments"])
    async def shipment_summary(order_reference: str | None = None) -> ShipmentSummary:
        """Created, cancelled and active shipments per order reference, plus totals."""
        return await carrier.summary(order_reference=order_reference)

    @app.get(
        "/v1/shipments", response_model=ShipmentPage, responses=problem_responses(400), tags=["shipments"]
    )
    async def list_shipments(
        order_reference: str | None = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
        cursor: str | None = None,
    ) -> ShipmentPage:
        return await carrier.page(order_reference=order_reference, limit=limit, cursor=cursor)

    @app.get(
        "/v1/shipments/{shipment_id}",
        response_model=ShipmentOut,
        responses=problem_responses(404),
        tags=["shipments"],
    )
    async def get_shipment(shipment_id: str) -> ShipmentOut:
        return await carrier.get(shipment_id)

    return app
