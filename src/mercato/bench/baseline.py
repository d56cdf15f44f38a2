"""The bare baseline: one route answering a product-sized JSON body, served like Mercato.

It runs on the same uvicorn settings as ``mercato api`` (same loop and HTTP implementation, worker
count, access log off, no proxy headers), so the difference between the two is what Mercato's
stack costs per request: framework routing and validation, middleware, the database round trip
and serialisation.

``--kind asyncpg`` is the database baseline (issue 16): bare Starlette and a raw asyncpg pool
answering ``GET /raw/products/{id}`` with the same ``SELECT ... FROM catalog_products WHERE id = $1``
Mercato's product-by-id runs, rendered to the same JSON shape, on the database named by the
``BENCH_BASELINE_DSN`` environment variable (a plain ``postgresql://`` DSN).

``python -m mercato.bench.baseline --port N [--workers W] [--kind starlette|asgi|asyncpg]``
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from mercato.demo.seed import demo_products
from mercato.kit.ids import new_id

BARE_PATH = "/bare"
RAW_PRODUCT_PATH = "/raw/products/{id}"
BASELINE_DSN_ENV = "BENCH_BASELINE_DSN"


def product_shaped_body() -> bytes:
    """A JSON body shaped (and sized, to within a few bytes) like one seeded demo product."""
    draft = demo_products(1, random.Random(42))[0]
    now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    body: dict[str, Any] = {
        "id": str(new_id()),
        "sku": draft.sku,
        "name": draft.name,
        "description": draft.description,
        "price_minor": draft.price_minor,
        "currency": draft.currency,
        "category": draft.category,
        "attributes": draft.attributes,
        "archived": False,
        "version": 1,
        "created_at": now,
        "updated_at": now,
    }
    return orjson.dumps(body)


BODY = product_shaped_body()


async def _bare(_request: Request) -> Response:
    return Response(BODY, media_type="application/json")


def create_starlette_app() -> Starlette:
    """Bare Starlette: routing and a `Response`, nothing else."""
    return Starlette(routes=[Route(BARE_PATH, _bare, methods=["GET"])])


_START = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())],
}
_BODY = {"type": "http.response.body", "body": BODY}


async def answer_lifespan(receive: Receive, send: Send) -> None:
    """The ASGI lifespan protocol for an app with nothing to start or stop."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def bare_asgi_app(scope: Scope, receive: Receive, send: Send) -> None:
    """Raw ASGI: no framework at all (the floor under the Starlette baseline)."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    await send(_START)
    await send(_BODY)


def create_asgi_app() -> Any:
    return bare_asgi_app


_RAW_SELECT = (
    "SELECT id, sku, name, description, price_minor, currency, category, attributes, archived,"
    " version, created_at, updated_at FROM catalog_products WHERE id = $1"
)


def _iso(value: datetime) -> str:
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def create_asyncpg_app() -> Starlette:
    """Bare Starlette + a raw asyncpg pool (10 connections, as Mercato's): one indexed SELECT."""
    import asyncpg

    dsn = os.environ[BASELINE_DSN_ENV]
    state: dict[str, Any] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        state["pool"] = await asyncpg.create_pool(dsn, min_size=10, max_size=10)
        try:
            yield
        finally:
            await state["pool"].close()

    async def product(request: Request) -> Response:
        try:
            product_id = uuid.UUID(request.path_params["id"])
        except ValueError:
            return Response(b'{"title":"not found"}', status_code=404, media_type="application/json")
        row = await state["pool"].fetchrow(_RAW_SELECT, product_id)
        if row is None:
            return Response(b'{"title":"not found"}', status_code=404, media_type="application/json")
        attributes = row["attributes"]
        body = {
            "id": str(row["id"]),
            "sku": row["sku"],
            "name": row["name"],
            "description": row["description"],
            "price_minor": row["price_minor"],
            "currency": row["currency"],
            "category": row["category"],
            "attributes": orjson.loads(attributes) if isinstance(attributes, str) else attributes,
            "archived": row["archived"],
            "version": row["version"],
            "created_at": _iso(row["created_at"]),
            "updated_at": _iso(row["updated_at"]),
        }
        return Response(orjson.dumps(body), media_type="application/json")

    async def ready(_request: Request) -> Response:
        return Response(BODY, media_type="application/json")

    return Starlette(
        routes=[Route(RAW_PRODUCT_PATH, product, methods=["GET"]), Route(BARE_PATH, ready, methods=["GET"])],
        lifespan=lifespan,
    )


FACTORIES = {
    "starlette": "mercato.bench.baseline:create_starlette_app",
    "asgi": "mercato.bench.baseline:create_asgi_app",
    "asyncpg": "mercato.bench.baseline:create_asyncpg_app",
}


def serve(*, port: int, workers: int, kind: str, host: str = "127.0.0.1") -> None:
    """The same `uvicorn.run` call as ``mercato api`` makes, on the baseline app."""
    uvicorn.run(
        FACTORIES[kind],
        factory=True,
        host=host,
        port=port,
        workers=workers,
        access_log=False,
        log_config=None,
        proxy_headers=False,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the bare baseline endpoint.")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--kind", choices=sorted(FACTORIES), default="starlette")
    args = parser.parse_args(argv)
    serve(port=args.port, workers=args.workers, kind=args.kind)


if __name__ == "__main__":
    main()
