"""The notifier against the real running mail provider (SMTP on a port), on SQLite and PostgreSQL.

One mail per order outcome, none twice: the event redelivered, the provider's answer lost (the mail
stored, the sender told nothing) and the send retried with the same `Message-ID`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosmtplib
import httpx
import pytest
import uvicorn
from sqlalchemy import select, text

from mercato.bootstrap import Container, build_container
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.messaging import Message
from mercato.providers import ProviderSettings, create_mail_app
from mercato.shop.identity.contracts import Role
from mercato.shop.notifications import NotificationsService
from mercato.shop.notifications.delivery import message_id_for
from mercato.shop.notifications.model import ORDER_CANCELLED, ORDER_COMPLETED
from mercato.shop.notifications.tables import notifications
from mercato.workers import shop_jobs
from tests.conftest import make_settings
from tests.e2e.conftest import free_port
from tests.integration.statement_budget import counting
from tests.tables import emptiable_tables


@pytest.fixture
async def mail(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """The mail provider serving HTTP and SMTP on free loopback ports: `(http base url, smtp port)`."""
    app = create_mail_app(f"sqlite+aiosqlite:///{tmp_path / 'mail.db'}", smtp_port=0)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False, lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or serving.done():
            break
        await asyncio.sleep(0.02)
    assert server.started
    try:
        yield f"http://127.0.0.1:{port}", app.state.smtp.port
    finally:
        server.should_exit = True
        await serving


@pytest.fixture
async def shop(database_url: str, clock: ManualClock, mail: tuple[str, int]) -> AsyncIterator[Container]:
    settings = make_settings(database_url, providers=ProviderSettings(mail_smtp_port=mail[1]))
    settings.worker.notify_max_attempts = 3
    built = build_container(settings, clock=clock)
    try:
        yield built
    finally:
        async with built.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await built.close()


def _event(kind: str, customer_id: uuid.UUID, clock: ManualClock) -> Message:
    order_id = new_id()
    data = {
        "order_id": str(order_id),
        "customer_id": str(customer_id),
        "total_minor": 2599,
        "currency": "EUR",
    }
    return Message(
        id=new_id(),
        source="mercato/checkout",
        type=kind,
        subject=str(order_id),
        time=clock.now(),
        data=data,
        topic="mercato.orders",
    )


async def _rows(container: Container) -> list[dict[str, Any]]:
    n = notifications.c
    async with container.db.read() as conn:
        result = await conn.execute(
            select(n.id, n.subject, n.status, n.attempts, n.last_error)
            .where(n.channel == "email")
            .order_by(n.id)
        )
        return [dict(row._mapping) for row in result]


async def _notifier_pass(container: Container) -> int:
    """One pass of the running system's notifier job (as `mercato up` / `mercato worker` run it)."""
    job = next(j for j in shop_jobs(container) if j.name == "notifier")
    return await job.run()


async def test_one_mail_per_order_outcome_despite_redelivery_and_a_lost_answer(
    shop: Container, clock: ManualClock, mail: tuple[str, int]
) -> None:
    base_url, _ = mail
    email = f"buyer-{uuid.uuid4().hex[:8]}@example.com"
    customer = await shop.identity.create_user(email, "a-long-password-123", role=Role.CUSTOMER)
    service = NotificationsService(shop.db, shop.clock)
    events = [_event(ORDER_COMPLETED, customer.id, clock), _event(ORDER_CANCELLED, customer.id, clock)]
    for _ in range(2):  # every event delivered twice, as a broker redelivers
        for event in events:
            async with shop.db.write() as conn:
                await service.handle(conn, event)

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        # The provider stores each mail, then drops the connection before answering.
        (await http.put("/admin/faults", json={"lost_response_rate": 1.0})).raise_for_status()
        assert await _notifier_pass(shop) == 2
        rows = await _rows(shop)
        assert [(r["status"], r["attempts"]) for r in rows] == [("pending", 1), ("pending", 1)]
        assert all(r["last_error"] for r in rows)
        assert await _notifier_pass(shop) == 0  # not due again before its backoff

        (await http.put("/admin/faults", json={})).raise_for_status()
        clock.advance(600)
        assert await _notifier_pass(shop) == 2
        clock.advance(600)
        assert await _notifier_pass(shop) == 0  # sent is final

        rows = await _rows(shop)
        assert [(r["status"], r["attempts"], r["last_error"]) for r in rows] == [("sent", 2, None)] * 2
        received = (await http.get("/messages", params={"recipient": email})).json()["items"]
        assert sorted(m["message_id"] for m in received) == sorted(message_id_for(r["id"]) for r in rows)
        subjects = sorted(m["subject"] for m in received)
        assert len(subjects) == 2
        assert "is on its way" in subjects[0] or "is on its way" in subjects[1]
        assert any("was cancelled" in s for s in subjects)
        assert all(m["recipients"] == [email] for m in received)


