"""The identity service on both real backends: accounts, password hashing, refresh-token families."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.bootstrap import SCRIPT_LOCATION, Container
from mercato.cli.main import app as cli_app
from mercato.config import AuthSettings, get_settings
from mercato.demo.seed import SeedReport, seed_accounts
from mercato.kit.clock import ManualClock
from mercato.kit.storage.migrations import upgrade
from mercato.shop.identity.contracts import Role
from mercato.shop.identity.model import (
    EmailTaken,
    InvalidCredentials,
    InvalidRefreshToken,
    TokenStatus,
    WeakPassword,
)
from mercato.shop.identity.service import IdentityService, TokenPair
from tests.conftest import TEST_SECRET

PASSWORD = "correct horse battery"


async def _login(container: Container, email: str = "ada@example.com") -> TokenPair:
    return await container.identity.login(email, PASSWORD)


async def test_register_login_and_me(container: Container) -> None:
    user = await container.identity.register("  Ada@Example.com ", PASSWORD, "Ada")
    assert user.email == "ada@example.com"
    assert user.role is Role.CUSTOMER
    assert user.password_hash.startswith("$argon2id$")
    assert PASSWORD not in user.password_hash
    pair = await _login(container, "ADA@example.COM")
    assert pair.token_type == "bearer"
    assert pair.expires_in == container.settings.auth.access_ttl_s
    principal = container.token_codec.verify(pair.access_token)
    assert principal.roles == {"customer"}
    me = await container.identity.me(principal)
    assert me.id == user.id


async def test_duplicate_email_is_a_conflict_whatever_the_case(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    with pytest.raises(EmailTaken):
        await container.identity.register("ADA@EXAMPLE.COM", PASSWORD)


async def test_concurrent_sign_ups_for_one_address_create_one_account(container: Container) -> None:
    results = await asyncio.gather(
        *(container.identity.register("race@example.com", PASSWORD) for _ in range(4)),
        return_exceptions=True,
    )
    assert sum(1 for r in results if not isinstance(r, BaseException)) == 1
    assert all(isinstance(r, EmailTaken) for r in results if isinstance(r, BaseException))
    assert await container.identity.count() == 1


async def test_weak_password_is_refused_before_anything_is_stored(container: Container) -> None:
    with pytest.raises(WeakPassword):
        await container.identity.register("ada@example.com", "short")
    assert await container.identity.count() == 0


async def test_unknown_email_and_wrong_password_fail_the_same_way(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    with pytest.raises(InvalidCredentials) as unknown:
        await container.identity.login("nobody@example.com", PASSWORD)
    with pytest.raises(InvalidCredentials) as wrong:
        await container.identity.login("ada@example.com", "wrong password!")
    with pytest.raises(InvalidCredentials) as malformed:
        await container.identity.login("not an email", PASSWORD)
    assert unknown.value.detail == wrong.value.detail == malformed.value.detail


async def test_disabled_user_cannot_log_in_or_refresh(container: Container) -> None:
    user = await container.identity.register("ada@example.com", PASSWORD)
    pair = await _login(container)
    await container.identity.set_disabled(user.id, disabled=True)
    with pytest.raises(InvalidCredentials):
        await _login(container)
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(pair.refresh_token)


async def test_login_rehashes_when_the_cost_parameters_changed(container: Container) -> None:
    user = await container.identity.register("ada@example.com", PASSWORD)
    assert "m=8192,t=1" in user.password_hash
    stronger = IdentityService(
        container.db,
        container.clock,
        container.token_codec,
        AuthSettings(secret=TEST_SECRET, argon2_time_cost=2, argon2_memory_kib=16384),  # type: ignore[arg-type]
        keyring=container.keyring,
    )
    await stronger.login("ada@example.com", PASSWORD)
    rehashed = await container.identity.get(user.id)
    assert rehashed is not None
    assert "m=16384,t=2" in rehashed.password_hash
    # The new hash still verifies, through either service.
    await container.identity.login("ada@example.com", PASSWORD)


async def test_refresh_rotates_within_the_family(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    first = await _login(container)
    second = await container.identity.refresh(first.refresh_token)
    assert second.refresh_token != first.refresh_token
    family = await container.identity.refresh_family(second.refresh_token)
    assert [t.status for t in family] == [TokenStatus.ROTATED, TokenStatus.ACTIVE]
    assert family[0].replaced_by == family[1].id
    assert family[0].rotated_at == container.clock.now()
    assert len({t.family_id for t in family}) == 1
    third = await container.identity.refresh(second.refresh_token)
    assert container.token_codec.verify(third.access_token).roles == {"customer"}


async def test_reusing_a_rotated_token_revokes_the_whole_family(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    first = await _login(container)
    second = await container.identity.refresh(first.refresh_token)
    third = await container.identity.refresh(second.refresh_token)
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(first.refresh_token)
    family = await container.identity.refresh_family(third.refresh_token)
    assert len(family) == 3
    assert {t.status for t in family} == {TokenStatus.REVOKED}
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(third.refresh_token)


async def test_other_logins_survive_a_family_revocation(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    phone = await _login(container)
    laptop = await _login(container)
    await container.identity.refresh(phone.refresh_token)
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(phone.refresh_token)
    assert (await container.identity.refresh(laptop.refresh_token)).access_token


async def test_concurrent_refreshes_with_one_token_let_exactly_one_win(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    pair = await _login(container)
    results = await asyncio.gather(
        *(container.identity.refresh(pair.refresh_token) for _ in range(5)), return_exceptions=True
    )
    winners = [r for r in results if isinstance(r, TokenPair)]
    assert len(winners) == 1
    assert all(isinstance(r, InvalidRefreshToken) for r in results if not isinstance(r, TokenPair))
    # The losers presented a token that had just been rotated: that is reuse, so the family goes.
    family = await container.identity.refresh_family(winners[0].refresh_token)
    assert {t.status for t in family} == {TokenStatus.REVOKED}


async def test_expired_refresh_token_is_refused(container: Container, clock: ManualClock) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    pair = await _login(container)
    clock.advance(container.settings.auth.refresh_ttl_s)
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(pair.refresh_token)


async def test_unknown_refresh_token_is_refused(container: Container) -> None:
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh("never-issued")


async def test_logout_revokes_the_family_and_is_idempotent(container: Container) -> None:
    await container.identity.register("ada@example.com", PASSWORD)
    first = await _login(container)
    second = await container.identity.refresh(first.refresh_token)
    await container.identity.logout(second.refresh_token)
    await container.identity.logout(second.refresh_token)
    await container.identity.logout("never-issued")
    with pytest.raises(InvalidRefreshToken):
        await container.identity.refresh(second.refresh_token)
    family = await container.identity.refresh_family(second.refresh_token)
    assert {t.status for t in family} == {TokenStatus.REVOKED}


async def test_seeded_accounts_log_in_with_the_reported_passwords(container: Container) -> None:
    report = SeedReport()
    await seed_accounts(container, report)
    seed = container.settings.seed
    assert [row[0] for row in report.credentials] == ["admin"] + ["customer"] * seed.customers
    for role, email, password in report.credentials:
        pair = await container.identity.login(email, password)
        assert container.token_codec.verify(pair.access_token).roles == {role}
    again = SeedReport()
    await seed_accounts(container, again)
    assert again.credentials == []
    assert await container.identity.count() == 1 + seed.customers


@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A migrated SQLite file of its own, and settings that the CLI reads from the environment."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    upgrade(SCRIPT_LOCATION, url)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MERCATO_DATABASE_URL", url)
    monkeypatch.setenv("MERCATO_AUTH_ARGON2_TIME_COST", "1")
    monkeypatch.setenv("MERCATO_AUTH_ARGON2_MEMORY_KIB", "8192")
    get_settings.cache_clear()
    try:
        yield url
    finally:
        get_settings.cache_clear()


def test_cli_create_admin_then_refuse_a_taken_email(cli_env: str) -> None:
    runner = CliRunner()
    args = ["users", "create-admin", "--email", "Root@Example.com", "--json"]
    created = runner.invoke(cli_app, [*args, "--password", "an admin password"])
    assert created.exit_code == 0, created.output
    assert '"role": "admin"' in created.stdout
    taken = runner.invoke(cli_app, [*args, "--password", "another password"])
    assert taken.exit_code == 1
    assert "already exists" in taken.output


def test_cli_create_admin_prompts_for_the_password_and_applies_the_policy(cli_env: str) -> None:
    runner = CliRunner()
    args = ["users", "create-admin", "--email", "ops@example.com"]
    prompted = runner.invoke(cli_app, args, input="prompted password\nprompted password\n")
    assert prompted.exit_code == 0, prompted.output
    assert "prompted password" not in prompted.output
    weak = runner.invoke(
        cli_app, ["users", "create-admin", "--email", "b@example.com", "--password", "short"]
    )
    assert weak.exit_code == 2
    assert "at least 10 characters" in weak.output
