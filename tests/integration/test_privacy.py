"""Personal data sealed per customer, erasure by crypto-shredding, export, the staff audit log."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, text, update
from sqlalchemy.exc import DBAPIError

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.config import PrivacySettings
from mercato.kit.clock import ManualClock
from mercato.kit.messaging import SqlLogStream
from mercato.kit.privacy import FieldUnreadable, MasterKey
from mercato.kit.privacy.tables import audit_log
from mercato.kit.storage.migrations import upgrade
from mercato.shop.identity.tables import users
from tests.conftest import TEST_SECRET, make_settings
from tests.integration.shop_support import admin, api, product
from tests.integration.test_payments import paid_and_refunded

PASSWORD = "correct horse battery"


async def _sign_up(http: httpx.AsyncClient, email: str) -> dict[str, str]:
    created = await http.post(
        "/v1/auth/register", json={"email": email, "password": PASSWORD, "display_name": "Ada Lovelace"}
    )
    assert created.status_code == 201, created.text
    login = await http.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def test_personal_fields_are_stored_sealed_and_found_by_a_keyed_hash(container: Container) -> None:
    async with api(container) as http:
        headers = await _sign_up(http, "Ada@Example.com")
        me = (await http.get("/v1/me", headers=headers)).json()
    assert me["email"] == "ada@example.com"
    assert me["display_name"] == "Ada Lovelace"
    async with container.db.read() as conn:
        row = (await conn.execute(select(users).where(users.c.id == uuid.UUID(me["id"])))).one()
    # Nothing in the row reads as the address or the name (the plaintext columns are gone, 0028).
    assert "email" not in row._mapping
    stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    assert b"ada@example.com" not in stored
    assert b"Lovelace" not in stored
    assert row.email_lookup == MasterKey(TEST_SECRET).lookup_hash("email", "ada@example.com")
    # The lookup hash still makes addresses unique, case-insensitively.
    async with api(container) as http:
        again = await http.post("/v1/auth/register", json={"email": "ADA@example.com", "password": PASSWORD})
        assert again.status_code == 409, again.text


async def test_erasure_shreds_the_key_so_every_copy_is_unreadable_and_orders_keep_their_facts(
    container: Container, clock: ManualClock
) -> None:
    await product(container, "PRIV-1", 1_999)
    async with api(container) as http:
        headers = await _sign_up(http, "grace@example.com")
        me = (await http.get("/v1/me", headers=headers)).json()
    customer_id = uuid.UUID(me["id"])
    await container.cart.set_item(customer_id, "PRIV-1", 1)
    order = await container.checkout.start(customer_id, correlation_id=str(uuid.uuid4()))
    stream = SqlLogStream(container.db, partitions=1, clock=clock)
    await stream.publish(paid_and_refunded(str(order.id)))
    await container.payments.consumer(stream).run_once()
    async with container.db.read() as conn:
        copy = (await conn.execute(select(users).where(users.c.id == customer_id))).one()  # "a backup"

    async with api(container) as http:
        export = await http.get("/v1/me/export", headers=headers)
        assert export.status_code == 200, export.text
        body = export.json()
        assert body["account"]["email"] == "grace@example.com"
        assert [o["id"] for o in body["orders"]] == [str(order.id)]
        assert body["orders"][0]["lines"][0]["sku"] == "PRIV-1"
        assert body["orders"][0]["payment_events"], body["orders"][0]
        assert export.headers["cache-control"].startswith("private")

        erased = await http.delete("/v1/me", headers=headers)
        assert erased.status_code == 204, erased.text
        # The session is over and the address can sign up afresh.
        assert (await http.get("/v1/me", headers=headers)).status_code == 401
        login = await http.post("/v1/auth/login", json={"email": "grace@example.com", "password": PASSWORD})
        assert login.status_code == 401
        staff = await admin(container)
        after = await http.get(f"/admin/customers/{customer_id}/export", headers=staff)
        assert after.status_code == 200, after.text
        assert after.json()["account"]["email"] == ""
        assert after.json()["account"]["display_name"] == ""
        # Orders keep their financial facts under the customer id.
        assert after.json()["orders"][0]["total_minor"] == 1_999
        assert (
            await http.post("/v1/auth/register", json={"email": "grace@example.com", "password": PASSWORD})
        ).status_code == 201

    # The copy taken before erasure holds only sealed bytes, and no key opens them any more.
    assert container.keyring is not None
    assert await container.keyring.get(customer_id) is None
    assert await container.keyring.erased(customer_id)
    with pytest.raises(FieldUnreadable):
        MasterKey(TEST_SECRET).new_data_key(customer_id).open("email", copy.email_sealed)


async def test_a_keyring_of_its_own_keeps_erasure_through_a_restored_backup(tmp_path: Path) -> None:
    """With the keyring in its own database, a backup of the shop's database holds no key: restoring
    it after an erasure brings back sealed bytes nobody can read."""
    shop_url = f"sqlite+aiosqlite:///{tmp_path / 'shop.db'}"
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, shop_url)
    settings = make_settings(
        shop_url, privacy=PrivacySettings(keyring_url=f"sqlite+aiosqlite:///{tmp_path / 'keyring.db'}")
    )
    container = build_container(settings)
    try:
        assert container.keyring is not None
        await container.keyring.ensure_schema()
        user = await container.identity.register("lin@example.com", PASSWORD, "Lin")
        await container.db.dispose()
        shutil.copy(tmp_path / "shop.db", tmp_path / "backup.db")  # the nightly backup
        assert await container.identity.erase(user.id, requested_by="test")
    finally:
        await container.close()
    shutil.copy(tmp_path / "backup.db", tmp_path / "shop.db")  # restored after the erasure
    container = build_container(settings)
    try:
        restored = await container.identity.get(user.id)
        assert restored is not None
        assert (restored.email, restored.display_name) == ("", "")  # the row is back, unreadable
        async with container.db.read() as conn:
            sealed = (
                await conn.execute(select(users.c.email_sealed).where(users.c.id == user.id))
            ).scalar_one()
        assert sealed is not None
    finally:
        await container.close()


def test_a_data_key_opens_only_its_own_subjects_fields() -> None:
    master = MasterKey(TEST_SECRET)
    alice, bob = master.new_data_key(uuid.uuid4()), master.new_data_key(uuid.uuid4())
    sealed = alice.seal("email", "alice@example.com")
    assert alice.open("email", sealed) == "alice@example.com"
    for wrong in (lambda: bob.open("email", sealed), lambda: alice.open("display_name", sealed)):
        with pytest.raises(FieldUnreadable):
            wrong()
    wrapped = master.wrap(alice)
    assert master.unwrap(alice.subject_id, wrapped) == alice
    with pytest.raises(FieldUnreadable):
        master.unwrap(bob.subject_id, wrapped)  # a wrapped key moved onto another subject
    with pytest.raises(FieldUnreadable):
        MasterKey("another-secret-of-at-least-32-characters").unwrap(alice.subject_id, wrapped)


async def test_staff_actions_are_audited_and_the_log_cannot_be_rewritten(container: Container) -> None:
    staff = await admin(container)
    async with api(container) as http:
        sagas = await http.get("/admin/sagas", headers=staff)
        assert sagas.status_code == 200, sagas.text
        missing = uuid.uuid4()
        assert (await http.delete(f"/admin/customers/{missing}", headers=staff)).status_code == 404
        log = await http.get("/admin/audit-log", headers=staff, params={"limit": 10})
        assert log.status_code == 200, log.text
    entries = log.json()["items"]
    resources = [e["resource"] for e in entries]
    assert f"/admin/customers/{{customer_id}} customer_id={missing}" in resources
    assert "/admin/sagas" in resources
    erase_entry = next(e for e in entries if e["action"] == "DELETE")
    assert erase_entry["subject_id"] == str(missing)
    assert "users:write" in erase_entry["scopes"]
    # Append-only in the database itself: no update, no delete of a young row.
    for statement in (
        update(audit_log).values(actor="someone-else"),
        text("DELETE FROM audit_log"),
    ):
        with pytest.raises(DBAPIError):
            async with container.db.write() as conn:
                await conn.execute(statement)
    async with container.db.read() as conn:
        kept = (await conn.execute(select(audit_log.c.id).where(audit_log.c.actor == "someone-else"))).all()
    assert kept == []


async def test_the_retention_job_purges_only_audit_rows_past_the_period(container: Container) -> None:
    from datetime import UTC, datetime, timedelta

    from mercato.kit.clock import SystemClock
    from mercato.kit.privacy import AuditLog
    from mercato.workers.jobs import shop_jobs

    now = datetime.now(UTC)
    actor = f"retention-{uuid.uuid4().hex[:8]}"
    async with container.db.write() as conn:
        for age_days in (401, 10):
            await conn.execute(
                audit_log.insert().values(
                    id=uuid.uuid4(),
                    at=now - timedelta(days=age_days),
                    actor=actor,
                    action="GET",
                    resource="/admin/sagas",
                    scopes="orders:read_all",
                )
            )
    assert "purge_audit_log" in {job.name for job in shop_jobs(container)}
    purger = AuditLog(container.db, SystemClock(), audited_scopes=frozenset(), retention_days=400)
    assert await purger.purge() >= 1
    left = await purger.entries(actor=actor)
    assert [round((now - e.at).total_seconds() / 86400) for e in left] == [10]


async def test_expired_refresh_tokens_and_old_notifications_are_purged(
    container: Container, clock: ManualClock
) -> None:
    from mercato.shop.identity.tables import refresh_tokens
    from mercato.shop.notifications.service import purge_settled
    from mercato.shop.notifications.tables import notifications

    async with api(container) as http:
        await _sign_up(http, "kept@example.com")
    async with container.db.write() as conn:
        for status in ("sent", "pending"):
            await conn.execute(
                notifications.insert().values(
                    id=uuid.uuid4(),
                    event_id=uuid.uuid4(),
                    event_type="mercato.orders.order_completed",
                    channel="email",
                    order_id=uuid.uuid4(),
                    recipient="customer:x",
                    subject="s",
                    body="b",
                    status=status,
                    created_at=clock.now(),
                )
            )
    assert await container.identity.purge_refresh_tokens() == 0
    assert await purge_settled(container.db, container.clock, kept_days=90) == 0
    clock.advance(container.settings.auth.refresh_ttl_s + 91 * 86_400)
    assert await container.identity.purge_refresh_tokens() == 1
    assert await purge_settled(container.db, container.clock, kept_days=90) == 1  # the pending one stays
    async with container.db.read() as conn:
        assert (await conn.execute(select(refresh_tokens))).all() == []
        assert [r.status for r in (await conn.execute(select(notifications))).all()] == ["pending"]


async def test_every_sweep_purge_and_watch_runs_once_across_workers(container: Container) -> None:
    from mercato.workers.jobs import shop_jobs

    sweeps = [
        job
        for job in shop_jobs(container)
        if job.name.startswith(("purge_", "trim_", "expire_", "reconcile", "watch_"))
    ]
    assert {"purge_audit_log", "purge_refresh_tokens", "purge_notifications", "purge_chat_history"} <= {
        job.name for job in sweeps
    }
    assert [job.name for job in sweeps if not job.singleton] == []
