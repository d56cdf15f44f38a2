"""What one simulated provider call costs its database: with no injected latency the idempotency
claim, the effect and the stored answer commit together (one transaction per call, was two)."""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from sqlalchemy import event

from mercato.kit.clock import ManualClock
from mercato.kit.storage.inline_sqlite import InlineConnection
from mercato.kit.storage.statements import DriverStatement
from mercato.providers import ProviderApp, create_carrier_app, create_psp_app
from mercato.providers.carrier.service import carrier_metadata
from mercato.providers.psp.service import psp_metadata

if TYPE_CHECKING:
    from tests.integration.provider_support import InProcess

pytest_plugins = ["tests.integration.provider_support"]


@contextmanager
def commits(app: ProviderApp, service: str) -> Iterator[list[int]]:
    engine: Any = getattr(app.state, service).db.engine
    sync = getattr(engine, "sync_engine", engine)
    seen: list[int] = []

    def on_commit(_conn: Any) -> None:
        seen.append(1)

    event.listen(sync, "commit", on_commit)
    try:
        yield seen
    finally:
        event.remove(sync, "commit", on_commit)


@pytest.fixture
def psp_app(provider_db_url: str) -> ProviderApp:
    return create_psp_app(provider_db_url, clock=ManualClock(), rng=random.Random(1))


