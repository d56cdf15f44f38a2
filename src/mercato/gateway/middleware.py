"""The edge's request-context helpers and its body limit (ADR 0028, ADR 0054).

`with_client_address` resolves the client (the socket peer, or the client a trusted proxy forwarded for:
ADR 0019) once per request. `BodyLimit` refuses bodies over the configured size before they are read
into memory, and bodies that arrive too slowly (408).
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mercato.kit.observability import request_id_var
from mercato.kit.web.forwarded import ForwardedHeader, TrustedProxies, resolve_client_address
from mercato.kit.web.problems import problem_response

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange


def _headers(scope: Scope, name: bytes) -> list[str]:
    return [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]


def with_client_address(scope: Scope, trusted: TrustedProxies, header: ForwardedHeader) -> Scope:
    """The scope with `client` set to the resolved client, so every step and route (the limiter, the
    idempotency scope, routes' `request.client`) sees one answer, computed once."""
    peer = scope.get("client")
    if not trusted:
        return scope  # trust nobody: the peer is the client, and the headers are not even read
    peer_host = peer[0] if peer else None
    client = resolve_client_address(
        peer_host, _headers(scope, header.encode("latin-1")), trusted=trusted, header=header
    )
    if client == peer_host or client is None:
        return scope
    # The port a proxy saw is not ours to know; 0 says "unknown" as uvicorn's proxy middleware does.
    return {**scope, "client": (client, 0)}


class BodyRefused(StarletteHTTPException):
    """Raised from inside `receive`. An HTTPException on purpose: FastAPI's body parser re-raises those
    (any other exception there becomes a 400 "error parsing the body"), so the problem handler answers
    with the right status wherever the body was being read."""


class BodyTooLarge(BodyRefused):
    def __init__(self, max_body_bytes: int) -> None:
        super().__init__(413, detail=f"request bodies are limited to {max_body_bytes} bytes", headers=_CLOSE)


class BodyReadTimeout(BodyRefused):
    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            408, detail=f"the request body did not arrive within {timeout_s:g} s", headers=_CLOSE
        )


# The server must not keep reading (or waiting for) a body it refused: the connection closes after
# the answer. Without it uvicorn drains a declared 50 MB body before the next request, holding the
# connection as long as the client likes.
_CLOSE = {"Connection": "close"}


_BODYLESS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyLimit:
    """Edge step: refuses bodies over `max_body_bytes` (declared: at once, 413; chunked: as soon as the
    running total passes it, 413) and bodies that take longer than `body_read_timeout_s` to arrive from
    the first read on (408), both with `Connection: close`. Every later step and the route read through
    its bounded `receive`; a refusal raised where no handler sees it is answered by the edge."""

    def __init__(self, *, max_body_bytes: int, body_read_timeout_s: float = 10.0) -> None:
        self.max_body_bytes = max_body_bytes
        self.body_read_timeout_s = body_read_timeout_s

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        if ex.method in _BODYLESS:
            return None
        declared = ex.header(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body_bytes):
            return _refusal(BodyTooLarge(self.max_body_bytes), ex.path)
        ex.receive = self._limited(ex.receive)
        return None

    def _limited(self, receive: Receive) -> Receive:
        received = 0
        complete = False
        deadline: float | None = None
        loop = asyncio.get_running_loop()
        max_body_bytes, timeout_s = self.max_body_bytes, self.body_read_timeout_s

        async def limited_receive() -> Message:
            nonlocal received, complete, deadline
            if complete:
                return await receive()  # after the body only a disconnect comes: no deadline on it
            if deadline is None:
                deadline = loop.time() + timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise BodyReadTimeout(timeout_s) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_body_bytes:
                    raise BodyTooLarge(max_body_bytes)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        return limited_receive


def _refusal(refused: BodyRefused, path: str) -> Response:
    slug = "payload-too-large" if refused.status_code == 413 else "request-timeout"
    return problem_response(
        status=refused.status_code,
        slug=slug,
        title="Request body too large" if refused.status_code == 413 else "Request timeout",
        detail=str(refused.detail),
        instance=path,
        request_id=request_id_var.get(),
        headers=dict(refused.headers or {}),
    )


async def refuse_body(refused: BodyRefused, scope: Scope, receive: Receive, send: Send) -> None:
    await _refusal(refused, scope["path"])(scope, receive, send)
