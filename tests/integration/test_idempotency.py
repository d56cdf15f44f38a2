"""Idempotency-Key middleware and store on real SQLite and PostgreSQL: one effect per key, whatever happens.

Each test builds a small FastAPI app whose POST handler inserts a row into a table made for these
tests, wrapped in `IdempotencyMiddleware` with a store on the container's database, and counts the
rows: the number of effects is the ground truth, not the handler's own say-so.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from sqlalchemy import Column, MetaData, String, Table, func, insert, select

import mercato.kit.idempotency.tables  # noqa: F401 - registers idempotency_keys for the container's cleanup
from mercato.bootstrap import Container
from mercato.kit.auth import Principal
from mercato.kit.clock import ManualClock
from mercato.kit.errors import registered_errors
from mercato.kit.idempotency import (
    Claimed,
    IdempotencyMiddleware,
    IdempotencyStore,
    InFlight,
    PrometheusIdempotencyMetrics,
    StoredResponse,
    idempotency_keys,
    purge_expired,
    request_fingerprint,
)
from mercato.kit.storage import Database

# The effects table lives on its own metadata: it is not part of the schema the migrations build.
_effects_metadata = MetaData()
effects = Table(
    "idempotency_test_effects",
    _effects_metadata,
    Column("id", String(32), primary_key=True),
    Column("route", String(32), nullable=False),
    Column("name", String(100), nullable=False),
)

TTL_S = 86_400.0
LOCK_S = 30.0
THING = {"name": "lamp", "colour": "green"}


class Harness:
    def __init__(self, db: Database, clock: ManualClock, *, handler_delay_s: float = 0.0) -> None:
        self.db = db
        self.clock = clock
        self.calls: Counter[str] = Counter()
        self.handler_delay_s = handler_delay_s
        self.registry = CollectorRegistry()
        self.metrics = PrometheusIdempotencyMetrics(self.registry)
        self.store = IdempotencyStore(db, clock=clock)

    async def effect(self, route: str, name: str) -> str:
        thing_id = uuid.uuid4().hex
        async with self.db.write() as conn:
            await conn.execute(insert(effects).values(id=thing_id, route=route, name=name))
        return thing_id

    async def effect_count(self) -> int:
        async with self.db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(effects))).scalar_one())

    async def key_count(self) -> int:
        async with self.db.read() as conn:
            return int((await conn.execute(select(func.count()).select_from(idempotency_keys))).scalar_one())

    def metric(self, name: str) -> float:
        return self.registry.get_sample_value(name) or 0.0

    def app(self, **options: Any) -> FastAPI:
        app = FastAPI()

        @app.post("/things", status_code=201)
        async def create_thing(payload: dict[str, Any], response: Response) -> dict[str, Any]:
            self.calls["things"] += 1
            await asyncio.sleep(self.handler_delay_s)
            thing_id = await self.effect("things", str(payload.get("name", "")))
            response.headers["Location"] = f"/things/{thing_id}"
            response.headers["ETag"] = '"1"'
            response.headers["X-Not-Replayed"] = "per-response"
            return {"id": thing_id, "name": payload.get("name")}

        @app.post("/flaky", status_code=201)
        async def flaky() -> dict[str, str]:
            self.calls["flaky"] += 1
            if self.calls["flaky"] == 1:
                raise RuntimeError("the handler crashed before committing")
            return {"id": await self.effect("flaky", "ok")}

        @app.post("/unavailable", status_code=201)
        async def unavailable() -> Any:
            self.calls["unavailable"] += 1
            if self.calls["unavailable"] == 1:
                return JSONResponse({"detail": "down"}, status_code=503, headers={"Retry-After": "1"})
            return {"id": await self.effect("unavailable", "ok")}

        @app.post("/rejected")
        async def rejected() -> JSONResponse:
            self.calls["rejected"] += 1
            return JSONResponse({"detail": "out of stock"}, status_code=422)

        @app.post("/optional", status_code=201)
        async def optional() -> dict[str, str]:
            self.calls["optional"] += 1
            return {"id": await self.effect("optional", "ok")}

        app.state.token_codec = None
        app.add_middleware(
            IdempotencyMiddleware,
            store=self.store,
            required_paths=(re.compile(r"/things(/.*)?"), "/flaky"),
            ttl_s=TTL_S,
            lock_timeout_s=LOCK_S,
            hook=self.metrics,
            **options,
        )
        return app


def client(app: FastAPI, *, ip: str = "10.0.0.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://test")


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def assert_problem(response: httpx.Response, status: int, slug: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = response.json()
    assert body["type"] == f"/problems/{slug}"
    assert body["status"] == status
    return body


@pytest.fixture
async def harness(container: Container) -> AsyncIterator[Harness]:
    async with container.db.write() as conn:
        await conn.run_sync(_effects_metadata.create_all)
    assert isinstance(container.clock, ManualClock)
    yield Harness(container.db, container.clock)
    async with container.db.write() as conn:
        await conn.execute(effects.delete())


async def test_same_key_same_body_runs_once_and_replays_the_identical_response(harness: Harness) -> None:
    headers = key()
    async with client(harness.app()) as http:
        first = await http.post("/things", json=THING, headers=headers)
        # Re-serialised with another key order and whitespace: still the same request.
        second = await http.post(
            "/things",
            content=b'{ "colour": "green",  "name": "lamp" }',
            headers={**headers, "content-type": "application/json"},
        )
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    assert second.status_code == 201
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    for name in ("location", "etag", "content-type", "content-length"):
        assert second.headers[name] == first.headers[name], name
    assert "x-not-replayed" not in second.headers
    assert harness.calls["things"] == 1
    assert await harness.effect_count() == 1
    assert harness.metric("mercato_idempotency_replays_total") == 1
    assert harness.metric("mercato_idempotency_stored_total") == 1


async def test_same_key_with_a_different_body_or_path_is_a_422(harness: Harness) -> None:
    headers = key()
    async with client(harness.app()) as http:
        assert (await http.post("/things", json=THING, headers=headers)).status_code == 201
        body = assert_problem(
            await http.post("/things", json={**THING, "colour": "red"}, headers=headers),
            422,
            "idempotency-key-reused",
        )
        assert body["instance"] == "/things"
        assert_problem(await http.post("/optional", headers=headers), 422, "idempotency-key-reused")
    assert harness.calls["things"] == 1
    assert harness.calls["optional"] == 0
    assert await harness.effect_count() == 1
    assert harness.metric("mercato_idempotency_conflicts_total") == 2


@pytest.mark.parametrize("wait", [False, True], ids=["reject", "wait"])
async def test_concurrent_duplicates_never_cause_a_second_effect(harness: Harness, wait: bool) -> None:
    harness.handler_delay_s = 0.2
    options = {"in_flight_wait_s": 10.0, "poll_interval_s": 0.02} if wait else {}
    headers = key()
    async with client(harness.app(**options)) as http:
        responses = await asyncio.gather(
            *(http.post("/things", json=THING, headers=headers) for _ in range(20))
        )
    assert harness.calls["things"] == 1
    assert await harness.effect_count() == 1
    originals = [r for r in responses if r.status_code == 201 and "idempotent-replayed" not in r.headers]
    replays = [
        r for r in responses if r.status_code == 201 and r.headers.get("idempotent-replayed") == "true"
    ]
    in_flight = [r for r in responses if r.status_code == 409]
    assert len(originals) == 1
    assert len(originals) + len(replays) + len(in_flight) == 20
    assert all(r.content == originals[0].content for r in replays)
    for response in in_flight:
        assert_problem(response, 409, "idempotency-key-in-flight")
        assert response.headers["retry-after"] == "1"
    if wait:
        assert len(replays) == 19
    else:
        assert in_flight, "with a 0.2 s handler, some duplicates must have found the key in flight"
        assert harness.metric("mercato_idempotency_in_flight_rejections_total") == len(in_flight)


async def test_keys_are_scoped_per_caller(harness: Harness, container: Container) -> None:
    app = harness.app()
    app.state.token_codec = container.token_codec
    alice = container.token_codec.issue(Principal("alice")).token
    bob = container.token_codec.issue(Principal("bob")).token
    headers = key()
    async with client(app) as http:
        as_alice = await http.post(
            "/things", json=THING, headers={**headers, "Authorization": f"Bearer {alice}"}
        )
        as_bob = await http.post("/things", json=THING, headers={**headers, "Authorization": f"Bearer {bob}"})
        again = await http.post(
            "/things", json=THING, headers={**headers, "Authorization": f"Bearer {alice}"}
        )
        # An invalid token does not borrow anyone's scope: it falls back to the client address.
        forged = await http.post("/things", json=THING, headers={**headers, "Authorization": "Bearer forged"})
    async with client(app, ip="10.0.0.2") as other:
        elsewhere = await other.post("/things", json=THING, headers=headers)
    assert [r.status_code for r in (as_alice, as_bob, again, forged, elsewhere)] == [201] * 5
    assert as_alice.json()["id"] != as_bob.json()["id"]
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == as_alice.json()
    assert "idempotent-replayed" not in forged.headers
    assert "idempotent-replayed" not in elsewhere.headers
    assert harness.calls["things"] == 4
    assert await harness.effect_count() == 4


async def test_expired_keys_no_longer_replay_and_are_purged(harness: Harness) -> None:
    first_key = key()
    async with client(harness.app()) as http:
        assert (await http.post("/things", json=THING, headers=first_key)).status_code == 201
        for _ in range(4):
            assert (await http.post("/things", json=THING, headers=key())).status_code == 201
        harness.clock.advance(TTL_S + 1)
        fresh = await http.post("/things", json=THING, headers=key())
        assert fresh.status_code == 201
        assert await harness.key_count() == 6

        removed = await purge_expired(harness.db, now=harness.clock.now(), batch=2)
        assert removed == 4 + 1  # the four old keys and the first one; the fresh key stays
        assert await harness.key_count() == 1

        rerun = await http.post("/things", json=THING, headers=first_key)
    assert rerun.status_code == 201
    assert "idempotent-replayed" not in rerun.headers
    assert harness.calls["things"] == 7


async def test_an_expired_key_is_claimed_again_even_before_the_purge(harness: Harness) -> None:
    headers = key()
    async with client(harness.app()) as http:
        await http.post("/things", json=THING, headers=headers)
        harness.clock.advance(TTL_S + 1)
        # Expired, so not even a different body is refused: the key is free again.
        rerun = await http.post("/things", json={"name": "chair"}, headers=headers)
    assert rerun.status_code == 201
    assert "idempotent-replayed" not in rerun.headers
    assert harness.calls["things"] == 2


async def test_a_handler_that_raises_releases_the_key_and_a_retry_runs_it(harness: Harness) -> None:
    headers = key()
    async with client(harness.app()) as http:
        crashed = await http.post("/flaky", headers=headers)
        assert crashed.status_code == 500
        assert await harness.key_count() == 0
        retried = await http.post("/flaky", headers=headers)
        replayed = await http.post("/flaky", headers=headers)
    assert retried.status_code == 201
    assert "idempotent-replayed" not in retried.headers
    assert replayed.headers["idempotent-replayed"] == "true"
    assert harness.calls["flaky"] == 2
    assert await harness.effect_count() == 1
    assert harness.metric("mercato_idempotency_released_total") == 1


async def test_5xx_is_released_but_a_4xx_answer_is_stored_and_replayed(harness: Harness) -> None:
    unavailable, rejected = key(), key()
    async with client(harness.app()) as http:
        assert (await http.post("/unavailable", headers=unavailable)).status_code == 503
        assert (await http.post("/unavailable", headers=unavailable)).status_code == 201
        first = await http.post("/rejected", headers=rejected)
        second = await http.post("/rejected", headers=rejected)
    assert harness.calls["unavailable"] == 2
    assert first.status_code == second.status_code == 422
    assert second.headers["idempotent-replayed"] == "true"
    assert second.content == first.content
    assert harness.calls["rejected"] == 1


async def test_a_crashed_in_flight_claim_blocks_until_its_lock_lapses_then_is_taken_over(
    harness: Harness,
) -> None:
    headers = key()
    body = b'{"name":"lamp"}'
    # A request that claimed the key and then died with its process: the row stays in flight.
    crashed = await harness.store.claim(
        scope="anon:10.0.0.1",
        key=headers["Idempotency-Key"],
        method="POST",
        path="/things",
        fingerprint=request_fingerprint(
            method="POST", path="/things", body=body, content_type="application/json"
        ),
        ttl_s=TTL_S,
        lock_timeout_s=LOCK_S,
    )
    assert isinstance(crashed, Claimed)
    send = {**headers, "content-type": "application/json"}
    async with client(harness.app()) as http:
        blocked = await http.post("/things", content=body, headers=send)
        assert_problem(blocked, 409, "idempotency-key-in-flight")
        harness.clock.advance(LOCK_S + 1)
        taken_over = await http.post("/things", content=body, headers=send)
        replayed = await http.post("/things", content=body, headers=send)
    assert taken_over.status_code == 201
    assert replayed.headers["idempotent-replayed"] == "true"
    assert harness.calls["things"] == 1
    # The crashed request, were it to wake up, no longer owns the key.
    assert not await harness.store.complete(crashed, StoredResponse(200, (), b"late"), ttl_s=TTL_S)
    assert not await harness.store.release(crashed)


async def test_a_lost_claim_cannot_overwrite_the_new_owner(harness: Harness) -> None:
    args: dict[str, Any] = {
        "scope": "sub:carol",
        "key": "k-1",
        "method": "POST",
        "path": "/things",
        "fingerprint": "f" * 64,
        "ttl_s": TTL_S,
        "lock_timeout_s": LOCK_S,
    }
    slow = await harness.store.claim(**args)
    assert isinstance(slow, Claimed)
    assert isinstance(await harness.store.claim(**args), InFlight)
    harness.clock.advance(LOCK_S + 1)
    owner = await harness.store.claim(**args)
    assert isinstance(owner, Claimed)
    assert owner.taken_over
    assert not await harness.store.complete(slow, StoredResponse(201, (), b"slow"), ttl_s=TTL_S)
    assert await harness.store.complete(
        owner, StoredResponse(201, (("content-type", "text/plain"),), b"owner"), ttl_s=TTL_S
    )
    record = await harness.store.lookup(scope="sub:carol", key="k-1")
    assert record is not None
    assert record.response == StoredResponse(201, (("content-type", "text/plain"),), b"owner")


async def test_missing_or_malformed_keys_are_400s_and_the_handler_never_runs(harness: Harness) -> None:
    async with client(harness.app()) as http:
        assert_problem(await http.post("/things", json=THING), 400, "idempotency-key-missing")
        assert_problem(await http.post("/things/sub", json=THING), 400, "idempotency-key-missing")
        for bad in (b"has space", b"k" * 256, "caf\u00e9".encode(), b"ctl\x01"):
            assert_problem(
                await http.post("/things", json=THING, headers={b"Idempotency-Key": bad}),
                400,
                "idempotency-key-malformed",
            )
        twice = await http.post(
            "/things", json=THING, headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")]
        )
        assert_problem(twice, 400, "idempotency-key-malformed")
        # Not a required path: no key, no idempotency, the handler simply runs.
        assert (await http.post("/optional")).status_code == 201
        # The draft's sf-string form names the same key as the bare form.
        quoted = await http.post("/optional", headers={"Idempotency-Key": '"abc"'})
        bare = await http.post("/optional", headers={"Idempotency-Key": "abc"})
    assert quoted.status_code == bare.status_code == 201
    assert bare.headers["idempotent-replayed"] == "true"
    assert harness.calls["things"] == 0
    assert harness.calls["optional"] == 2


def test_problem_types_are_registered_for_the_catalogue() -> None:
    slugs = set(registered_errors())
    assert {
        "idempotency-key-missing",
        "idempotency-key-malformed",
        "idempotency-key-reused",
        "idempotency-key-in-flight",
    } <= slugs
