"""A dependency that is down is a 503 with Retry-After, never a 500.

The API on a private PostgreSQL node that the tests stop, kill, lock, fail over and time out; on a SQLite
file another writer holds; on a private Redis that goes away.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx

from mercato.bootstrap import build_container
from mercato.cluster import PostgresNode, RedisNode
from mercato.config import DatabaseSettings, IdempotencySettings, RateLimitSettings, Settings
from mercato.gateway.app import create_app
from mercato.kit.auth import Principal
from tests.conftest import make_settings
from tests.integration.shop_support import account

App = tuple[httpx.AsyncClient, dict[str, str]]


@asynccontextmanager
async def api(settings: Settings) -> AsyncIterator[App]:
    """The app over ASGI, and an admin's headers (catalog:write)."""
    container = build_container(settings)
    app = create_app(settings, container=container, configure_logs=False)
    # A real account: the bearer guard refuses tokens whose subject does not exist.
    subject = str(await account(container, role="admin"))
    assert container.signing_keys is not None
    await container.signing_keys.ready()
    # ...made on a connection of its own: the tests decide what state the pool starts in.
    await container.db.engine.dispose()
    token = container.token_codec.issue(
        Principal(subject, frozenset({"admin"}), frozenset({"catalog:write"}))
    ).token
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            yield client, {"authorization": f"Bearer {token}"}
    finally:
        await container.close()


def pg_settings(url: str, **database: Any) -> Settings:
    settings = make_settings(url)
    return settings.model_copy(
        update={"database": DatabaseSettings(url=url, **{"pool_size": 5, "max_overflow": 0, **database})}
    )


def product(sku: str | None = None) -> dict[str, Any]:
    return {
        "sku": sku or f"OUT-{uuid.uuid4().hex[:10].upper()}",
        "name": "Outage test",
        "price_minor": 100,
        "currency": "EUR",
        "category": "tests",
    }


def assert_unavailable(
    response: httpx.Response, reason: str | tuple[str, ...] | None = None
) -> dict[str, Any]:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert int(response.headers["retry-after"]) >= 1
    body: dict[str, Any] = response.json()
    assert body["type"] == "/problems/dependency-unavailable"
    assert body["dependency"] == "database"
    if reason is not None:
        assert body["reason"] in ((reason,) if isinstance(reason, str) else reason)
    # Nothing of the driver reaches the client: no host, port or exception text.
    assert "127.0.0.1" not in response.text
    assert "Error" not in body["detail"]
    return body


async def test_a_stopped_database_is_a_503_for_reads_writes_and_readiness(
    private_pg: PostgresNode, pg_node_url: str
) -> None:
    async with api(pg_settings(pg_node_url)) as (client, admin):
        assert (await client.get("/v1/products")).status_code == 200
        assert (await client.get("/readyz")).json()["status"] == "ok"
        await asyncio.to_thread(private_pg.stop)

        # The pool's connections died with the server, then new ones are refused.
        for _ in range(3):
            assert_unavailable(await client.get("/v1/products"), ("connection-lost", "connection-refused"))
        assert_unavailable(
            await client.post("/v1/products", json=product(), headers=admin), "connection-refused"
        )
        keyed = {**admin, "Idempotency-Key": uuid.uuid4().hex}
        assert_unavailable(
            await client.post("/v1/products", json=product(), headers=keyed), "connection-refused"
        )
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        database = next(c for c in ready.json()["checks"] if c["name"] == "database")
        assert database == {**database, "ok": False, "status": "failed"}
        assert database["error"] == "database unavailable (connection-refused)"

        await asyncio.to_thread(private_pg.start)
        # It recovers by itself: no restart of the app.
        assert (await client.get("/v1/products")).status_code == 200
        assert (await client.post("/v1/products", json=product(), headers=admin)).status_code == 201
        assert (await client.get("/readyz")).status_code == 200


async def test_a_restart_under_concurrent_load_never_answers_500(
    private_pg: PostgresNode, pg_node_url: str
) -> None:
    statuses: list[int] = []
    stop = asyncio.Event()
    # The edge limiter off: during the outage every answer is a fast 503, the four loops below then
    # outran the shipped per-client rule once and the limiter's own 429 came back (a CI run).
    settings = pg_settings(pg_node_url).model_copy(update={"ratelimit": RateLimitSettings(enabled=False)})
    async with api(settings) as (client, admin):

        async def load(write: bool) -> None:
            while not stop.is_set():
                if write:
                    response = await client.post("/v1/products", json=product(), headers=admin)
                else:
                    response = await client.get("/v1/products")
                statuses.append(response.status_code)
                if response.status_code == 503:
                    assert_unavailable(response)
                await asyncio.sleep(0.005)

        tasks = [asyncio.create_task(load(write=i % 2 == 0)) for i in range(4)]
        await asyncio.sleep(0.3)
        await asyncio.to_thread(private_pg.kill)
        await asyncio.sleep(0.5)
        await asyncio.to_thread(private_pg.start)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*tasks)
    assert 500 not in statuses
    assert statuses.count(503) > 0, "the outage was seen"
    assert set(statuses) <= {200, 201, 503}
    assert statuses[-1] in (200, 201), "served again after the restart"


