"""Products through the application cache, on both engines: cached reads and their 304s touch no
database, writes are seen at once, the stream's `product_changed` invalidates what another process
changed, Surrogate-Key tags, and the purge endpoint."""

from __future__ import annotations

import uuid

from mercato.bootstrap import Container
from mercato.kit.messaging import OutboxRelay
from mercato.shop.catalog.events import PRODUCT_CHANGED, TOPIC, ProductEvents
from mercato.shop.catalog.model import ProductChanges
from mercato.shop.catalog.service import CatalogService
from mercato.workers.jobs import shop_jobs
from tests.integration.shop_support import admin, api, customer, product
from tests.integration.statement_budget import counting


async def test_a_cached_product_and_its_304_are_answered_without_the_database(container: Container) -> None:
    item = await product(container, "CACHE-1", 1500)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        first = await client.get(url)  # the miss: loads from the database
        assert first.status_code == 200
        etag = first.headers["etag"]
        with counting(container) as tally:
            again = await client.get(url)
            revalidated = await client.get(url, headers={"If-None-Match": etag})
            v2_revalidated = await client.get(
                f"/v2/products/{item.id}", headers={"If-None-Match": f'"product.{item.id}.r1.v2"'}
            )
            v2 = await client.get(f"/v2/products/{item.id}")
        assert tally.statements == [], tally.report()
        assert again.status_code == 200
        assert again.content == first.content
        assert revalidated.status_code == 304
        assert revalidated.headers["etag"] == etag
        assert v2_revalidated.status_code == 304
        assert v2.status_code == 200
        assert v2.json()["price"] == {"amount": "15.00", "currency": "EUR"}
        assert v2.json()["status"] == "active"
        assert "version" not in v2.json()


async def test_not_found_is_cached_briefly(container: Container) -> None:
    missing = uuid.uuid4()
    async with api(container) as client:
        assert (await client.get(f"/v1/products/{missing}")).status_code == 404
        with counting(container) as tally:
            again = await client.get(f"/v1/products/{missing}")
        assert again.status_code == 404
        assert again.headers["content-type"] == "application/problem+json"
        assert tally.statements == [], tally.report()


async def test_a_write_through_the_api_is_seen_by_the_next_read(container: Container) -> None:
    item = await product(container, "CACHE-2", 1000)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        etag = (await client.get(url)).headers["etag"]
        patched = await client.patch(
            url, json={"price_minor": 900}, headers={**(await admin(container)), "If-Match": etag}
        )
        assert patched.status_code == 200, patched.text
        after = await client.get(url)
        assert after.json()["price_minor"] == 900
        assert after.headers["etag"] == patched.headers["etag"]
        archived = await client.post(f"{url}/archive", headers=(await admin(container)))
        assert archived.status_code == 200
        assert (await client.get(url)).status_code == 404


async def test_a_change_made_elsewhere_reaches_the_cache_through_the_stream(container: Container) -> None:
    """Another process (here: a second catalog service with no listeners) changes the product; only
    the outbox event, relayed and consumed by the worker's job, tells this process's cache."""
    item = await product(container, "CACHE-3", 2000)
    elsewhere = CatalogService(
        container.db, container.clock, outbox=container.outbox, events=ProductEvents(clock=container.clock)
    )
    jobs = {job.name: job for job in shop_jobs(container)}
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        assert (await client.get(url)).json()["price_minor"] == 2000
        await elsewhere.update(item.id, ProductChanges(price_minor=2500))
        assert (await client.get(url)).json()["price_minor"] == 2000  # still the cached copy
        relay = OutboxRelay(container.db, container.stream, batch_size=100, clock=container.clock)
        assert await relay.relay_once() >= 1
        assert await jobs["catalog_cache_invalidation"].run() >= 1
        assert (await client.get(url)).json()["price_minor"] == 2500


async def test_product_changes_are_published_with_their_schema(container: Container) -> None:
    item = await product(container, "CACHE-4", 300)
    await container.catalog.update(item.id, ProductChanges(price_minor=350))
    relay = OutboxRelay(container.db, container.stream, batch_size=100, clock=container.clock)
    await relay.relay_once()
    deliveries = await container.stream.read(TOPIC, "test-reader", "t", max_messages=10, block_s=0)
    events = [d.message for d in deliveries if d.message.subject == str(item.id)]
    assert [(m.type, m.data["change"], m.data["version"]) for m in events] == [
        (PRODUCT_CHANGED, "created", 1),
        (PRODUCT_CHANGED, "updated", 2),
    ]
    assert events[1].data["price_minor"] == 350
    assert events[1].dataschema is not None
    assert events[1].dataschema.endswith("product_changed/v1")


async def test_public_catalog_responses_carry_surrogate_keys(container: Container) -> None:
    item = await product(container, "CACHE-5", 100)
    async with api(container) as client:
        one = await client.get(f"/v1/products/{item.id}")
        assert one.headers["surrogate-key"] == f"product:{item.id} products"
        not_modified = await client.get(
            f"/v1/products/{item.id}", headers={"If-None-Match": one.headers["etag"]}
        )
        assert not_modified.headers["surrogate-key"] == f"product:{item.id} products"
        assert (await client.get(f"/v2/products/{item.id}")).headers["surrogate-key"] == (
            f"product:{item.id} products"
        )
        assert (await client.get("/v1/products")).headers["surrogate-key"] == "products"
        assert (await client.get("/v2/products")).headers["surrogate-key"] == "products"


async def test_purge_by_tag_drops_the_cached_product_and_is_staff_only(container: Container) -> None:
    item = await product(container, "CACHE-6", 100)
    async with api(container) as client:
        url = f"/v1/products/{item.id}"
        await client.get(url)
        _, shopper = await customer(container)
        refused = await client.post(
            "/admin/cache/purge", json={"tags": [f"product:{item.id}"]}, headers=shopper
        )
        assert refused.status_code == 403
        assert (await client.post("/admin/cache/purge", json={"tags": ["x"]})).status_code == 401
        bad = await client.post(
            "/admin/cache/purge", json={"tags": "products"}, headers=(await admin(container))
        )
        assert bad.status_code == 400  # the schema's type: 400 by ADR 0028's rule
        assert bad.headers["content-type"] == "application/problem+json"

        purged = await client.post(
            "/admin/cache/purge",
            json={"tags": [f"product:{item.id}", "unknown"]},
            headers=(await admin(container)),
        )
        assert purged.status_code == 200
        assert purged.json() == {"purged": 1}
        with counting(container) as tally:
            await client.get(url)
        assert tally.statements, "after a purge the product is loaded again"

        everything = await client.post(
            "/admin/cache/purge", json={"tags": ["products"]}, headers=(await admin(container))
        )
        assert everything.json() == {"purged": 1}
        with counting(container) as tally:
            await client.get(url)
        assert tally.statements

        key = container.product_cache.key(item.id) if container.product_cache else ""
        by_key = await client.post(
            "/admin/cache/purge", json={"keys": [key]}, headers=(await admin(container))
        )
        assert by_key.json() == {"purged": 1}
        with counting(container) as tally:
            await client.get(url)
        assert tally.statements
