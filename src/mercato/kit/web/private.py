"""Routes whose every response, errors included, says `Cache-Control: private, no-store`.

Per-user data must never be stored by a shared cache. The header is set around the whole route
handler because errors raised by dependencies (401, 403, 400) never reach the endpoint; they are
rendered here with the app's own exception handlers so they carry the header too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

PRIVATE_NO_STORE = "private, no-store"

# OpenAPI response-header entry documenting it.
PRIVATE_HEADER_DOC = {
    "Cache-Control": {"schema": {"type": "string"}, "description": "Always `private, no-store`"}
}


class PrivateRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        inner = super().get_route_handler()

        async def handler(request: Request) -> Response:
            return await answer_privately(request, inner(request))

        return handler


async def answer_privately(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`'s response, or what the app's exception handlers make of its exception, with
    `Cache-Control: private, no-store`. The routes' handler, and the edge's answers to the same routes
    (gateway/fast_writes.py), so both render an error the same way."""
    try:
        response = await answer
    except Exception as exc:
        render = _exception_handler(request, exc)
        if render is None:
            raise
        response = await render(request, exc)
    response.headers["Cache-Control"] = PRIVATE_NO_STORE
    return response


def _exception_handler(request: Request, exc: Exception) -> Any:
    handlers: dict[Any, Any] = request.app.exception_handlers
    for kind in type(exc).__mro__:
        if kind in handlers:
            return handlers[kind]
    return None
