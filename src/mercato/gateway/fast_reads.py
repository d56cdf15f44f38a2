"""Hot public reads answered by the edge itself, before routing (ADR 0054).

`GET /v1/products/{id}` is the shop's most frequent request. Through FastAPI it cost, besides the read,
route matching over every route, dependency solving (three dependencies and a header parameter) and a
`Response` object with its header copies. Here the edge step runs the route's own read
(`shop/catalog/api.read_product`, the same function the route calls) and sends the stored bytes with
pre-encoded headers: an application-cache hit (and its 304) touches neither the database nor FastAPI.

Everything a request must pass still runs first (the steps before this one: limits, shedding, deadline,
versioning, 406), and every answer is the route's, byte for byte. Whatever the fast path does not
handle goes on to the router: another method, a path parameter or an `If-None-Match` the route's
validation would refuse (400), a path the router would not match. An error from the read is rendered by
the app's own exception handlers (404 problem, 503 outage), as the route's would be.

A category's first page (`GET /v1/products?category=C[&sort=S][&limit=N]`, ADR 0061) is answered the
same way, through `shop/catalog/api.read_category_page`; any other listing goes on to the route.
Answers are prepared once per stored body (their ASGI messages with the ETag, Surrogate-Key and length
encoded), so a hit builds no header list of its own.
"""

from __future__ import annotations

import inspect
import re
from typing import TYPE_CHECKING, Any, cast

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from mercato.kit.web.etags import IF_NONE_MATCH_MAX_LENGTH, if_none_match_hits
from mercato.kit.web.pagination import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from mercato.shop.catalog.api import read_category_page, read_product
from mercato.shop.catalog.model import ProductSort

if TYPE_CHECKING:
    from fastapi import FastAPI

    from mercato.gateway.edge import Exchange

__all__ = ["LIST_ROUTE", "PRODUCT_ROUTE", "FastReads"]

_UNSET = object()

PRODUCT_ROUTE = "/v1/products/{product_id}"
# The route's own path regex for that template (`[^/]+`), and its parameter's bounds (`ProductIdPath`).
_PRODUCT_PATH = re.compile(r"^/v1/products/([^/]+)$")
_PRODUCT_ID_MAX = 64
_JSON = (b"content-type", b"application/json")
LIST_ROUTE = "/v1/products"
_LIST_PATH = LIST_ROUTE
# What the route's `Query` validation accepts, in the plain spelling (no percent-encoding, no sign):
# anything else is left to the router, which answers it the same way or with its 400.
_CATEGORY = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_LIMIT = re.compile(r"^[0-9]{1,3}$")
_SORTS = {sort.value: sort for sort in ProductSort}
_PAGE_PARAMS_SIZE = 1024
_page_params_memo: dict[bytes, tuple[str, ProductSort, int] | None] = {}


def _page_params(query: bytes) -> tuple[str, ProductSort, int] | None:
    """(category, sort, limit) of a category first-page listing, or None (memoised, bounded)."""
    found = _page_params_memo.get(query, _UNSET)
    if found is _UNSET:
        found = _parse_page_params(query)
        if len(_page_params_memo) >= _PAGE_PARAMS_SIZE:
            _page_params_memo.clear()
        _page_params_memo[query] = found
    return found  # type: ignore[return-value]


def _parse_page_params(query: bytes) -> tuple[str, ProductSort, int] | None:
    values: dict[str, str] = {}
    for pair in query.decode("latin-1").split("&") if query else ():
        name, sep, value = pair.partition("=")
        if not sep or name not in ("category", "sort", "limit") or name in values:
            return None
        values[name] = value
    category = values.get("category")
    if category is None or not _CATEGORY.match(category):
        return None
    sort = _SORTS.get(values.get("sort", ProductSort.NEWEST.value))
    raw_limit = values.get("limit")
    if raw_limit is not None and not _LIMIT.match(raw_limit):
        return None
    limit = DEFAULT_PAGE_SIZE if raw_limit is None else int(raw_limit)
    if sort is None or not 1 <= limit <= MAX_PAGE_SIZE:
        return None
    return category, sort, limit


_PREPARED_SIZE = 2048


class _Answer:
    """A prepared response: its two ASGI messages, built once. The edge's `send` never changes a message
    it is given (it sends a copy with the steps' headers), so one answer serves every request for the
    same stored body."""

    __slots__ = ("body", "etag", "start")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, etag: str) -> None:
        self.start = {"type": "http.response.start", "status": status, "headers": headers}
        self.body = {"type": "http.response.body", "body": body}
        self.etag = etag

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(self.start)
        await send(self.body)


