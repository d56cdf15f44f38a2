"""Product reads through the application cache (kit/cache): the v1 body's bytes, per product.

What is cached is exactly the bytes `GET /v1/products/{id}` answers (so a hit costs no rendering)
under a **versioned key** `product:<REPRESENTATION>:<id>`: a change to `product_dict` bumps
`REPRESENTATION`, and a deploy never reads entries the previous code wrote. A product that does not
exist (or is archived) is cached as "not found" for the short negative TTL.

Invalidation: the catalog service calls `invalidate` right after each committed change (in the
writing process: local tier, Redis tier, broadcast to the other processes), and the worker's
consumer of `mercato.catalog.product_changed` calls it again from the stream: the durable path
that holds even when the writer died between its commit and its broadcast.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.cache import Cache
from mercato.kit.ids import parse_id
from mercato.kit.messaging import Consumer, Message, MessagingHook, Stream
from mercato.kit.storage import Database
from mercato.kit.web.etags import VersionTag, content_etag
from mercato.shop.catalog.events import PRODUCT_CHANGED, TOPIC
from mercato.shop.catalog.model import Product, ProductNotFound
from mercato.shop.catalog.service import CatalogService

__all__ = [
    "INVALIDATION_GROUP",
    "REPRESENTATION",
    "CachedPage",
    "CachedProduct",
    "ProductCache",
    "category_tag",
    "product_tags",
]

INVALIDATION_GROUP = "catalog-cache"

REPRESENTATION = "r1"
_PARSED_SIZE = 1024


def product_tags(product_id: str) -> str:
    """The `Surrogate-Key` of a product's public responses: the product's own tag, and the
    catalog-wide one (a CDN purges one product, or every catalog response at once)."""
    return f"product:{product_id} products"


def category_tag(category: str) -> str:
    """The `Surrogate-Key` tag of a category's cached first pages (purged by `ProductCache.purge`)."""
    return f"category:{category}"


# The catalog's change stamp (`CatalogService.change_stamp`), cached like any entry: every page key
# embeds it, and every product invalidation drops it, so the next page read finds a new stamp and
# none of the pages cached before the change.
_PAGES_STAMP = f"pages:{REPRESENTATION}:stamp"


class CachedPage:
    """A cached category first page: the body's bytes, its strong ETag (a hash of exactly those bytes)
    and `Surrogate-Key` (the catalog, the category, and each product shown), computed once per body."""

    __slots__ = ("body", "etag", "surrogate_key")

    def __init__(self, body: bytes, category: str) -> None:
        self.body = body
        self.etag = content_etag(body)
        shown = " ".join(f"product:{item['id']}" for item in orjson.loads(body)["items"])
        self.surrogate_key = f"products {category_tag(category)}" + (f" {shown}" if shown else "")


class CachedProduct:
    """A product as cached: the v1 body, the two fields the edge needs without parsing more, and the
    answer's validators (`ETag`, `Surrogate-Key`), rendered once per stored body, not per request."""

    __slots__ = ("body", "etag", "id", "surrogate_key", "version")

    def __init__(self, body: bytes) -> None:
        self.body = body
        head = orjson.loads(body)
        self.id: str = head["id"]
        self.version: int = head["version"]
        self.etag = VersionTag("product", self.id, self.version, "v1").render()
        self.surrogate_key = product_tags(self.id)

    def as_dict(self) -> dict[str, object]:
        return dict(orjson.loads(self.body))


