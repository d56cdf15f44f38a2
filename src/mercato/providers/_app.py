"""What the PSP and the carrier apps share: the `Idempotency-Key` header their POSTs take, the
problems those answer, and an app whose lifespan opens and closes the simulator's service."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Protocol

from fastapi import FastAPI, Header
from prometheus_client import CollectorRegistry

from mercato.kit.storage.inline_sqlite import SqlDatabase
from mercato.kit.web.problems import problem_responses
from mercato.providers._edge import ProviderApp, add_common_routes
from mercato.providers.faults import FaultInjector

__all__ = ["POST_PROBLEMS", "IdempotencyKey", "service_app"]

IdempotencyKey = Annotated[
    str | None,
    Header(alias="Idempotency-Key", description="Required on every POST; same key + same body replays."),
]
POST_PROBLEMS = problem_responses(400, 404, 409, 422, 500, 503)


class _Service(Protocol):
    db: SqlDatabase

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def service_app(*, provider: str, title: str, service: _Service, injector: FaultInjector) -> ProviderApp:
    """PROVIDER's app: SERVICE started (its tables created) when the app starts and closed when it
    stops, ready while its database answers, with the common routes (`add_common_routes`)."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        try:
            yield
        finally:
            await service.close()

    app = ProviderApp(
        provider=provider,
        injector=injector,
        registry=CollectorRegistry(),
        title=title,
        version="1",
        lifespan=lifespan,
    )
    add_common_routes(app, ready=service.db.ping)
    return app