async def test_statement_timeout_is_a_503(private_pg: PostgresNode, pg_node_url: str) -> None:
    holder = await asyncpg.connect(private_pg.dsn("mercato"))
    try:
        async with api(pg_settings(pg_node_url, statement_timeout_s=0.3)) as (client, admin):
            async with holder.transaction():
                await holder.execute(
                    "LOCK TABLE catalog_products IN ACCESS EXCLUSIVE MODE"
                )  # a migration, say
                assert_unavailable(await client.get("/v1/products"), "statement-timeout")
                assert_unavailable(
                    await client.post("/v1/products", json=product(), headers=admin), "statement-timeout"
                )
            assert (await client.get("/v1/products")).status_code == 200
    finally:
        await holder.close()


async def test_a_read_only_primary_fails_writes_with_503_and_serves_reads(
    private_pg: PostgresNode, pg_node_url: str
) -> None:
    # What a client sees while its pool points at a demoted primary or a standby during a failover.
    async with api(pg_settings(pg_node_url)) as (client, admin):
        await asyncio.to_thread(
            private_pg.psql, "ALTER DATABASE mercato SET default_transaction_read_only = on"
        )
        try:
            assert (await client.get("/v1/products")).status_code == 200
            assert_unavailable(await client.post("/v1/products", json=product(), headers=admin), "failover")
        finally:
            await asyncio.to_thread(
                private_pg.psql, "ALTER DATABASE mercato SET default_transaction_read_only = off"
            )


async def test_a_server_shutting_down_is_a_503(private_pg: PostgresNode, pg_node_url: str) -> None:
    async with api(pg_settings(pg_node_url)) as (client, _admin):
        holder = await asyncpg.connect(private_pg.dsn("mercato"))
        try:
            await asyncio.to_thread(private_pg.stop, mode="smart", wait=False)
            await asyncio.sleep(0.2)
            body = assert_unavailable(await client.get("/v1/products"))
            assert body["reason"] in ("shutting-down", "connection-lost")
        finally:
            await holder.close()
        await asyncio.to_thread(private_pg.wait_stopped)  # the last session gone, the shutdown completes
        await asyncio.to_thread(private_pg.start)


async def test_an_exhausted_pool_is_a_503(private_pg: PostgresNode, pg_node_url: str) -> None:
    settings = pg_settings(pg_node_url, pool_size=1, max_overflow=0, pool_timeout_s=0.2)
    container = build_container(settings)
    app = create_app(settings, container=container, configure_logs=False)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = await container.db.engine.connect()
            try:
                started = time.perf_counter()
                assert_unavailable(await client.get("/v1/products"), "pool-timeout")
                assert time.perf_counter() - started < 1.0
            finally:
                await held.close()
            assert (await client.get("/v1/products")).status_code == 200
    finally:
        await container.close()


async def test_sqlite_locked_past_its_budget_is_a_503(tmp_path: Path) -> None:
    from mercato.bootstrap import SCRIPT_LOCATION
    from mercato.kit.storage.migrations import upgrade

    path = tmp_path / "mercato.db"
    url = f"sqlite+aiosqlite:///{path}"
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url)
    settings = make_settings(url).model_copy(
        update={"database": DatabaseSettings(url=url, statement_timeout_s=0.2)}
    )
    async with api(settings) as (client, admin):
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer holds the file
        try:
            assert_unavailable(await client.post("/v1/products", json=product(), headers=admin), "locked")
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await client.post("/v1/products", json=product(), headers=admin)).status_code == 201


# --- idempotency across an outage -----------------------------------------------------------------------


async def _wait_for_lock_wait(node: PostgresNode) -> None:
    for _ in range(100):
        waiting = await asyncio.to_thread(
            node.psql,
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'",
            database="mercato",
        )
        if int(waiting.strip() or 0) > 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the request never waited on the lock")


