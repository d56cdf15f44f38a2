"""The rollout of sealed personal fields done the safe way (ADRs 0047, 0052; docs/runbooks/release.md),
with the old release (1.0, plaintext columns only) and the new ones (1.1 dual-writing, 1.2 sealed only)
run against the database at every step: expand (0027) -> resumable batched backfill -> reads switched
by the flag `identity.read_sealed` -> contract (0028, drops the plaintext columns), which refuses while
a process that still needs them reports itself, or while an account is not sealed."""

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
from mercato.shop.identity.model import Role
from mercato.shop.identity.personal import PLAINTEXT_COLUMNS
from tests.conftest import TEST_SECRET, make_settings, scratch_pg_database

PASSWORD = "correct horse battery staple"


@pytest.fixture(params=["sqlite", "postgresql"])
def blank_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An empty database of its own (this test walks the migrations itself)."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path_factory.mktemp('hxc-ec') / 'shop.db'}"
        return
    with scratch_pg_database("ec_") as url:
        yield url


@asynccontextmanager
async def release(url: str, version: str, columns: str) -> AsyncIterator[Container]:
    settings = make_settings(
        url,
        release=ReleaseSettings(version=version, identity_personal_columns=columns),  # type: ignore[arg-type]
    )
    container = build_container(settings)
    assert container.signing_keys is not None
    await container.signing_keys.ready()  # logins sign tokens
    try:
        yield container
    finally:
        await container.close()


async def _migrate(url: str, revision: str) -> None:
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url, revision)


class Account:
    def __init__(self, user_id: uuid.UUID, email: str) -> None:
        self.id, self.email = user_id, email


async def _register(container: Container, name: str) -> Account:
    email = f"{name.lower()}-{uuid.uuid4().hex[:6]}@example.com"
    user = await container.identity.create_user(email, PASSWORD, role=Role.CUSTOMER, display_name=name)
    return Account(user.id, email)


async def _names(container: Container, *accounts: Account) -> list[str]:
    """Each account's name as this release reads it, after finding it by its address (a login)."""
    names = []
    for account in accounts:
        await container.identity.login(account.email, PASSWORD)
        user = await container.identity.get(account.id)
        assert user is not None
        assert user.email == account.email
        names.append(user.display_name)
    return names


async def _plaintext_columns(container: Container) -> set[str]:
    async with container.db.read() as conn:
        query = "SELECT * FROM identity_users LIMIT 0"
        return {"email", "display_name"} & set((await conn.execute(text(query))).keys())


async def test_sealing_by_expand_backfill_switch_contract_with_old_and_new_code_at_each_step(
    blank_url: str,
) -> None:
    url = blank_url
    await _migrate(url, "0021")
    async with release(url, "1.0", "plaintext") as old, release(url, "1.1", "dual") as dual:
        assert old.runtime is not None
        assert dual.runtime is not None
        # Before the expand: the old release is all there is.
        ada = await _register(old, "Ada")
        assert await _names(old, ada) == ["Ada"]

        # Expand (0027): both releases work side by side; the new one writes plaintext and sealed.
        await _migrate(url, "0027")
        grace = await _register(dual, "Grace")
        linus = await _register(old, "Linus")
        for container in (old, dual):
            assert await _names(container, ada, grace, linus) == ["Ada", "Grace", "Linus"]

        # Backfill, stopped after one batch and resumed: only the rows the old release wrote were
        # missing; the plaintext stays for the old release.
        assert await dual.identity.unsealed() == 2
        assert await dual.identity.seal_legacy(batch=1, max_batches=1) == 1
        assert await dual.identity.unsealed() == 1
        assert await dual.identity.seal_legacy(batch=1) == 1
        assert await dual.identity.unsealed() == 0
        assert await _names(old, ada, grace, linus) == ["Ada", "Grace", "Linus"]

        # Switch reads behind the flag. An edit only the plaintext sees shows where each reads from.
        async with old.db.write() as conn:
            stale = text("UPDATE identity_users SET display_name = 'Stale' WHERE id = :id")
            await conn.execute(stale.bindparams(bindparam("id", type_=Uuid)), {"id": ada.id})
        assert await _names(dual, ada) == ["Stale"]  # flag off: the plaintext
        flag_on = {"flags": {"identity.read_sealed": {"default_variant": "on"}}}
        await dual.runtime.store.put(flag_on, author="test")
        await dual.runtime.poll_once()
        assert await _names(dual, ada, grace, linus) == ["Ada", "Grace", "Linus"]  # flag on: sealed
        assert await _names(old, ada) == ["Stale"]  # the old release still works

        # Contract refused while processes that need the plaintext columns report themselves.
        await old.runtime.poll_once()
        reports = {r.app_version: r.needs for r in await old.runtime.store.processes(seen_within_s=30)}
        assert reports == {"1.0": PLAINTEXT_COLUMNS, "1.1": PLAINTEXT_COLUMNS}  # `mercato config processes`
        refusal = r"contract refused: 2 running process\(es\).*release 1.0"
        with pytest.raises(Exception, match=refusal) as refused:
            await _migrate(url, "0028")
        assert "release 1.1" in str(refused.value)
        assert await _names(old, linus) == ["Linus"]  # nothing changed
        assert await _plaintext_columns(old) == {"email", "display_name"}

        # The old releases stop (their reports are withdrawn), the final release runs: contract.
        await old.runtime.store.forget(old.runtime.identity.process_id)
        await dual.runtime.store.forget(dual.runtime.identity.process_id)
    async with release(url, "1.2", "sealed") as new:
        assert new.runtime is not None
        await new.runtime.poll_once()  # reports, needing nothing
        await _migrate(url, "0028")
        assert await _plaintext_columns(new) == set()
        assert await _names(new, ada, grace, linus) == ["Ada", "Grace", "Linus"]
        barbara = await _register(new, "Barbara")
        assert await _names(new, barbara) == ["Barbara"]
        # What ran at start-up and on erasure copes with the columns being gone.
        assert await new.identity.seal_at_startup() == 0
        assert await new.identity.unsealed() == 0
        assert await new.identity.erase(linus.id, requested_by="test")
        erased = await new.identity.get(linus.id)
        assert erased is not None
        assert (erased.email, erased.display_name) == ("", "")
    async with release(url, "1.0", "plaintext") as late_old:
        with pytest.raises(Exception, match="email"):  # what the guard protected against
            await _register(late_old, "Late")


