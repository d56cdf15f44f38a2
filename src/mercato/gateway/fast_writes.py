"""The checkout's two requests answered by the edge itself, before routing (ADR 0071).

Each checkout makes `PUT /v1/carts/me/items/{sku}` then `POST /v1/checkout`. Through FastAPI each
paid for route matching over every route, dependency solving (the service, the bearer scheme, auth,
the scope check, the path, header and body parameters) and the route class's wrapper: 12–20 % of the
API process's CPU at 50 checkouts/s. Like `FastReads` for product reads (ADR 0054), this last edge step
answers them by calling what the routes call:

- auth through the routes' own dependency objects (`CART_WRITE`, `ORDERS_WRITE`) with the same bearer
  parsing (`kit/web/security.principal_for`): verification, session guard, scopes, audit;
- the routes' own work (`put_item_answer`, `checkout_answer`), its errors rendered by the app's
  exception handlers with `Cache-Control: private, no-store` (`answer_privately`, as the route class).

It answers only a request whose every parameter the route would accept: the path parameter, the
`Idempotency-Key` header and a JSON body (`Content-Type: application/json`) parsed as FastAPI parses it
(`json.loads`) and validated by the route's own model. Anything else, and any refusal before the work
starts (no bearer token, a token or scope refused, a quantity over the shop's limit), is left to the
router with the body replayed, so every 400/401/403/422 stays the framework's, byte for byte. Every
step before this one (limits, shedding, deadline, versioning, 406, idempotency for POST) has run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive

from mercato.gateway.middleware import BodyRefused
from mercato.kit.idempotency.fingerprint import IDEMPOTENCY_KEY_PATTERN
from mercato.kit.web.bodies import read_body, replaying
from mercato.kit.web.private import answer_privately
from mercato.kit.web.security import principal_for
from mercato.shop.cart.api import CART_WRITE, PUT_ITEM_ROUTE, SKU_PATTERN, CartItemIn, put_item_answer
from mercato.shop.checkout.api import (
    CHECKOUT_ROUTE,
    IDEMPOTENCY_KEY_MAX_LENGTH,
    ORDERS_WRITE,
    CheckoutIn,
    checkout_answer,
)

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mercato.gateway.edge import Exchange

__all__ = ["FastWrites"]

# The router's regex for the template (`[^/]+`), then the parameter's own pattern (which bounds its
# length to 3..64), matched whole: Python's `$` would also accept a trailing newline.
_CART_PATH = re.compile(r"^/v1/carts/me/items/([^/]+)$")
_SKU = re.compile(SKU_PATTERN)
_KEY = re.compile(IDEMPOTENCY_KEY_PATTERN)
_JSON = "application/json"


def _refusing(refused: BodyRefused) -> Receive:
    """`receive` for the router after the body limit refused the body: it refuses it there too (the
    route renders the 413/408 as it always did)."""

    async def refuse() -> Message:
        raise refused

    return refuse


def _valid_body(model: type[BaseModel], raw: bytes) -> Any | None:
    """The body as the route's model, or None where FastAPI might answer differently (left to it)."""
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, ValidationError):  # json.JSONDecodeError is a ValueError
        return None


class FastWrites:
    """Edge step, after `FastReads`' place in the order (last before the router)."""

    def __init__(self, *, app: FastAPI) -> None:
        self.state: Any = app.state

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        method = ex.method
        if method == "PUT":
            match = _CART_PATH.match(ex.path)
            if match is None or not _SKU.fullmatch(sku := match.group(1)):
                return None
            ex.scope["path_params"] = {"sku": sku}  # as routing leaves them (read by the audit)
            return await self._answer(
                ex, PUT_ITEM_ROUTE, lambda request, body: self._put_item(request, sku, body)
            )
        if method == "POST" and ex.path == CHECKOUT_ROUTE:
            key = ex.header(b"idempotency-key")
            if key is None or len(key) > IDEMPOTENCY_KEY_MAX_LENGTH or not _KEY.fullmatch(key):
                return None
            return await self._answer(ex, CHECKOUT_ROUTE, self._checkout)
        return None

    async def _answer(
        self,
        ex: Exchange,
        route: str,
        work: Callable[[Request, bytes], Awaitable[Callable[[], Awaitable[Any]] | None]],
    ) -> ASGIApp | None:
        """Read the body, let `work` decide (None: the router answers, the body replayed to it), and
        run what it returns as the route's handler would."""
        try:
            body, complete = await read_body(ex.receive)
        except BodyRefused as refused:
            ex.receive = _refusing(refused)
            return None
        if not complete:
            ex.receive = replaying(body, ex.receive, more_body=True)
            return None
        request = Request(ex.scope, ex.receive)
        # FastAPI parses a body as JSON only under a JSON media type (strict content type); an empty
        # body is no body, whatever the header says.
        run = await work(request, body) if not body or ex.header(b"content-type") == _JSON else None
        if run is None:
            ex.receive = replaying(body, ex.receive)
            return None
        ex.route = route
        response: ASGIApp = await answer_privately(request, run())
        return response

    async def _principal(self, request: Request, dependency: Any) -> Any | None:
        if request.headers.get("authorization") is None:
            return None  # an API key's principal, or the route's 401: the router decides
        try:
            return await principal_for(request, dependency)
        except Exception:  # noqa: BLE001 - refused (401/403) or failed: the route meets it again, as it would
            return None

    async def _put_item(self, request: Request, sku: str, raw: bytes) -> Callable[[], Awaitable[Any]] | None:
        if not raw:
            return None  # the body is required: the route's 400/422
        body = _valid_body(CartItemIn, raw)
        if body is None:
            return None
        service = self.state.cart
        if body.quantity > service.limits.max_quantity:
            return None  # the route's 400, raised after its dependencies ran
        principal = await self._principal(request, CART_WRITE)
        if principal is None:
            return None
        return lambda: put_item_answer(service, principal, sku, body.quantity)

    async def _checkout(self, request: Request, raw: bytes) -> Callable[[], Awaitable[Any]] | None:
        card_token: str | None = None
        if raw:
            body = _valid_body(CheckoutIn, raw)
            if body is None:
                return None
            card_token = body.card_token
        principal = await self._principal(request, ORDERS_WRITE)
        if principal is None:
            return None
        service = self.state.checkout
        return lambda: checkout_answer(service, principal, card_token)