async def test_a_write_cut_off_by_the_outage_is_safe_to_retry_with_its_key(
    private_pg: PostgresNode, pg_node_url: str
) -> None:
    """The claim is taken, the handler's INSERT waits on a lock, the server goes down under it: 503 with
    `outcome: unknown`. The release of the claim fails too (the server is down); it must land once the server
    is back, so the retry with the same key runs the request (once) instead of a 409 for `lock_timeout_s`."""
    settings = pg_settings(pg_node_url).model_copy(
        update={"idempotency": IdempotencySettings(lock_timeout_s=60.0)}
    )
    body = product()
    async with api(settings) as (client, admin):
        keyed = {**admin, "Idempotency-Key": uuid.uuid4().hex}
        holder = await asyncpg.connect(private_pg.dsn("mercato"))
        tx = holder.transaction()
        await tx.start()
        await holder.execute("LOCK TABLE catalog_products IN ACCESS EXCLUSIVE MODE")
        first = asyncio.create_task(client.post("/v1/products", json=body, headers=keyed))
        await _wait_for_lock_wait(private_pg)
        await asyncio.to_thread(private_pg.stop)  # fast: every session terminated mid-transaction
        response = await first
        problem = assert_unavailable(response)
        assert problem["outcome"] == "unknown"
        await asyncio.sleep(0.5)  # the settlement keeps trying while the server is down
        await asyncio.to_thread(private_pg.start)

        started = time.perf_counter()
        retry = await _retry_until_answered(lambda: client.post("/v1/products", json=body, headers=keyed))
        assert retry.status_code == 201, retry.text
        assert time.perf_counter() - started < 20.0, "the claim sat in flight for lock_timeout_s (60 s)"
        again = await client.post("/v1/products", json=body, headers=keyed)
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
        listed = await client.get("/v1/products", params={"limit": 100, "category": "tests"})
        assert [p["sku"] for p in listed.json()["items"]].count(body["sku"]) == 1


async def _retry_until_answered(call: Callable[[], Any], *, attempts: int = 40) -> httpx.Response:
    """What a well-behaved client does: retry 409 (key in flight) and 503 after their Retry-After."""
    response: httpx.Response | None = None
    for _ in range(attempts):
        response = await call()
        if response.status_code not in (409, 503):
            return response
        await asyncio.sleep(min(float(response.headers.get("retry-after", "1")), 0.25))
    assert response is not None
    return response


# --- readiness and fail-open Redis -------------------------------------------------------------------------


def _policy(tmp_path: Path, *, fail_open: bool) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(
        "[defaults]\n"
        f"fail_open = {'true' if fail_open else 'false'}\n"
        "[[rules]]\n"
        'name = "everyone"\n'
        'dimensions = ["ip"]\n'
        'match = { path_prefix = "/v1/" }\n'
        "limit = { rate = 1000, period_s = 1, burst = 1000 }\n"
        "[[rules]]\n"
        'name = "login-ip"\n'
        'dimensions = ["ip"]\n'
        'match = { path_prefix = "/v1/auth/login", methods = ["POST"] }\n'
        "limit = { rate = 60, period_s = 60, burst = 100 }\n"
        "fail_open = false\n"
    )
    return path


def _redis_settings(url: str, redis: RedisNode, policy: Path) -> Settings:
    return make_settings(url).model_copy(
        update={
            "ratelimit": RateLimitSettings(
                backend="redis",
                redis_url=redis.url,
                policy_file=policy,
                failure_threshold=2,
                reset_timeout_s=5.0,
            )
        }
    )


async def test_a_fail_open_redis_outage_leaves_the_node_ready_and_degraded(
    sqlite_url: str, redis_node: RedisNode, tmp_path: Path
) -> None:
    async with api(_redis_settings(sqlite_url, redis_node, _policy(tmp_path, fail_open=True))) as (client, _):
        assert (await client.get("/v1/products")).status_code == 200
        assert (await client.get("/readyz")).json()["status"] == "ok"
        await asyncio.to_thread(redis_node.stop)
        served = [(await client.get("/v1/products")).status_code for _ in range(5)]
        assert served == [200] * 5, "the shop is served while Redis is down (fail-open)"
        ready = await client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["status"] == "degraded"
        check = next(c for c in ready.json()["checks"] if c["name"] == "ratelimit")
        assert (check["ok"], check["status"]) == (True, "degraded")
        assert "failing open" in check["error"]
        assert "login-ip" in check["error"], "the route-scoped fail-closed rule is named"
        await asyncio.to_thread(redis_node.start)


async def test_a_fail_closed_redis_outage_still_fails_readiness(
    sqlite_url: str, redis_node: RedisNode, tmp_path: Path
) -> None:
    async with api(_redis_settings(sqlite_url, redis_node, _policy(tmp_path, fail_open=False))) as (
        client,
        _,
    ):
        assert (await client.get("/v1/products")).status_code == 200
        await asyncio.to_thread(redis_node.stop)
        for _ in range(3):
            refused = await client.get("/v1/products")
            assert refused.status_code in (429, 503), "refused by policy, not served"
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        check = next(c for c in ready.json()["checks"] if c["name"] == "ratelimit")
        assert (check["ok"], check["status"]) == (False, "failed")
        assert "everyone" in check["error"]
