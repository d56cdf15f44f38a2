"""`mercato api-keys create|list|revoke` against a real database; the key it prints authenticates."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.cli.main import app
from mercato.config import get_settings
from mercato.kit.storage.migrations import upgrade

runner = CliRunner()


@pytest.fixture
def db_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    url = f"sqlite+aiosqlite:///{tmp_path}/keys.db"
    upgrade(SCRIPT_LOCATION, url)
    monkeypatch.setenv("MERCATO_DATABASE_URL", url)
    monkeypatch.setenv("MERCATO_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


async def _authenticate(secret: str) -> list[str] | None:
    container = build_container(get_settings())
    try:
        assert container.api_keys is not None
        principal = await container.api_keys.authenticate(secret)
        return None if principal is None else sorted(principal.scopes)
    finally:
        await container.close()


def test_create_list_revoke(db_url: str) -> None:
    created = runner.invoke(
        app, ["api-keys", "create", "--name", "erp", "--scope", "inventory:read", "--json"]
    )
    assert created.exit_code == 0, created.output
    issued = json.loads(created.stdout)
    assert issued["key"].startswith(issued["prefix"] + "_")
    assert asyncio.run(_authenticate(issued["key"])) == ["inventory:read"]

    listed = runner.invoke(app, ["api-keys", "list", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [k["id"] for k in json.loads(listed.stdout)] == [issued["id"]]
    assert issued["key"] not in listed.stdout

    bad_scope = runner.invoke(app, ["api-keys", "create", "--name", "x", "--scope", "users:write"])
    assert bad_scope.exit_code == 1

    revoked = runner.invoke(app, ["api-keys", "revoke", issued["id"], "--json"])
    assert revoked.exit_code == 0, revoked.output
    assert json.loads(revoked.stdout)["revoked_at"] is not None
    assert asyncio.run(_authenticate(issued["key"])) is None