async def test_contract_refuses_while_accounts_are_not_sealed_and_the_cli_backfill_finishes_them(
    blank_url: str,
) -> None:
    await _migrate(blank_url, "0027")
    async with release(blank_url, "1.0", "plaintext") as old:
        edsger = await _register(old, "Edsger")
        await _register(old, "Barbara")
        # A plaintext release's erasure clears its plaintext (no key to shred was ever made).
        assert await old.identity.erase(edsger.id, requested_by="test")
    with pytest.raises(Exception, match=r"1 account\(s\) are not sealed yet"):
        await _migrate(blank_url, "0028")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(MERCATO_DATABASE_URL=blank_url, MERCATO_AUTH_SECRET=TEST_SECRET)

    def mercato(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mercato.cli.main", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    # The operator's command says so and exits 3, changing nothing.
    refused = await asyncio.to_thread(mercato, "migrate")
    assert refused.returncode == 3, refused.stdout + refused.stderr
    assert "refused" in refused.stderr
    # The backfill command seals what is left (a progress bar on stderr), then the contract passes.
    backfill = await asyncio.to_thread(mercato, "backfill", "sealed-personal-fields", "--batch", "1")
    assert backfill.returncode == 0, backfill.stdout + backfill.stderr
    assert "1 account(s) sealed; 0 left (ready to contract)" in backfill.stderr
    contracted = await asyncio.to_thread(mercato, "migrate")
    assert contracted.returncode == 0, contracted.stdout + contracted.stderr
    async with release(blank_url, "1.2", "sealed") as new:
        assert await new.identity.unsealed() == 0
        async with new.db.read() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM identity_users"))).scalar_one()
        assert count == 2


async def test_a_sealed_release_before_the_contract_seals_at_start_up_and_erases_the_plaintext_too(
    blank_url: str,
) -> None:
    """Between the rollout of 1.2 and the contract the plaintext columns still exist: a sealed-only
    release must not leave an erased customer's plaintext copy behind, nor an unsealed row unread."""
    await _migrate(blank_url, "0027")
    async with release(blank_url, "1.0", "plaintext") as old:
        alan = await _register(old, "Alan")
    async with release(blank_url, "1.1", "dual") as dual:
        joan = await _register(dual, "Joan")
    async with release(blank_url, "1.2", "sealed") as new:
        assert await new.identity.seal_at_startup() == 1
        assert await _names(new, alan, joan) == ["Alan", "Joan"]
        assert await new.identity.erase(joan.id, requested_by="test")
        async with new.db.read() as conn:
            query = text("SELECT email, display_name FROM identity_users WHERE id = :id")
            row = (await conn.execute(query.bindparams(bindparam("id", type_=Uuid)), {"id": joan.id})).one()
        assert tuple(row) == (None, None)
