"""The worker's own small HTTP server: `/healthz`, `/readyz`, `/metrics` for an orchestrator.

A worker serves no API, but a scheduler still needs to know it is alive (liveness: the event loop
answers), whether it can work (readiness: its database answers and it is not shutting down) and what
it does (Prometheus metrics: jobs, breakers, retries). Served by uvicorn in the worker's own event
loop, so a loop blocked by a runaway job fails the liveness probe, as it should.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

import orjson
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mercato.kit.health import HealthRegistry

__all__ = ["WorkerHttp", "serve_worker_http", "worker_http_app"]


def _json(body: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(body),
        status_code=status,
        media_type="application/json",
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def worker_http_app(
    *,
    health: HealthRegistry,
    registry: CollectorRegistry,
    stopping: Callable[[], bool],
    detail: Callable[[], dict[str, Any]] | None = None,
) -> Starlette:
    async def healthz(_: Request) -> Response:
        return _json({"status": "ok", "checks": []})

    async def readyz(_: Request) -> Response:
        if stopping():
            return _json({"status": "stopping", "checks": []}, 503, {"Retry-After": "5"})
        results = await health.readiness()
        ok = all(r.ok for r in results)
        checks = [
            {"name": r.name, "ok": r.ok, "duration_ms": r.duration_ms, "error": r.error} for r in results
        ]
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "checks": checks}
        if detail is not None:
            body["config"] = detail()  # the runtime-configuration version in force (ADR 0045)
        return _json(body, 200 if ok else 503, None if ok else {"Retry-After": "5"})

    async def metrics(_: Request) -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ]
    )


class _Server(uvicorn.Server):
    """Signals are the worker's (it stops its jobs first), not uvicorn's."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


@dataclass
class WorkerHttp:
    server: uvicorn.Server
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.gather(self.task, return_exceptions=True)


async def serve_worker_http(
    app: Starlette, *, host: str, port: int, startup_timeout_s: float = 10.0
) -> WorkerHttp:
    """Serve `app` in the running loop; returns once it accepts connections.

    Raises `RuntimeError` when the port cannot be bound: a worker the orchestrator cannot probe would
    be restarted in a loop, so it is better not to start.
    """
    server = _Server(
        uvicorn.Config(app, host=host, port=port, access_log=False, log_config=None, lifespan="off")
    )

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn exits when it cannot bind
            raise RuntimeError(f"the worker's HTTP port {port} could not be bound") from exc

    task = asyncio.create_task(serve())
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout_s
    while not server.started:
        if task.done() or loop.time() > deadline:
            server.should_exit = True
            await asyncio.gather(task, return_exceptions=True)
            raise RuntimeError(f"the worker's HTTP server did not start on {host}:{port}")
        await asyncio.sleep(0.02)
    return WorkerHttp(server, task)