class ProductCache:
    def __init__(self, catalog: CatalogService, cache: Cache, *, render: Callable[[Product], bytes]) -> None:
        """`render`: the v1 body of a product (the routes' `product_dict`, as JSON bytes)."""
        self._catalog = catalog
        self.cache = cache
        self._render = render
        self._parsed: dict[bytes, CachedProduct] = {}
        self._ids: dict[str, tuple[uuid.UUID, str]] = {}
        self._pages: dict[bytes, CachedPage] = {}

    @staticmethod
    def key(product_id: uuid.UUID) -> str:
        return f"product:{REPRESENTATION}:{product_id}"

    async def get_text(self, raw: str) -> CachedProduct:
        """`get` for the id as a client wrote it: its parse and cache key are memoised (bounded), as
        they cost a hit more than the lookup. `ProductNotFound` for text that is no id."""
        found = self._ids.get(raw)
        if found is None:
            parsed = parse_id(raw)
            if parsed is None:
                raise ProductNotFound(f"product {raw} not found")
            if len(self._ids) >= _PARSED_SIZE:
                self._ids.clear()
            found = self._ids[raw] = (parsed, self.key(parsed))
        return await self.get(*found)

    async def get(self, product_id: uuid.UUID, key: str | None = None) -> CachedProduct:
        """The live product's cached body; `ProductNotFound` (also from a cached "not found")."""

        async def load() -> bytes | None:
            try:
                product = await self._catalog.get(product_id)
            except ProductNotFound:
                return None
            return self._render(product)

        body = await self.cache.get(key or self.key(product_id), load)
        if body is None:
            raise ProductNotFound(f"product {product_id} not found")
        # A hit returns the very bytes object stored (whose hash Python keeps): its parsed head is
        # looked up, not parsed again. Bounded; emptied when full.
        parsed = self._parsed.get(body)
        if parsed is None:
            if len(self._parsed) >= _PARSED_SIZE:
                self._parsed.clear()
            parsed = self._parsed[body] = CachedProduct(body)
        return parsed

    async def page(
        self, category: str, sort: str, limit: int, load: Callable[[], Awaitable[bytes]]
    ) -> CachedPage:
        """A category's first page (`load` renders it from the primary on a miss), under a key that
        names the catalog's current change stamp: any product change makes every cached page
        unreachable at once (a change may move a product into or out of any category's page)."""
        stamp = await self.cache.get(_PAGES_STAMP, self._stamp)
        key = f"page:{REPRESENTATION}:{stamp.decode('ascii') if stamp else '-'}:{category}:{sort}:{limit}"
        body = await self.cache.get(key, load)
        if body is None:  # `load` never answers "not found"; an entry that says so is not ours
            body = await load()
        page = self._pages.get(body)
        if page is None:
            if len(self._pages) >= _PARSED_SIZE:
                self._pages.clear()
            page = self._pages[body] = CachedPage(body, category)
        return page

    async def _stamp(self) -> bytes:
        return (await self._catalog.change_stamp()).encode("ascii")

    async def invalidate(self, product_id: uuid.UUID, *, source: str = "write") -> None:
        """Drop the product's entry and the pages' stamp (every cached category page with it). The
        stamp goes first: a page read between the two already misses."""
        await self.cache.invalidate(_PAGES_STAMP, source=source)
        await self.cache.invalidate(self.key(product_id), source=source)

    async def purge(self, *, keys: list[str], tags: list[str]) -> int:
        """The edge's purge (POST /admin/cache/purge): cache keys as given, and the tags of
        `product_tags` (`product:<id>` one product and every cached page, `products` all of them) and
        `category_tag` (`category:<name>`: every cached page). Returns how many were
        invalidated; unknown tags are ignored (a CDN sends every tag it holds)."""
        done = 0
        for key in keys:
            await self.cache.invalidate(key, source="purge")
            done += 1
        for tag in tags:
            if tag == "products":
                await self.cache.invalidate_all(source="purge")
                done += 1
            elif tag.startswith("category:"):
                # Pages are keyed by the catalog's stamp, not by category: dropping it drops them all.
                await self.cache.invalidate(_PAGES_STAMP, source="purge")
                done += 1
            elif tag.startswith("product:"):
                try:
                    product_id = uuid.UUID(tag.removeprefix("product:"))
                except ValueError:
                    continue
                await self.invalidate(product_id, source="purge")
                done += 1
        return done

    def invalidation_consumer(
        self, db: Database, stream: Stream, *, name: str, hook: MessagingHook | None = None
    ) -> Consumer:
        """The durable invalidation path: `mercato.catalog.product_changed` from the stream (one
        group; with a Redis tier its `invalidate` reaches every process through the bus). A failure
        (Redis down) nacks the event, so it is retried until the shared copy is really gone."""

        async def handle(_conn: AsyncConnection, message: Message) -> None:
            if message.type == PRODUCT_CHANGED:
                await self.invalidate(uuid.UUID(str(message.data["product_id"])), source="event")

        return Consumer(
            db, stream, topic=TOPIC, group=INVALIDATION_GROUP, name=name, handler=handle, hook=hook
        )
