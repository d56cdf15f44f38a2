"""Method and media-type truth at the edge: `OPTIONS`, a full `Allow`, and 406 for an unservable Accept.

Starlette answers a 405 with the methods of the *first* route whose path matched, so a path served by
two routes (`GET` and `POST /v1/products` are separate functions) advertised half of its methods, and
`OPTIONS` was a 405 everywhere. The `MethodsAndMedia` edge steps compute a path's methods from every route
(RFC 9110 §9.3.7, §10.2.1):

- `OPTIONS` on a known path answers 204 with `Allow` (always with HEAD beside GET, and OPTIONS);
- a 405 from the router leaves with that same full `Allow`;
- a request whose `Accept` names no media type the matched operation documents (its OpenAPI
  responses, problem+json included) gets 406 before the route runs, instead of a JSON body the client
  said it cannot read. A `+json` range (`application/vnd.mercato.v2+json`) is JSON (RFC 6839).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Receive, Scope, Send

from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE, problem_response

if TYPE_CHECKING:
    from mercato.gateway.edge import Exchange

_TRIVIAL_ACCEPT = frozenset({"*/*", "application/json", "application/json, */*"})
_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _allowed(routes: list[BaseRoute], scope: Scope) -> tuple[set[str], BaseRoute | None]:
    """Every method some route serves at this path, and the route that fully matches the request."""
    methods: set[str] = set()
    full: BaseRoute | None = None
    for route in routes:
        match, _ = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            methods |= {"GET", "HEAD"}
        else:
            methods |= set(getattr(route, "methods", None) or ())
        if match is Match.FULL and full is None:
            full = route
    if methods:
        methods.add("OPTIONS")
        if "GET" in methods:
            methods.add("HEAD")
    return methods, full


def allow_header(methods: set[str]) -> str:
    return ", ".join(sorted(methods, key=lambda m: _ORDER.index(m) if m in _ORDER else len(_ORDER)))


def _media_ranges(accept: str) -> list[str]:
    """The media ranges of an Accept header that the client takes (q > 0), lower-cased, no params."""
    ranges = []
    for part in accept.split(","):
        media, *params = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 1.0
        if media and quality > 0:
            ranges.append(media.lower())
    return ranges


def acceptable(accept: str, offered: set[str]) -> bool:
    ranges = _media_ranges(accept)
    if not ranges:
        return True  # an empty or all-q=0 header tells nothing: serve the default
    for media in ranges:
        kind, _, subtype = media.partition("/")
        for candidate in offered:
            ckind, _, csubtype = candidate.partition("/")
            if media in ("*/*", candidate) or (subtype == "*" and kind == ckind):
                return True
            # A structured-syntax suffix: `application/vnd.x+json` reads what `application/json` is.
            if kind == ckind and subtype.endswith("+json") and csubtype == "json":
                return True
    return False


class MethodsAndMedia:
    """Edge steps for one route table: `allow_on_405` (outside idempotency, so a replayed 405 carries the
    full `Allow` too) and the OPTIONS / 406 check (`__call__`, right before the router)."""

    def __init__(self, *, fastapi_app: FastAPI, routes: list[BaseRoute]) -> None:
        """`routes`: every route, flat (FastAPI nests included routers in objects of its own)."""
        self.fastapi_app = fastapi_app
        self.routes = routes
        self._media: dict[tuple[str, str], set[str]] | None = None

    def _offered(self, path_format: str, method: str) -> set[str] | None:
        """The media types the operation's documented responses can carry; None if undocumented."""
        if self._media is None:
            media: dict[tuple[str, str], set[str]] = {}
            schema: dict[str, Any] = self.fastapi_app.openapi()
            for path, item in schema.get("paths", {}).items():
                for verb, operation in item.items():
                    types = {
                        content_type.lower()
                        for response in operation.get("responses", {}).values()
                        for content_type in response.get("content", {})
                    }
                    media[(path, verb.upper())] = types | {PROBLEM_MEDIA_TYPE}
            self._media = media
        return self._media.get((path_format, method))

    async def allow_on_405(self, ex: Exchange) -> ASGIApp | None:
        scope = ex.scope

        def full_allow(status: int, headers: list[tuple[bytes, bytes]]) -> None:
            if status == 405:
                methods, _ = _allowed(self.routes, scope)
                headers[:] = [(k, v) for k, v in headers if k.lower() != b"allow"]
                headers.append((b"allow", allow_header(methods).encode("latin-1")))

        ex.on_start(full_allow)
        return None

    async def __call__(self, ex: Exchange) -> ASGIApp | None:
        method = ex.method
        accept = ex.header(b"accept")
        # The route table is walked only when needed: most requests send no Accept or a trivial one.
        if method != "OPTIONS" and (accept is None or accept in _TRIVIAL_ACCEPT):
            return None
        scope = ex.scope
        methods, full = _allowed(self.routes, scope)
        if method == "OPTIONS" and methods and "OPTIONS" not in _declared(full):
            return _NoContent(allow_header(methods))
        if full is not None and accept is not None:
            offered = self._offered(str(getattr(full, "path_format", "")), method)
            if offered and not acceptable(accept, offered):
                return problem_response(
                    status=406,
                    slug="not-acceptable",
                    title="Not acceptable",
                    detail="this resource is available as: " + ", ".join(sorted(offered)),
                    instance=ex.path,
                    request_id=ex.request_id,
                )
        return None


def _declared(route: BaseRoute | None) -> set[str]:
    return set(getattr(route, "methods", None) or ()) if route is not None else set()


class _NoContent:
    def __init__(self, allow: str) -> None:
        self.allow = allow.encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 204,
                "headers": [(b"allow", self.allow), (b"content-length", b"0")],
            }
        )
        await send({"type": "http.response.body", "body": b""})