async def test_transient_failures_are_retried_then_failed_and_unknown_customers_fail_at_once(
    shop: Container, clock: ManualClock, mail: tuple[str, int]
) -> None:
    base_url, _ = mail
    email = f"buyer-{uuid.uuid4().hex[:8]}@example.com"
    customer = await shop.identity.create_user(email, "a-long-password-123", role=Role.CUSTOMER)
    service = NotificationsService(shop.db, shop.clock)
    async with shop.db.write() as conn:
        await service.handle(conn, _event(ORDER_COMPLETED, customer.id, clock))
        await service.handle(conn, _event(ORDER_COMPLETED, uuid.uuid4(), clock))  # no such customer

    async with httpx.AsyncClient(base_url=base_url, timeout=10) as http:
        (await http.put("/admin/faults", json={"error_rate": 1.0})).raise_for_status()
        for _ in range(3):  # notify_max_attempts = 3
            await _notifier_pass(shop)
            clock.advance(600)
        assert await _notifier_pass(shop) == 0
        by_status = {(r["status"], r["attempts"]) for r in await _rows(shop)}
        assert by_status == {("failed", 3), ("failed", 1)}
        errors = {r["attempts"]: r["last_error"] for r in await _rows(shop)}
        assert "451" in errors[3]
        assert "no e-mail address" in errors[1]
        assert (await http.get("/messages")).json()["items"] == []


async def test_a_pass_of_k_mails_claims_and_records_them_in_one_statement_each(
    shop: Container, clock: ManualClock, mail: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    k = 6
    service = NotificationsService(shop.db, shop.clock)
    for n in range(k // 2):
        customer = await shop.identity.create_user(
            f"buyer-{n}-{uuid.uuid4().hex[:8]}@example.com", "a-long-password-123", role=Role.CUSTOMER
        )
        for kind in (ORDER_COMPLETED, ORDER_CANCELLED):
            async with shop.db.write() as conn:
                await service.handle(conn, _event(kind, customer.id, clock))
    connects = 0
    connect = aiosmtplib.SMTP.connect

    async def counted(self: aiosmtplib.SMTP, *args: Any, **kwargs: Any) -> Any:
        nonlocal connects
        connects += 1
        return await connect(self, *args, **kwargs)

    monkeypatch.setattr(aiosmtplib.SMTP, "connect", counted)

    with counting(shop) as sent:
        assert await _notifier_pass(shop) == k

    # The whole pass, whatever k and however many customers: the claim (one UPDATE ... RETURNING
    # over the due rows, behind its CTE), the k/2 customers' addresses in one read (identity's
    # users and their subject keys), the outcomes in one UPDATE. Before (session 11): identity was
    # read per mail (two statements and a transaction each) and the outcomes were an executemany
    # (one execution per row); before ADR 0055: a SELECT, an UPDATE per row to claim it, a
    # transaction per outcome.
    own = [sql.split(None, 1)[0] for sql in sent.statements if "notifications" in sql]
    assert own == ["WITH", "driver:"], sent.report()
    # Transactions: the claim's and the outcomes'; the address read's too on SQLite (PostgreSQL's
    # reads commit on their own).
    read_tx = 0 if shop.db.dialect == "postgresql" else 1
    assert (len(sent.statements), sent.transactions) == (4, 2 + read_tx), sent.report()
    # One SMTP connection for the pass's k mails (was one each).
    assert connects == 1
    assert [(r["status"], r["attempts"]) for r in await _rows(shop)] == [("sent", 1)] * k

    job = next(j for j in shop_jobs(shop) if j.name == "notifier")
    assert await job.run() == 0  # finds nothing due: the job's next passes only look
    with counting(shop) as idle:
        assert await job.run() == 0
    # One autocommitted look on the raw driver (was a read transaction through SQLAlchemy).
    assert (len(idle.statements), idle.transactions) == (1, 0), idle.report()
    assert idle.statements[0].startswith("driver: "), idle.report()
