"""The operator console in a real browser (Playwright driving Debian's Chromium) against `mercato up`:
log in as staff, watch a checkout's saga appear and complete, switch the PSP into an outage and watch
its breaker open, replay a dead letter. Screenshots go to the test's tmp folder."""

from __future__ import annotations

import asyncio
import shutil
import time
import uuid
from collections.abc import Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from mercato.config import DatabaseSettings, Environment, SeedSettings, Settings
from mercato.demo.seed import demo_accounts
from mercato.kit.messaging import DeadLetterStatus, Message
from tests.e2e.conftest import start_mercato

pytestmark = pytest.mark.e2e

CHROMIUM = "/usr/bin/chromium"
T = TypeVar("T")
playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture
def console_shop(tmp_path: Path) -> Iterator[tuple[str, str]]:
    url = f"sqlite+aiosqlite:///{tmp_path}/console.db"
    proc, base_url, _ = start_mercato(
        tmp_path,
        ["up"],
        {
            "MERCATO_DATABASE_URL": url,
            "MERCATO_SEED_PRODUCTS": "60",
            # A poison message dies at its first failure; the PSP's breaker trips after 4 calls.
            "MERCATO_MESSAGING_MAX_ATTEMPTS": "1",
            "MERCATO_CHECKOUT_BREAKER_MINIMUM_CALLS": "4",
            "MERCATO_CHECKOUT_PROVIDER_ATTEMPTS": "2",
        },
    )
    try:
        yield base_url, url
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _checkout(client: httpx.Client, customer: dict[str, str], admin: dict[str, str]) -> str:
    products = client.get("/v1/products", params={"limit": 60}).json()["items"]
    sku = next(
        p["sku"]
        for p in products
        if client.get(f"/v1/inventory/{p['sku']}", headers=admin).json()["available"] > 0
    )
    client.delete("/v1/carts/me", headers=customer)
    put = client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=customer)
    assert put.status_code == 200, put.text
    accepted = client.post("/v1/checkout", headers={**customer, "Idempotency-Key": uuid.uuid4().hex})
    assert accepted.status_code == 202, accepted.text
    return str(accepted.json()["order_id"])


def _sync(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion in a thread of its own (Playwright's sync API owns this one's loop)."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _poison(url: str) -> uuid.UUID:
    """An order event the notifications consumer cannot read: it dies at once (max attempts 1)."""
    from mercato.bootstrap import build_container

    container = build_container(Settings(env=Environment.TEST, database=DatabaseSettings(url=url)))
    try:
        message = Message(
            id=uuid.uuid4(),
            source="tests/console",
            type="mercato.orders.order_completed",
            subject=str(uuid.uuid4()),
            time=datetime.now(UTC),
            data={"broken": True},
            topic="mercato.orders",
        )
        await container.stream.publish([message])
        return message.id
    finally:
        await container.close()


async def _dead_letter_state(url: str, dead_letter_id: str) -> tuple[DeadLetterStatus, int] | None:
    from mercato.bootstrap import build_container

    container = build_container(Settings(env=Environment.TEST, database=DatabaseSettings(url=url)))
    try:
        found = await container.stream.dead_letter(uuid.UUID(dead_letter_id))
        return None if found is None else (found.status, found.attempts)
    finally:
        await container.close()


@pytest.mark.skipif(shutil.which(CHROMIUM) is None, reason="Debian's chromium is not installed")
def test_console_shows_a_saga_complete_a_breaker_open_and_replays_a_dead_letter(
    console_shop: tuple[str, str], tmp_path: Path
) -> None:
    base_url, url = console_shop
    accounts = demo_accounts(SeedSettings())
    _, admin_email, admin_password = next(a for a in accounts if a[0].value == "admin")
    shots = tmp_path / "screenshots"
    shots.mkdir()
    with httpx.Client(base_url=base_url, timeout=10) as client, playwright_api.sync_playwright() as pw:

        def login(role: str) -> dict[str, str]:
            _, email, password = next(a for a in accounts if a[0].value == role)
            tokens = client.post("/v1/auth/login", json={"email": email, "password": password}).json()
            return {"Authorization": f"Bearer {tokens['access_token']}"}

        admin, customer = login("admin"), login("customer")
        # A customer's token opens no console session.
        assert client.post("/console/session", headers=customer).status_code == 403
        assert client.get("/console/events").status_code == 401

        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.goto(f"{base_url}/console")
            page.wait_for_selector("#login-form", state="visible")
            page.fill("input[name=email]", admin_email)
            page.fill("input[name=password]", admin_password)
            page.click("#login-form button[type=submit]")
            page.wait_for_function("document.getElementById('connection').textContent === 'live'")
            page.wait_for_selector("#processes li.ok")  # this process, alive
            assert "database: ok" in page.inner_text("#health")
            page.screenshot(path=str(shots / "1-logged-in.png"), full_page=True)

            # A checkout's saga appears, then completes, with its step history.
            order_id = _checkout(client, customer, admin)
            row = f'tr[data-order-id="{order_id}"]'
            page.wait_for_selector(row, timeout=30_000)
            page.wait_for_selector(f'{row}[data-status="completed"]', timeout=60_000)
            assert "mark_complete" in page.inner_text(row)
            page.screenshot(path=str(shots / "2-saga-completed.png"), full_page=True)

            # The PSP's outage switch, then checkouts: the breaker opens.
            page.click("#fault-psp-outage")
            page.wait_for_function(
                "document.querySelector('[data-fault-state=psp]')?.textContent.startsWith('OUTAGE')"
            )
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                _checkout(client, customer, admin)
                if page.query_selector('tr[data-breaker="psp"][data-state="open"]') is not None:
                    break
                time.sleep(2.0)
            page.wait_for_selector('tr[data-breaker="psp"][data-state="open"]', timeout=30_000)
            page.screenshot(path=str(shots / "3-breaker-open.png"), full_page=True)
            page.click("#fault-psp-clear")

            # A dead letter, replayed from its row.
            _sync(_poison(url))
            page.wait_for_selector('tr[data-dead-letter][data-status="dead"] button.replay', timeout=60_000)
            dead = page.query_selector('tr[data-dead-letter][data-status="dead"]')
            assert dead is not None
            dead_id = dead.get_attribute("data-dead-letter")
            assert dead_id is not None
            before = _sync(_dead_letter_state(url, dead_id))
            assert before == (DeadLetterStatus.DEAD, 1)
            with page.expect_response(
                lambda r: r.url.endswith(f"/dead-letters/{dead_id}/replay")
            ) as replayed:
                page.click(f'tr[data-dead-letter="{dead_id}"] button.replay')
            assert replayed.value.status == 200
            assert replayed.value.json() == {"queued": 1}
            # Handed back to its group: delivered again (and, still unreadable, dead again, attempt 2).
            deadline = time.monotonic() + 30
            after = before
            while time.monotonic() < deadline and after == before:
                time.sleep(0.5)
                after = _sync(_dead_letter_state(url, dead_id))
            assert after != before, after
            page.screenshot(path=str(shots / "4-dead-letter-replayed.png"), full_page=True)

            # The Lab page lists every experiment with its claim.
            page.click("button[data-tab=lab]")
            page.wait_for_selector('tr[data-lab="breaker"]')
            assert "circuit breaker" in page.inner_text('tr[data-lab="breaker"]')
            page.screenshot(path=str(shots / "5-lab.png"), full_page=True)
        finally:
            browser.close()
    assert len(list(shots.glob("*.png"))) == 5
