"""Fixtures for the simulated providers: their own databases (SQLite file, throwaway PostgreSQL).

The providers' databases are not the shop's: no Alembic here, the apps create their tables at startup.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn
from sqlalchemy import MetaData, text

from mercato.providers import ProviderApp
from tests.conftest import scratch_pg_database


@pytest.fixture(scope="session")
def provider_pg_url() -> Iterator[str]:
    with scratch_pg_database("providers_") as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def provider_db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'provider.db'}"
    return str(request.getfixturevalue("provider_pg_url"))


@asynccontextmanager
async def running(app: ProviderApp, metadata: MetaData) -> AsyncIterator[httpx.AsyncClient]:
    """Run the app's lifespan and talk to it in-process; empty its tables afterwards (shared PG db)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://provider") as client:
                yield client
        finally:
            await _empty(app, metadata)


async def _empty(app: ProviderApp, metadata: MetaData) -> None:
    owner = next(
        getattr(app.state, name) for name in ("psp", "carrier", "mailbox") if hasattr(app.state, name)
    )
    db = owner.db
    async with db.write() as conn:
        for table in reversed(metadata.sorted_tables):
            await conn.execute(text(f'DELETE FROM "{table.name}"'))


@asynccontextmanager
async def served(app: ProviderApp, metadata: MetaData) -> AsyncIterator[str]:
    """Serve the app on a free loopback port in this event loop (for the real HTTP clients, which
    have no in-process transport); yields its base URL and empties its tables afterwards."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started, "the provider did not start"
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await _empty(app, metadata)
        server.should_exit = True
        await serving


InProcess = Callable[[ProviderApp, MetaData], AbstractAsyncContextManager[httpx.AsyncClient]]
Served = Callable[[ProviderApp, MetaData], AbstractAsyncContextManager[str]]


@pytest.fixture
def on_a_port() -> Served:
    """`served`, as a fixture (same reason as `in_process`)."""
    return served


@pytest.fixture
def in_process() -> InProcess:
    """`running`, as a fixture, so test modules load this one as a plugin instead of importing it."""
    return running


async def warm_up(psp_url: str, carrier_url: str) -> None:
    """One read and one refused write on each simulator before a test starts its clock.

    A provider's first requests pay for its cold caches (compiled statements, models, the first
    connections); with the 0.5 s budgets the checkout tests give the shop, that first call alone
    could time out on a loaded CI machine. The write is refused (404: no such authorization /
    shipment), so no ledger entry or shipment exists afterwards.
    """
    async with httpx.AsyncClient(timeout=10.0) as client:
        (await client.get(f"{psp_url}/v1/ledger", params={"limit": 1})).raise_for_status()
        missing = await client.post(
            f"{psp_url}/v1/authorizations/auth_warm_up/capture",
            json={"amount_minor": 1},
            headers={"Idempotency-Key": str(uuid.uuid4())},
        )
        assert missing.status_code in (404, 422), missing.text
        (await client.get(f"{carrier_url}/v1/shipments", params={"limit": 1})).raise_for_status()
