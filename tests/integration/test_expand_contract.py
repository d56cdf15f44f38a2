"""The display_name -> public_name rename done the safe way (ADR 0047, docs/runbooks/release.md),
with the old release (1.0, NameColumns.LEGACY) and the new ones (1.1 DUAL, 1.2 NEW) run against the
database at every step: expand (0022) -> resumable batched backfill -> reads switched by the flag
`identity.read_public_name` -> contract (0023), which refuses while a process that still needs the
old column reports itself."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest
from sqlalchemy import Uuid, bindparam, text

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import ReleaseSettings
from mercato.kit.storage.migrations import upgrade
from mercato.shop.identity.backfill import backfill_public_names, missing_public_names
from mercato.shop.identity.model import Role
from tests.conftest import _pg_admin, _pg_host_part, make_settings

PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database of its own (this test walks the migrations itself)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('hsp-ec') / 'shop.db'}"
        return
    name = f"hsp_ec_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    try:
        yield f"postgresql+asyncpg://{_pg_host_part()}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@asynccontextmanager
async def release(url: str, version: str, names: str) -> AsyncIterator[Container]:
    settings = make_settings(
        url,
        release=ReleaseSettings(version=version, identity_name_columns=names),  # type: ignore[arg-type]
    )
    container = build_container(settings)
    try:
        yield container
    finally:
        await container.close()


async def _migrate(url: str, revision: str) -> None:
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url, revision)


async def _name(container: Container, user_id: uuid.UUID) -> str:
    user = await container.identity.get(user_id)
    assert user is not None
    return user.display_name


async def _register(container: Container, name: str) -> uuid.UUID:
    email = f"{name.lower()}-{uuid.uuid4().hex[:6]}@example.com"
    return (await container.identity.create_user(email, PASSWORD, role=Role.CUSTOMER, display_name=name)).id


async def test_rename_by_expand_backfill_switch_contract_with_old_and_new_code_at_each_step(
    blank_url: str,
) -> None:
    url = blank_url
    await _migrate(url, "0021")
    async with release(url, "1.0", "legacy") as old, release(url, "1.1", "dual") as dual:
        assert old.runtime is not None
        assert dual.runtime is not None
        # Before the expand: the old release is all there is.
        ada = await _register(old, "Ada")
        assert await _name(old, ada) == "Ada"

        # Expand: both releases work side by side; the new one writes both columns.
        await _migrate(url, "0022")
        grace = await _register(dual, "Grace")
        linus = await _register(old, "Linus")
        for container in (old, dual):
            assert [await _name(container, u) for u in (ada, grace, linus)] == ["Ada", "Grace", "Linus"]

        # Backfill, stopped after one batch and resumed: only rows the old release wrote were missing.
        assert await missing_public_names(old.db) == 2
        assert await backfill_public_names(dual.db, batch=1, max_batches=1) == 1
        assert await missing_public_names(old.db) == 1
        assert await backfill_public_names(dual.db, batch=1) == 1
        assert await missing_public_names(old.db) == 0

        # Switch reads behind the flag. An edit only the old column sees shows where each reads from.
        async with old.db.write() as conn:
            stale = text("UPDATE identity_users SET display_name = 'Stale' WHERE id = :id")
            await conn.execute(stale.bindparams(bindparam("id", type_=Uuid)), {"id": ada})
        assert await _name(dual, ada) == "Stale"  # flag off: the old column
        await dual.runtime.store.put(
            {"flags": {"identity.read_public_name": {"default_variant": "on"}}},
            author="test",
        )
        await dual.runtime.poll_once()
        assert await _name(dual, ada) == "Ada"  # flag on: the new column
        assert await _name(old, ada) == "Stale"  # the old release still works

        # Contract refused while processes that need the old column report themselves.
        await old.runtime.poll_once()
        with pytest.raises(
            Exception, match=r"contract refused: 2 running process\(es\).*release 1.0"
        ) as refused:
            await _migrate(url, "0023")
        assert "release 1.1" in str(refused.value)
        assert await _name(old, linus) == "Linus"  # nothing changed

        # The old releases stop (their reports are withdrawn), the final release runs: contract.
        await old.runtime.store.forget(old.runtime.identity.process_id)
        await dual.runtime.store.forget(dual.runtime.identity.process_id)
    async with release(url, "1.2", "new") as new:
        assert new.runtime is not None
        await new.runtime.poll_once()
        await _migrate(url, "0023")
        assert [await _name(new, u) for u in (ada, grace, linus)] == ["Ada", "Grace", "Linus"]
        assert await _name(new, await _register(new, "Barbara")) == "Barbara"
    async with release(url, "1.0", "legacy") as late_old:
        with pytest.raises(Exception, match="display_name"):  # what the guard protected against
            await _register(late_old, "Late")


async def test_contract_refuses_while_rows_are_not_backfilled(blank_url: str) -> None:
    await _migrate(blank_url, "0022")
    async with release(blank_url, "1.0", "legacy") as old:
        await _register(old, "Edsger")
    with pytest.raises(Exception, match="have no public_name yet"):
        await _migrate(blank_url, "0023")
    # The operator's command says so and exits 3, changing nothing.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    cli = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "mercato.cli.main", "migrate"],
        env={**env, "MERCATO_DATABASE_URL": blank_url},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cli.returncode == 3, cli.stdout + cli.stderr
    assert "refused" in cli.stderr
    async with release(blank_url, "1.0", "legacy") as old:
        assert await missing_public_names(old.db) == 1
