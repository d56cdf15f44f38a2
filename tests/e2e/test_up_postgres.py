"""Distributed-mode storage: the same `mercato up`, pointed at PostgreSQL by one variable."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import PG_TEST_PREFIX, _pg_admin, _pg_host_part
from tests.e2e.conftest import start_mercato

pytestmark = pytest.mark.e2e


def test_up_on_postgresql_with_unchanged_code(tmp_path: Path) -> None:
    name = f"{PG_TEST_PREFIX}_e2e_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://{_pg_host_part()}/{name}"
    proc = None
    try:
        proc, base_url, _ = start_mercato(tmp_path, ["up"], {"MERCATO_DATABASE_URL": url})
        with httpx.Client(base_url=base_url, timeout=10) as client:
            page = client.get("/v1/products", params={"limit": 100, "sort": "price"}).json()
            prices = [p["price_minor"] for p in page["items"]]
            assert len(prices) == 100
            assert prices == sorted(prices)
            assert client.get("/readyz").status_code == 200
        # Embedded files are not used when a server database is configured.
        assert not (tmp_path / "var" / "mercato.db").exists()
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