class _Prepared:
    """The 200 and the 304 of one stored body (its ETag and Surrogate-Key encoded once)."""

    __slots__ = ("etag", "not_modified", "ok", "surrogate_key")

    def __init__(self, body: bytes, etag: str, surrogate_key: str) -> None:
        tag = etag.encode("latin-1")
        key = surrogate_key.encode("latin-1")
        length = b"%d" % len(body)
        self.etag = etag
        self.surrogate_key = surrogate_key
        self.ok = _Answer(
            200, [(b"etag", tag), (b"surrogate-key", key), (b"content-length", length), _JSON], body, etag
        )
        # A 304 carries the validator and no body (RFC 9110 §15.4.5), as `not_modified` builds it.
        self.not_modified = _Answer(304, [(b"etag", tag), (b"surrogate-key", key)], b"", etag)


class FastReads:
    """Edge step, last before the router."""

    def __init__(self, *, app: FastAPI) -> None:
        self.app = app
        self.state: Any = app.state
        # Prepared answers by body: a cache hit returns the very bytes object stored, so the lookup
        # hashes nothing new (bytes keep their hash) and compares by identity. Bounded; emptied when full.
        self._prepared: dict[bytes, _Prepared] = {}

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        if ex.method != "GET":
            return None
        if ex.path == _LIST_PATH:
            return await self._category_page(ex)
        match = _PRODUCT_PATH.match(ex.path)
        if match is None:
            return None
        product_id = match.group(1)
        if_none_match = ex.header(b"if-none-match")
        if len(product_id) > _PRODUCT_ID_MAX or (
            if_none_match is not None and len(if_none_match) > IF_NONE_MATCH_MAX_LENGTH
        ):
            return None  # the route's validation answers it (400)
        ex.route = PRODUCT_ROUTE
        state = self.state
        try:
            body, etag, surrogate_key = await read_product(
                state.catalog, getattr(state, "product_cache", None), product_id
            )
        except Exception as exc:  # noqa: BLE001 - rendered by the app's handler, or re-raised to the edge
            return await self._handled(ex, exc)
        return self._answer(body, etag, surrogate_key, if_none_match)

    def _answer(self, body: bytes, etag: str, surrogate_key: str, if_none_match: str | None) -> ASGIApp:
        prepared = self._prepared.get(body)
        if prepared is None or prepared.etag != etag or prepared.surrogate_key != surrogate_key:
            prepared = _Prepared(body, etag, surrogate_key)
            if len(self._prepared) >= _PREPARED_SIZE:
                self._prepared.clear()
            self._prepared[body] = prepared
        if if_none_match is not None and if_none_match_hits(if_none_match, etag):
            return prepared.not_modified
        return prepared.ok

    async def _category_page(self, ex: Exchange) -> ASGIApp | None:
        """`GET /v1/products?category=C[&sort=S][&limit=N]` from the application cache; any other
        listing (a cursor, a price range, a search, a parameter the route would refuse) goes on."""
        state = self.state
        products = getattr(state, "product_cache", None)
        if products is None:
            return None
        params = _page_params(ex.scope.get("query_string", b""))
        if_none_match = ex.header(b"if-none-match")
        if params is None or (if_none_match is not None and len(if_none_match) > IF_NONE_MATCH_MAX_LENGTH):
            return None
        ex.route = LIST_ROUTE
        category, sort, limit = params
        try:
            body, etag, surrogate_key = await read_category_page(
                state.catalog, products, category, sort, limit
            )
        except Exception as exc:  # noqa: BLE001 - rendered by the app's handler, or re-raised to the edge
            return await self._handled(ex, exc)
        return self._answer(body, etag, surrogate_key, if_none_match)

    async def _handled(self, ex: Exchange, exc: Exception) -> ASGIApp:
        """The response the app's exception handlers give `exc` (Starlette's lookup: the class's MRO)."""
        handlers = self.app.exception_handlers
        for kind in type(exc).__mro__:
            handler = handlers.get(kind)
            if handler is not None:
                response = handler(Request(ex.scope), exc)
                if inspect.isawaitable(response):
                    response = await response
                return cast(ASGIApp, response)
        raise exc
