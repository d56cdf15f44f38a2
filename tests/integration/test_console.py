"""`/console` server side: staff-only sessions from access tokens, the CSRF header on actions, the
snapshot the SSE stream sends, the lab catalogue, and the packaged assets (no CDN)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
from starlette.requests import Request

from mercato.bench.harness import RunFolder
from mercato.bootstrap import Container
from mercato.console import create_app
from mercato.console.routes import COOKIE, snapshot
from mercato.kit.messaging import Message
from tests.conftest import make_settings
from tests.integration.shop_support import admin, customer


@asynccontextmanager
async def console(container: Container, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # The Lab page reads this test's run folders, not the working directory's.
    settings = make_settings(container.settings.database.url)
    app = create_app(settings, container=container, configure_logs=False, lab_results=tmp_path)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        client.app = app  # type: ignore[attr-defined]
        yield client


async def test_only_staff_tokens_open_a_session_and_actions_need_the_console_header(
    container: Container, tmp_path: Path
) -> None:
    async with console(container, tmp_path) as client:
        page = await client.get("/console")
        assert page.status_code == 200
        assert "/console/static/console.js" in page.text
        assert "http" not in page.text.replace("http-equiv", "")  # nothing from a CDN
        assert (
            (await client.get("/console/static/console.js"))
            .headers["content-type"]
            .startswith("text/javascript")
        )
        assert (await client.get("/console/static/../app.py")).status_code == 404

        assert (await client.get("/console/events")).status_code == 401
        assert (await client.get("/console/labs")).status_code == 401
        _, buyer = await customer(container)
        assert (await client.post("/console/session", headers=buyer)).status_code == 403
        assert (
            await client.post("/console/session", headers={"Authorization": "Bearer forged"})
        ).status_code == 403

        opened = await client.post("/console/session", headers=await admin(container))
        assert opened.status_code == 200
        cookie = opened.headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}=")
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "samesite=strict" in cookie.lower()
        assert "Path=/console" in cookie

        missing = str(uuid.uuid4())
        no_header = await client.post(f"/console/dead-letters/{missing}/replay")
        assert no_header.status_code == 403
        replay = await client.post(f"/console/dead-letters/{missing}/replay", headers={"X-Console": "1"})
        assert replay.status_code == 404
        bad = await client.post("/console/dead-letters/not-a-uuid/replay", headers={"X-Console": "1"})
        assert bad.status_code == 422
        unknown = await client.put("/console/faults/bank", headers={"X-Console": "1"}, content=b"{}")
        assert unknown.status_code == 404

        closed = await client.delete("/console/session")
        assert closed.status_code == 204
        client.cookies.clear()
        assert (await client.get("/console/labs")).status_code == 401


async def test_the_lab_page_lists_every_claim_with_the_latest_result(
    container: Container, tmp_path: Path
) -> None:
    RunFolder.open("delivery", tmp_path / "delivery" / "20260101T000000Z").record(
        data={}, verdict=["consumer + inbox: 2 duplicates seen, 0 applied, 0 missing"], held=True
    )
    async with console(container, tmp_path) as client:
        await client.post("/console/session", headers=await admin(container))
        labs = {lab["name"]: lab for lab in (await client.get("/console/labs")).json()}
    assert "breaker" in labs
    assert labs["breaker"]["latest"] is None
    assert labs["delivery"]["latest"]["held"] is True
    assert "duplicates" in labs["delivery"]["claim"]


async def test_a_snapshot_shows_sagas_dead_letters_breakers_and_the_process(
    container: Container, tmp_path: Path
) -> None:
    message = Message(
        id=uuid.uuid4(),
        source="tests",
        type="mercato.orders.order_completed",
        subject="x",
        time=container.clock.now(),
        data={},
        topic="mercato.orders",
    )
    await container.stream.publish([message])
    async with console(container, tmp_path) as client:
        app = client.app  # type: ignore[attr-defined]
        request = Request(
            {"type": "http", "app": app, "headers": [], "method": "GET", "path": "/console/events"}
        )
        data = await snapshot(request)
    assert {
        "health",
        "sagas",
        "breakers",
        "dead_letters",
        "faults",
        "process",
        "processes",
        "lag",
        "slo",
    } <= set(data)
    assert any(check["name"] == "database" and check["ok"] for check in data["health"])
    assert {b["name"] for b in data["breakers"]} >= {"psp", "carrier"}
    assert data["process"]["rss_bytes"] > 0
    assert data["slo"]["objective"] == 0.999
    assert set(data["sagas"]["counts"]) <= {"running", "compensating", "completed", "compensated", "failed"}
    # The simulators are not running in this test: each is reported unreachable, not an error.
    assert all("unreachable" in f for f in data["faults"].values())
