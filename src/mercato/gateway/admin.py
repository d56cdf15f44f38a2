"""Operator routes: the providers' circuit breakers and the sagas that need attention.

Read-only views for the admin role (scope `orders:read_all`): what an on-call engineer checks first
when checkouts stall ("is the PSP's breaker open?", "which orders failed to compensate, and why?").
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from mercato.bootstrap import Container
from mercato.kit.auth import Principal
from mercato.kit.sagas import SagaStatus
from mercato.kit.sagas.store import SagaInstance
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute

__all__ = ["router"]

router = APIRouter(prefix="/admin", tags=["admin"], route_class=PrivateRoute)

Operator = Annotated[Principal, Depends(require_scopes("orders:read_all"))]
MAX_SAGA_LIMIT = 100


class BreakerOut(BaseModel):
    process: str = Field(description="The process whose breaker this is (`host:pid`).")
    reported_at: str | None = Field(
        description="When that process last reported it (RFC 3339); null for this process's own, live."
    )
    name: str = Field(description="The dependency (`psp`, `carrier`).")
    state: str = Field(description="`closed`, `open` or `half_open`.")
    calls: int = Field(description="Calls recorded in the rolling window.")
    failures: int
    slow_calls: int
    failure_rate: float = Field(description="failures / calls over the window.")
    slow_call_rate: float = Field(description="slow_calls / calls over the window.")
    consecutive_failures: int = Field(description="Failures in a row since the last success.")
    opened_at: str | None = Field(description="When it last opened (RFC 3339), while not closed.")
    retry_after_s: float | None = Field(description="Seconds until it admits probes, while open.")
    open_wait_s: float | None = Field(
        description="Wait before probing, doubled per failed probe (ADR 0021); while not closed."
    )
    reopenings: int = Field(description="Failed probes since the circuit last closed.")
    half_open_probes_in_flight: int
    rejections: int = Field(description="Calls refused since start.")
    transitions: int = Field(description="State changes since start.")
    config: dict[str, float | int]


class BreakersOut(BaseModel):
    items: list[BreakerOut]


class SagaOut(BaseModel):
    id: str
    saga_type: str
    status: str
    step: str | None = Field(description="The step it is on (forward) or compensating; null when done.")
    attempt: int = Field(description="Failed attempts of the current step so far.")
    failure: str | None = Field(description="Why it compensated or failed.")
    correlation_id: str = Field(description="The request id of the checkout that started it.")
    created_at: datetime
    updated_at: datetime
    next_attempt_at: datetime
    finished_at: datetime | None


class SagasOut(BaseModel):
    items: list[SagaOut]


class SagaStatsOut(BaseModel):
    counts: dict[str, int] = Field(description="Sagas by status; every status is present.")
    total: int
    needs_attention: int = Field(description="Sagas in `failed`: a compensation gave up.")


def _container(request: Request) -> Container:
    return cast(Container, request.app.state.container)


@router.get(
    "/resilience/breakers",
    response_model=BreakersOut,
    summary="Circuit breakers in front of the providers",
    description=(
        "Each breaker's state, its rolling-window counts and rates, and when it admits probes: this "
        "process's own, and those the other processes (the workers, which make the provider calls in "
        "distributed mode) reported within the last few seconds (ADR 0025)."
    ),
    responses={
        **problem_responses(401, 403),
        200: {"description": "Breakers", "headers": PRIVATE_HEADER_DOC},
    },
)
async def list_breakers(request: Request, _: Operator) -> BreakersOut:
    container = _container(request)
    reports = container.breaker_reports
    own = reports.process if reports is not None else "local"
    items = [
        BreakerOut.model_validate({**item, "process": own, "reported_at": None})
        for item in container.breakers.snapshot().values()
    ]
    for report in await reports.fetch() if reports is not None else []:
        view: dict[str, Any] = dict(report.snapshot)
        if view.get("retry_after_s") is not None:
            # The wait was measured when reported: count down what passed since.
            view["retry_after_s"] = max(0.0, float(view["retry_after_s"]) - report.age_s)
        reported_at = report.reported_at.isoformat().replace("+00:00", "Z")
        items.append(
            BreakerOut.model_validate({**view, "process": report.process, "reported_at": reported_at})
        )
    return BreakersOut(items=items)


def _saga_out(container: Container, saga: SagaInstance) -> SagaOut:
    definition = container.saga_definitions.get(saga.saga_type)
    step = None
    if definition is not None and not saga.status.terminal and 0 <= saga.step_index < len(definition.steps):
        step = definition.steps[saga.step_index].name
    return SagaOut(
        id=str(saga.id),
        saga_type=saga.saga_type,
        status=saga.status.value,
        step=step,
        attempt=saga.attempt,
        failure=saga.failure,
        correlation_id=saga.correlation_id,
        created_at=saga.created_at,
        updated_at=saga.updated_at,
        next_attempt_at=saga.next_attempt_at,
        finished_at=saga.finished_at,
    )


@router.get(
    "/sagas",
    response_model=SagasOut,
    summary="Sagas by status (newest first)",
    description=(
        "`status=failed` is the needs-attention list: sagas whose compensation gave up, with the "
        "failure text and the correlation id of the checkout request that started them."
    ),
    responses={
        **problem_responses(400, 401, 403),
        200: {"description": "Sagas", "headers": PRIVATE_HEADER_DOC},
    },
)
async def list_sagas(
    request: Request,
    _: Operator,
    status: Annotated[SagaStatus | None, Query(description="Only sagas in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_SAGA_LIMIT, description="At most this many.")] = 20,
) -> SagasOut:
    container = _container(request)
    sagas = await container.sagas.find(status=status, limit=limit)
    return SagasOut(items=[_saga_out(container, saga) for saga in sagas])


@router.get(
    "/sagas/stats",
    response_model=SagaStatsOut,
    summary="Saga counts by status",
    responses={**problem_responses(401, 403), 200: {"description": "Counts", "headers": PRIVATE_HEADER_DOC}},
)
async def saga_stats(request: Request, _: Operator) -> SagaStatsOut:
    found = await _container(request).sagas.counts()
    counts = {status.value: found.get(status.value, 0) for status in SagaStatus}
    return SagaStatsOut(
        counts=counts, total=sum(counts.values()), needs_attention=counts[SagaStatus.FAILED.value]
    )


CatalogAdmin = Annotated[Principal, Depends(require_scopes("catalog:write"))]
MAX_PURGE_ITEMS = 1000


class PurgeIn(BaseModel):
    """What to drop from the application cache: cache keys as stored (`product:r1:<id>`) and/or
    the tags public catalog responses carry in `Surrogate-Key` (`product:<id>`, `products`)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=MAX_PURGE_ITEMS
    )
    tags: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=MAX_PURGE_ITEMS
    )


class PurgeOut(BaseModel):
    purged: int = Field(description="Keys and tags invalidated (unknown tags are ignored).")


@router.post(
    "/cache/purge",
    response_model=PurgeOut,
    summary="Purge the application cache by key or Surrogate-Key tag",
    description=(
        "What a CDN's purge hook (or an operator) calls after an out-of-band change: every process "
        "drops the keys (local tiers through the invalidation bus, the Redis tier at once). Tags are "
        "the ones public catalog responses carry in `Surrogate-Key`."
    ),
    responses={
        **problem_responses(401, 403, 422, 503),
        200: {"description": "Purged", "headers": PRIVATE_HEADER_DOC},
    },
)
async def purge_cache(request: Request, body: PurgeIn, _: CatalogAdmin) -> PurgeOut:
    container = cast(Container, request.app.state.container)
    if container.product_cache is None:
        return PurgeOut(purged=0)
    try:
        purged = await container.product_cache.purge(keys=body.keys, tags=body.tags)
    except (RedisError, OSError) as exc:
        # The shared tier is unreachable: the purge did not happen everywhere; the CDN retries.
        raise HTTPException(503, headers={"Retry-After": "1"}) from exc
    return PurgeOut(purged=purged)
