"""The database goes down between a keyed request's commit and the storing of its response (a real private
PostgreSQL node, stopped by the handler right after its transaction commits).

The client got its 201; the idempotency row is still "in flight". A retry after the outage must replay that
201, never find the key free and run the request a second time (which is what happened once the claim's lock
lapsed, before the completion was retried in the background: ADR 0026).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import text

from mercato.cluster import PostgresNode
from mercato.kit.idempotency import IdempotencyMiddleware, IdempotencyStore
from mercato.kit.storage import Database, create_database

LOCK_S = 3.0


@pytest.fixture
async def db(private_pg: PostgresNode, pg_node_url: str) -> AsyncIterator[Database]:
    database = create_database(pg_node_url, pool_size=2, max_overflow=0)
    async with database.write() as conn:
        await conn.execute(text("CREATE TABLE IF NOT EXISTS outage_effects (id text PRIMARY KEY, name text)"))
        await conn.execute(text("DELETE FROM outage_effects"))
    try:
        yield database
    finally:
        await database.dispose()


async def _effects(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(text("SELECT count(*) FROM outage_effects"))).scalar_one())


async def test_a_response_not_stored_because_the_database_went_down_is_replayed_later(
    private_pg: PostgresNode, db: Database
) -> None:
    calls = 0
    app = FastAPI()

    @app.post("/things", status_code=201)
    async def create(payload: dict[str, Any]) -> dict[str, Any]:
        nonlocal calls
        calls += 1
        thing = uuid.uuid4().hex
        async with db.write() as conn:
            await conn.execute(
                text("INSERT INTO outage_effects VALUES (:id, :name)"), {"id": thing, "name": payload["name"]}
            )
        if calls == 1:
            # Committed. Now the database goes away before the middleware stores this response.
            await asyncio.to_thread(private_pg.stop)
        return {"id": thing}

    middleware = IdempotencyMiddleware(app, store=IdempotencyStore(db), lock_timeout_s=LOCK_S, ttl_s=3600.0)
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    transport = httpx.ASGITransport(app=middleware)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = await client.post("/things", json={"name": "lamp"}, headers=headers)
        assert first.status_code == 201, "the effect happened: the client gets its answer"
        assert middleware.settling == 1, "the completion waits for the database"
        await asyncio.sleep(0.5)
        await asyncio.to_thread(private_pg.start)

        await asyncio.sleep(LOCK_S + 0.5)  # past the claim's lock: a take-over would re-run the request
        retry = await client.post("/things", json={"name": "lamp"}, headers=headers)
    assert (retry.status_code, retry.headers.get("idempotent-replayed")) == (201, "true")
    assert retry.json() == first.json()
    assert calls == 1
    assert await _effects(db) == 1
    assert middleware.settling == 0
