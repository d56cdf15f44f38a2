"""Probes, metrics and the problem-type catalogue: operational routes outside /v1."""

from __future__ import annotations

import contextlib
from typing import Any, cast

import orjson
from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.responses import Response

from mercato.bootstrap import Container
from mercato.gateway.errors import EDGE_PROBLEMS
from mercato.kit.errors import registered_errors
from mercato.kit.health import overall_status
from mercato.kit.web import problem_responses

router = APIRouter(tags=["operations"])


class CheckOut(BaseModel):
    name: str
    ok: bool
    status: str = Field(
        default="ok",
        description="`ok`; `degraded`: down, but the request path does without it (still ready); `failed`",
    )
    duration_ms: float
    error: str = ""


class ReplicaOut(BaseModel):
    name: str
    in_rotation: bool
    lag_bytes: int
    lag_s: float
    reason: str


class ConfigOut(BaseModel):
    version: int
    applied_at: str | None = None
    app_version: str
    track: str | None = None
    error: str | None = Field(default=None, description="The last version this process refused, and why")


class ProbeOut(BaseModel):
    status: str = Field(
        description="`ok`, `degraded` (ready, a fail-open dependency is down), `unavailable`, or "
        "`draining` (shutting down after SIGTERM: in-flight requests finish, new ones go elsewhere)"
    )
    checks: list[CheckOut] = []
    # Read replicas (when configured): one lagging beyond the bound is out of rotation, the shop
    # stays ready (its reads fall back to the primary).
    replicas: list[ReplicaOut] = []
    # The runtime configuration in force here: version, when applied, the code's release, its track.
    config: ConfigOut | None = None


class StartupOut(BaseModel):
    status: str
    steps: dict[str, bool]


class ProblemTypeOut(BaseModel):
    type: str
    title: str
    description: str


def _container(request: Request) -> Container:
    return cast(Container, request.app.state.container)


def _json(body: Any, status: int = 200) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


@router.get("/healthz", response_model=ProbeOut, summary="Liveness: the process answers")
async def healthz() -> Response:
    return _json({"status": "ok", "checks": []})


@router.get(
    "/readyz",
    response_model=ProbeOut,
    summary="Readiness: every backend the request path needs answers",
    description=(
        "503 when a dependency the request path cannot do without (the database) is down. A dependency "
        "that requests fail open on (the rate limiter's Redis) makes the status `degraded`, still 200: "
        "pulling this node would not help, every node shares it (ADR 0026). 503 `draining` from SIGTERM "
        "until the process exits (ADR 0040)."
    ),
    responses={503: {"description": "A required dependency failed", "model": ProbeOut}},
)
async def readyz(request: Request) -> Response:
    health = _container(request).health
    if health.draining:  # shutting down: out of rotation first, in-flight requests still finish
        return _json({"status": "draining", "checks": []}, 503)
    results = await health.readiness()
    status = overall_status(results)
    body: dict[str, Any] = {
        "status": status,
        "checks": [
            {
                "name": r.name,
                "ok": r.ok,
                "status": r.status,
                "duration_ms": r.duration_ms,
                "error": r.error,
            }
            for r in results
        ],
    }
    runtime = _container(request).runtime
    if runtime is not None:
        # Which runtime-configuration version this process runs, and its release (ADR 0045).
        body["config"] = {**runtime.detail(), "track": getattr(request.app.state, "release_track", None)}
    replicas = _container(request).db.replicas
    if replicas is not None:
        with contextlib.suppress(Exception):  # a probe reports, it never raises
            await replicas.refresh(_container(request).db.engine)
        body["replicas"] = replicas.detail()
    return _json(body, 503 if status == "unavailable" else 200)


@router.get(
    "/startupz",
    response_model=StartupOut,
    summary="Startup: migrations applied and seed done",
    responses={503: {"description": "Still starting", "model": StartupOut}},
)
async def startupz(request: Request) -> Response:
    health = _container(request).health
    return _json(
        {"status": "ok" if health.started else "starting", "steps": health.startup_steps},
        200 if health.started else 503,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


def problem_catalogue() -> dict[str, tuple[str, str]]:
    catalogue = dict(EDGE_PROBLEMS)
    for slug, cls in registered_errors().items():
        catalogue[slug] = (cls.title, cls.description)
    return catalogue


@router.get("/problems", response_model=list[ProblemTypeOut], summary="Every problem type")
async def list_problem_types() -> Response:
    return _json(
        [
            {"type": f"/problems/{slug}", "title": t, "description": d}
            for slug, (t, d) in sorted(problem_catalogue().items())
        ]
    )


@router.get(
    "/problems/{slug}",
    response_model=ProblemTypeOut,
    summary="Describe a problem type",
    responses=problem_responses(404),
)
async def get_problem_type(slug: str) -> Response:
    entry = problem_catalogue().get(slug)
    if entry is None:
        from starlette.exceptions import HTTPException

        raise HTTPException(404, f"no problem type {slug!r}")
    return _json({"type": f"/problems/{slug}", "title": entry[0], "description": entry[1]})
