"""The bare baseline: one route answering a product-sized JSON body, served like Mercato.

It runs on the same uvicorn settings as ``mercato api`` (same loop and HTTP implementation, worker
count, access log off, no proxy headers), so the difference between the two is what Mercato's
stack costs per request: framework routing and validation, middleware, the database round trip
and serialisation.

``python -m mercato.bench.baseline --port N [--workers W] [--kind starlette|asgi]``
"""

from __future__ import annotations

import argparse
import random
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


FACTORIES = {
    "starlette": "mercato.bench.baseline:create_starlette_app",
    "asgi": "mercato.bench.baseline:create_asgi_app",
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
