"""`/console` routes: the page and its assets, the staff session, the SSE snapshots, the actions.

Session: the page logs in with the public `POST /v1/auth/login` and hands the access token to
`POST /console/session`, which checks it like any bearer (signature, expiry, revocation, subject) and
that it is staff's (`orders:read_all`), then keeps it in an HttpOnly, SameSite=Strict cookie scoped to
`/console` (an EventSource cannot send an Authorization header). Every console request re-verifies
it, so a revoked or expired token ends the session. Actions also need the `X-Console` header, which a
cross-site form cannot send.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from importlib import resources
from pathlib import Path
from typing import Any, cast

import aiohttp
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from sse_starlette import EventSourceResponse

from mercato.bootstrap import Container
from mercato.kit.auth import InvalidToken, Principal, TokenCodec, TokenGuard
from mercato.kit.sagas import SagaStatus
from mercato.kit.web.problems import problem_response
from mercato.kit.web.security import TOKEN_GUARD, TOKEN_KEYS

__all__ = ["COOKIE", "STAFF_SCOPE", "build_router"]

COOKIE = "mercato_console"
STAFF_SCOPE = "orders:read_all"
ACTION_HEADER = "x-console"
SNAPSHOT_INTERVAL_S = 1.0
_ASSETS = {"console.js": "text/javascript", "console.css": "text/css"}
_PROVIDERS = ("psp", "carrier", "mail")
_SAGA_LIST = tuple(SagaStatus)  # in flight, compensating, failed, and the finished ones
_STARTED = time.time()


def _asset(name: str) -> bytes:
    return resources.files("mercato.console").joinpath("static", name).read_bytes()


def _container(request: Request) -> Container:
    return cast(Container, request.app.state.container)


async def _staff(request: Request, token: str | None) -> Principal | None:
    if not token:
        return None
    keys = getattr(request.app.state, TOKEN_KEYS, None)
    if keys is not None:
        await keys.ensure_loaded()
    codec: TokenCodec = request.app.state.token_codec
    try:
        principal = codec.verify(token)
        guard: TokenGuard | None = getattr(request.app.state, TOKEN_GUARD, None)
        if guard is not None:
            await guard.admit(principal)
    except InvalidToken:
        return None
    return principal if principal.has_scopes(STAFF_SCOPE) else None


def _problem(status: int, slug: str, title: str, detail: str) -> Response:
    return problem_response(status=status, slug=slug, title=title, detail=detail, request_id="")


def _unauthenticated() -> Response:
    return _problem(401, "unauthenticated", "Authentication required", "log in as staff at /console")


def build_router(
    *, lab_catalogue: Callable[..., list[dict[str, Any]]], results_root: Path | None = None
) -> APIRouter:
    router = APIRouter(prefix="/console", include_in_schema=False)

    def labs() -> list[dict[str, Any]]:
        return lab_catalogue(root=results_root) if results_root is not None else lab_catalogue()

    @router.get("")
    async def page() -> HTMLResponse:
        return HTMLResponse(_asset("console.html"), headers={"Cache-Control": "no-store"})

    @router.get("/static/{name}")
    async def static(name: str) -> Response:
        if name not in _ASSETS:
            return _problem(404, "not-found", "Not found", f"no console asset {name!r}")
        return Response(_asset(name), media_type=_ASSETS[name], headers={"Cache-Control": "no-cache"})

    @router.post("/session")
    async def open_session(request: Request) -> Response:
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        principal = await _staff(request, token)
        if principal is None:
            return _problem(403, "forbidden", "Not allowed", "the console is for staff access tokens")
        response = JSONResponse({"subject": principal.subject})
        response.set_cookie(
            COOKIE,
            token,
            httponly=True,
            samesite="strict",
            path="/console",
            secure=request.url.scheme == "https",
        )
        return response

    @router.delete("/session")
    async def close_session() -> Response:
        response = Response(status_code=204)
        response.delete_cookie(COOKIE, path="/console")
        return response

    @router.get("/events")
    async def events(request: Request) -> Response:
        if await _staff(request, request.cookies.get(COOKIE)) is None:
            return _unauthenticated()

        async def stream() -> AsyncIterator[dict[str, str]]:
            while True:
                if await _staff(request, request.cookies.get(COOKIE)) is None:
                    yield {"event": "session", "data": "expired"}
                    return
                data = await snapshot(request)
                yield {"event": "snapshot", "data": orjson.dumps(data, default=str).decode()}
                await asyncio.sleep(SNAPSHOT_INTERVAL_S)

        return EventSourceResponse(stream(), ping=15, headers={"Cache-Control": "no-store"})

    @router.get("/labs")
    async def lab_list(request: Request) -> Response:
        if await _staff(request, request.cookies.get(COOKIE)) is None:
            return _unauthenticated()
        return JSONResponse(await asyncio.to_thread(labs))

    @router.get("/labs/{name}/figure")
    async def lab_figure(request: Request, name: str) -> Response:
        if await _staff(request, request.cookies.get(COOKIE)) is None:
            return _unauthenticated()
        entry = next((e for e in await asyncio.to_thread(labs) if e["name"] == name), None)
        latest = entry["latest"] if entry else None
        if not latest or not latest.get("figure"):
            return _problem(404, "not-found", "Not found", f"no figure for lab {name!r}")
        figure = Path(latest["path"]) / str(latest["figure"])
        return Response(figure.read_bytes(), media_type="image/png")

    async def action_guard(request: Request) -> Response | None:
        if await _staff(request, request.cookies.get(COOKIE)) is None:
            return _unauthenticated()
        if request.headers.get(ACTION_HEADER) != "1":
            return _problem(
                403, "forbidden", "Not allowed", f"console actions need the {ACTION_HEADER} header"
            )
        return None

    @router.post("/dead-letters/{dead_letter_id}/replay")
    async def replay(request: Request, dead_letter_id: str) -> Response:
        refused = await action_guard(request)
        if refused is not None:
            return refused
        try:
            ident = uuid.UUID(dead_letter_id)
        except ValueError:
            return _problem(422, "validation-error", "Invalid id", "a dead letter id is a UUID")
        queued = await _container(request).stream.replay_dead_letters(ids=[ident])
        if not queued:
            return _problem(404, "not-found", "Not found", "no dead letter with that id waits for a replay")
        return JSONResponse({"queued": queued})

    @router.put("/faults/{provider}")
    async def set_faults(request: Request, provider: str) -> Response:
        refused = await action_guard(request)
        if refused is not None:
            return refused
        if provider not in _PROVIDERS:
            return _problem(404, "not-found", "Not found", f"no simulator {provider!r}")
        body = await request.body()
        status, answer = await _provider_call(_container(request), provider, "PUT", body)
        if status is None:
            return _problem(503, "dependency-unavailable", "Simulator unreachable", answer.decode())
        return Response(answer, status_code=status, media_type="application/json")

    return router


def _provider_url(container: Container, provider: str) -> str:
    providers = container.settings.providers
    return str(getattr(providers, f"{provider}_base_url")).rstrip("/") + "/admin/faults"


async def _provider_call(
    container: Container, provider: str, method: str, body: bytes = b""
) -> tuple[int | None, bytes]:
    timeout = aiohttp.ClientTimeout(total=2.0)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.request(
                method,
                _provider_url(container, provider),
                data=body or None,
                headers={"Content-Type": "application/json"},
            ) as response,
        ):
            return response.status, await response.read()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return None, f"{provider}: {type(exc).__name__}".encode()


def _samples(request: Request, prefix: str) -> list[tuple[str, dict[str, str], float]]:
    registry = request.app.state.metrics.registry
    out = []
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.startswith(prefix):
                out.append((sample.name, dict(sample.labels), float(sample.value)))
    return out


async def snapshot(request: Request) -> dict[str, Any]:
    """What the page shows, gathered now; a part whose source fails is reported as its error."""
    container = _container(request)
    parts = await asyncio.gather(
        _health(container),
        _sagas(container),
        _breakers(container),
        _dead_letters(container),
        _faults(container),
        return_exceptions=True,
    )
    names = ("health", "sagas", "breakers", "dead_letters", "faults")
    data: dict[str, Any] = {
        name: ({"error": f"{type(part).__name__}: {part}"} if isinstance(part, BaseException) else part)
        for name, part in zip(names, parts, strict=True)
    }
    data["at"] = time.time()
    data["process"] = _process(request)
    reports = container.breaker_reports
    data["processes"] = _processes(
        reports.process if reports is not None else "this process", data["breakers"]
    )
    data["lag"] = [
        {"group": labels.get("group", ""), "topic": labels.get("topic", ""), "messages": value}
        for name, labels, value in _samples(request, "mercato_messaging_consumer_lag_messages")
    ]
    data["outbox"] = {
        name.removeprefix("mercato_messaging_outbox_"): value
        for name, _labels, value in _samples(request, "mercato_messaging_outbox_")
    }
    data["connections"] = {
        labels.get("kind", "all"): value
        for _n, labels, value in _samples(request, "mercato_realtime_connections")
    }
    data["slo"] = _slo(request)
    data["protection"] = _protection(request)
    return data


# Edge protection and the database's roles: what rate limiting, load shedding and the replicas are
# doing (present only where configured: replicas, a Redis-backed limiter, shedding).
_PROTECTION = (
    "mercato_ratelimit_decisions_total",
    "mercato_ratelimit_degraded",
    "mercato_backpressure_inflight",
    "mercato_backpressure_shed_total",
    "mercato_db_replica_lag_seconds",
    "mercato_db_replica_in_rotation",
    "mercato_db_pool_connections",
)


def _protection(request: Request) -> list[dict[str, Any]]:
    out = []
    for name, labels, value in _samples(request, "mercato_"):
        if name in _PROTECTION:
            label = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()))
            out.append({"metric": name.removeprefix("mercato_"), "labels": label, "value": value})
    return out


def _process(request: Request) -> dict[str, Any]:
    values = {name: value for name, _labels, value in _samples(request, "process_")}
    return {
        "pid": os.getpid(),
        "uptime_s": round(time.time() - _STARTED, 1),
        "cpu_s": values.get("process_cpu_seconds_total", 0.0),
        "rss_bytes": values.get("process_resident_memory_bytes", 0.0),
        "open_fds": values.get("process_open_fds", 0.0),
    }


def _slo(request: Request) -> dict[str, Any]:
    """Availability since this process started: the share of 5xx, and how fast that burns a 99.9 %
    objective's error budget (1.0 spends exactly the budget over the SLO's window)."""
    total = errors = 0.0
    for name, labels, value in _samples(request, "mercato_http_requests_total"):
        if name != "mercato_http_requests_total" or labels.get("route", "").startswith("/console"):
            continue
        total += value
        if labels.get("status", "").startswith("5"):
            errors += value
    ratio = errors / total if total else 0.0
    return {"objective": 0.999, "requests": total, "errors": errors, "burn_rate": round(ratio / 0.001, 3)}


async def _health(container: Container) -> list[dict[str, Any]]:
    return [
        {"name": r.name, "ok": r.ok, "duration_ms": r.duration_ms, "error": r.error}
        for r in await container.health.readiness()
    ]


async def _sagas(container: Container) -> dict[str, Any]:
    counts = await container.sagas.counts()
    listed: list[dict[str, Any]] = []
    for status in _SAGA_LIST:
        for saga in await container.sagas.find(status=status, limit=8):
            history = await container.sagas.history(saga.id)
            listed.append(
                {
                    "id": str(saga.id),
                    "type": saga.saga_type,
                    "status": saga.status.value,
                    "order_id": str(saga.data.get("order_id") or saga.id),  # checkout: saga id = order id
                    "failure": saga.failure,
                    "updated_at": saga.updated_at.isoformat(),
                    "steps": [
                        {
                            "step": h.step,
                            "direction": h.direction,
                            "attempt": h.attempt,
                            "outcome": h.outcome,
                            "ms": h.duration_ms,
                        }
                        for h in history
                    ],
                }
            )
    listed.sort(key=lambda s: str(s["updated_at"]), reverse=True)
    return {"counts": counts, "items": listed[:20]}


async def _breakers(container: Container) -> list[dict[str, Any]]:
    reports = container.breaker_reports
    own = reports.process if reports is not None else "this process"
    items = [{**item, "process": own, "age_s": 0.0} for item in container.breakers.snapshot().values()]
    for report in await reports.fetch() if reports is not None else []:
        items.append({**dict(report.snapshot), "process": report.process, "age_s": round(report.age_s, 1)})
    return items


def _processes(own: str, breakers: Any) -> list[dict[str, Any]]:
    """This process and every other one that reported its breakers lately (the workers, ADR 0025):
    alive if its last report is younger than the reports' time to live."""
    seen: dict[str, float] = {own: 0.0}
    for item in breakers if isinstance(breakers, list) else []:
        process = str(item.get("process", ""))
        seen[process] = min(seen.get(process, float("inf")), float(item.get("age_s", 0.0)))
    return [{"process": name, "last_seen_s": age} for name, age in sorted(seen.items())]


async def _dead_letters(container: Container) -> list[dict[str, Any]]:
    return [
        {
            "id": str(d.id),
            "group": d.group,
            "topic": d.topic,
            "type": d.message.type,
            "attempts": d.attempts,
            "error": d.last_error,
            "status": d.status.value,
            "dead_at": d.dead_at.isoformat(),
        }
        for d in await container.stream.dead_letters(limit=20)
    ]


async def _faults(container: Container) -> dict[str, Any]:
    if not container.settings.providers.enabled and not container.settings.providers.psp_base_url:
        return {}
    out: dict[str, Any] = {}
    for provider in _PROVIDERS:
        status, body = await _provider_call(container, provider, "GET")
        out[provider] = (
            orjson.loads(body) if status == 200 else {"unreachable": body.decode(errors="replace")}
        )
    return out