@pytest.fixture
async def psp(psp_app: ProviderApp, in_process: InProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(psp_app, psp_metadata) as client:
        yield client


async def test_a_psp_call_without_latency_commits_once_and_still_replays(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    key = uuid.uuid4().hex
    body = {"order_reference": "ord-hot", "amount_minor": 700, "currency": "EUR"}
    with commits(psp_app, "psp") as authorize:
        first = await psp.post("/v1/authorizations", json=body, headers={"Idempotency-Key": key})
    assert first.status_code == 201, first.text
    assert len(authorize) == 1
    auth_id = first.json()["authorization_id"]
    with commits(psp_app, "psp") as capture:
        captured = await psp.post(
            f"/v1/authorizations/{auth_id}/capture",
            json={"amount_minor": 700},
            headers={"Idempotency-Key": key + "c"},
        )
    assert captured.status_code == 201, captured.text
    assert len(capture) == 1
    again = await psp.post("/v1/authorizations", json=body, headers={"Idempotency-Key": key})
    assert again.json() == first.json()
    assert again.headers["Idempotent-Replayed"] == "true"
    reused = await psp.post(
        "/v1/authorizations", json={**body, "amount_minor": 1}, headers={"Idempotency-Key": key}
    )
    assert reused.status_code == 422


@contextmanager
def executed(app: ProviderApp, service: str) -> Iterator[list[object]]:
    """The statement objects the service's engine executes (SQLAlchemy's `before_execute`), and
    the SQL of the registered ones the inline SQLite database sends to sqlite3 itself (ADR 0088)."""
    engine: Any = getattr(app.state, service).db.engine
    sync = getattr(engine, "sync_engine", engine)
    seen: list[object] = []

    def before(_conn: Any, clause: Any, *_args: Any) -> None:
        seen.append(clause)

    event.listen(sync, "before_execute", before)
    run = InlineConnection._run

    def sent(self: InlineConnection, prepared: DriverStatement, parameters: dict[str, Any]) -> Any:
        seen.append(prepared.sql)  # compiled once per registered statement: the same str each time
        return run(self, prepared, parameters)

    InlineConnection._run = sent  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        InlineConnection._run = run  # type: ignore[method-assign]
        event.remove(sync, "before_execute", before)


async def test_the_hot_operations_execute_statements_built_once(
    provider_db_url: str, in_process: InProcess, psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    """Authorize, capture and create shipment run the same statement objects on every call: one built
    per call (`.values(...)`, `.where(... == value)`) has its cache key made again each time (ADR 0071)."""
    rounds: list[list[object]] = []
    for n in range(2):
        with executed(psp_app, "psp") as seen:
            body = {"order_reference": f"ord-once-{n}", "amount_minor": 500, "currency": "EUR"}
            auth = await psp.post("/v1/authorizations", json=body, headers={"Idempotency-Key": f"a{n}"})
            capture = await psp.post(
                f"/v1/authorizations/{auth.json()['authorization_id']}/capture",
                json={"amount_minor": 500},
                headers={"Idempotency-Key": f"c{n}"},
            )
            assert capture.status_code == 201, capture.text
        rounds.append(seen)
    assert len(rounds[0]) == len(rounds[1]) >= 8
    assert all(a is b for a, b in zip(rounds[0], rounds[1], strict=True))
    if provider_db_url.startswith("sqlite"):
        # ADR 0088: on the inline SQLite database every one of them is sent to sqlite3 as compiled
        # once, none through SQLAlchemy's execution (which would have seen the statement object).
        assert all(isinstance(sent, str) for sent in rounds[0]), rounds[0]
    app = create_carrier_app(provider_db_url, clock=ManualClock())
    async with in_process(app, carrier_metadata) as carrier:
        shipped: list[list[object]] = []
        for n in range(2):
            with executed(app, "carrier") as seen:
                created = await carrier.post(
                    "/v1/shipments",
                    json={"order_reference": f"ord-ship-{n}", "items": [{"sku": "SKU-1", "quantity": 1}]},
                    headers={"Idempotency-Key": f"s{n}"},
                )
                assert created.status_code == 201, created.text
            shipped.append(seen)
        assert len(shipped[0]) == len(shipped[1]) >= 2
        assert all(a is b for a, b in zip(shipped[0], shipped[1], strict=True))
        if provider_db_url.startswith("sqlite"):
            assert all(isinstance(sent, str) for sent in shipped[0]), shipped[0]


async def test_a_stored_rejection_commits_once_and_replays(
    provider_db_url: str, in_process: InProcess
) -> None:
    app = create_carrier_app(provider_db_url, clock=ManualClock())
    async with in_process(app, carrier_metadata) as carrier:
        key = uuid.uuid4().hex
        with commits(app, "carrier") as cancel:
            refused = await carrier.post(
                "/v1/shipments/shp_missing/cancel", json={}, headers={"Idempotency-Key": key}
            )
        assert refused.status_code == 404, refused.text
        assert len(cancel) == 1
        replay = await carrier.post(
            "/v1/shipments/shp_missing/cancel", json={}, headers={"Idempotency-Key": key}
        )
        assert replay.status_code == 404
        assert replay.headers["Idempotent-Replayed"] == "true"


async def test_hot_operations_skip_the_route_stack_and_invalid_ones_still_get_its_answers(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    await psp.get("/healthz")  # builds the middleware stack
    edge: Any = psp_app.middleware_stack
    inner = edge.app
    routed: list[str] = []

    async def counting(scope: Any, receive: Any, send: Any) -> None:
        routed.append(str(scope["path"]))
        await inner(scope, receive, send)

    edge.app = counting
    body = {"order_reference": "ord-fast", "amount_minor": 300, "currency": "EUR"}
    placed = await psp.post("/v1/authorizations", json=body, headers={"Idempotency-Key": "k-fast"})
    assert placed.status_code == 201, placed.text
    auth_id = placed.json()["authorization_id"]
    voided = await psp.post(f"/v1/authorizations/{auth_id}/void", headers={"Idempotency-Key": "k-void"})
    assert voided.json()["status"] == "voided", voided.text
    assert routed == []
    invalid = await psp.post(
        "/v1/authorizations", json={**body, "amount_minor": -1}, headers={"Idempotency-Key": "k-bad"}
    )
    assert invalid.status_code == 422
    assert invalid.headers["content-type"].startswith("application/problem+json")
    keyless = await psp.post("/v1/authorizations", json=body)
    assert keyless.status_code == 400
    assert routed == ["/v1/authorizations", "/v1/authorizations"]


async def test_a_served_simulator_answers_in_one_write_and_still_drops_a_lost_response(
    tmp_path: Any,
) -> None:
    """Over a real socket (`provider_server`, as `mercato provider` and `mercato up` serve them): the
    API's one-write protocol (ADR 0067, here ADR 0071), no `server` header, and a lost-response fault
    still aborts the connection underneath the coalescing writer, the effect applied."""
    import asyncio
    import socket

    from mercato.kit.web.http_protocol import MercatoHttpProtocol
    from mercato.providers.faults import FaultSettings
    from mercato.providers.server import provider_server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])
    app = create_psp_app(f"sqlite:///{tmp_path}/psp.db", clock=ManualClock(), rng=random.Random(1))
    server = provider_server(app, host="127.0.0.1", port=port, graceful_shutdown_s=1, embedded=True)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(1000):  # the lifespan creates the tables, then the socket listens
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.config.http_protocol_class is MercatoHttpProtocol
        body = {"order_reference": "ord-socket", "amount_minor": 900, "currency": "EUR"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            ok = await client.post("/v1/authorizations", json=body, headers={"Idempotency-Key": "s-1"})
            assert ok.status_code == 201
            assert "server" not in ok.headers
            app.injector.update(FaultSettings(lost_response_rate=1.0))
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post("/v1/authorizations", json=body, headers={"Idempotency-Key": "s-2"})
            app.injector.update(FaultSettings())
            replayed = await client.post("/v1/authorizations", json=body, headers={"Idempotency-Key": "s-2"})
            assert (replayed.status_code, replayed.headers["idempotent-replayed"]) == (201, "true")
    finally:
        server.should_exit = True
        await task
