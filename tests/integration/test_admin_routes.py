"""Operator routes: /admin/resilience/breakers, /admin/sagas and /admin/sagas/stats."""

from __future__ import annotations

import uuid

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.resilience import BreakerConfig, BreakerReports, BreakerState, CircuitBreaker
from mercato.kit.sagas import SagaStatus
from mercato.workers import shop_jobs
from tests.integration.shop_support import admin, api, customer, product


async def _running_saga(container: Container, sku: str) -> uuid.UUID:
    buyer = uuid.uuid4()
    await container.cart.set_item(buyer, sku, 1)
    order = await container.checkout.start(buyer, correlation_id="req-admin-1")
    return order.id


async def _fail(container: Container, saga_id: uuid.UUID, why: str) -> None:
    token = await container.sagas.claim(saga_id, owner="test", lease_s=30)
    assert token is not None
    async with container.db.write() as conn:
        await container.sagas.fenced_update(conn, saga_id, token, status=SagaStatus.FAILED.value, failure=why)


async def test_breakers_list_every_provider_for_admins_only(container: Container) -> None:
    async with api(container) as client:
        ok = await client.get("/admin/resilience/breakers", headers=await admin(container))
        _, buyer = await customer(container)
        forbidden = await client.get("/admin/resilience/breakers", headers=buyer)
        anonymous = await client.get("/admin/resilience/breakers")
    assert ok.status_code == 200
    assert ok.headers["cache-control"] == "private, no-store"
    items = {item["name"]: item for item in ok.json()["items"]}
    # Each provider's writes and its record lookups (what compensations read) have a breaker each.
    assert set(items) == {"carrier", "carrier-reads", "carrier-undo", "psp", "psp-reads", "psp-undo"}
    assert items["psp"]["state"] == "closed"
    assert items["psp"]["retry_after_s"] is None
    assert {"failure_rate", "slow_call_rate", "calls", "config"} <= set(items["psp"])
    assert forbidden.status_code == 403
    assert forbidden.headers["content-type"] == "application/problem+json"
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")


async def test_sagas_by_status_and_their_counts(container: Container) -> None:
    sku = "ADM-1"
    await product(container, sku, 1500)
    await container.inventory.set_available(sku, 10)
    running = await _running_saga(container, sku)
    failed = await _running_saga(container, sku)
    await _fail(container, failed, "compensation void_payment failed after 20 attempts: CircuitOpen")
    headers = await admin(container)
    async with api(container) as client:
        needs_attention = await client.get("/admin/sagas", params={"status": "failed"}, headers=headers)
        active = await client.get("/admin/sagas", params={"status": "running", "limit": 5}, headers=headers)
        everything = await client.get("/admin/sagas", headers=headers)
        stats = await client.get("/admin/sagas/stats", headers=headers)
        too_many = await client.get("/admin/sagas", params={"limit": 101}, headers=headers)
        bad_status = await client.get("/admin/sagas", params={"status": "lost"}, headers=headers)
        _, buyer = await customer(container)
        forbidden = await client.get("/admin/sagas/stats", headers=buyer)
    assert needs_attention.status_code == 200
    [item] = needs_attention.json()["items"]
    assert item["id"] == str(failed)
    assert item["failure"].endswith("CircuitOpen")
    assert item["correlation_id"] == "req-admin-1"
    assert item["step"] is None  # a failed saga is on no step any more
    [item] = active.json()["items"]
    # The stock was there, so the checkout itself reserved it (ADR 0087): the saga waits to authorize.
    assert (item["id"], item["step"], item["status"]) == (str(running), "authorize_payment", "running")
    assert [i["id"] for i in everything.json()["items"]] == [str(failed), str(running)]  # newest first
    assert stats.json() == {
        "counts": {"running": 1, "compensating": 0, "completed": 0, "compensated": 0, "failed": 1},
        "total": 2,
        "needs_attention": 1,
    }
    assert too_many.status_code == 400
    assert bad_status.status_code == 400
    assert forbidden.status_code == 403


async def test_admin_routes_are_documented_with_their_problems(container: Container) -> None:
    async with api(container) as client:
        schema = (await client.get("/openapi.json")).json()
    for path in ("/admin/resilience/breakers", "/admin/sagas", "/admin/sagas/stats"):
        responses = schema["paths"][path]["get"]["responses"]
        assert {"200", "401", "403"} <= set(responses), path
        assert "application/problem+json" in responses["403"]["content"]
    assert "400" in schema["paths"]["/admin/sagas"]["get"]["responses"]


async def test_breakers_reported_by_other_processes_are_shown_while_fresh(
    container: Container, clock: ManualClock
) -> None:
    """A worker's breakers reach the API through the reports table (ADR 0025); a silent one ages out."""
    worker = BreakerReports(container.db, clock, process="worker-host:4242", ttl_s=6.0)
    tripped = CircuitBreaker("psp", config=BreakerConfig(consecutive_failures=1), clock=clock)
    tripped.acquire().failure(duration_s=0.01)
    assert tripped.state is BreakerState.OPEN
    await worker.publish({"psp": tripped.snapshot()})
    # What the running worker does: the report_breakers job publishes the container's registry.
    job = next(j for j in shop_jobs(container) if j.name == "report_breakers")
    await job.run()
    clock.advance(2)
    async with api(container) as client:
        headers = await admin(container)
        items = (await client.get("/admin/resilience/breakers", headers=headers)).json()["items"]
    reported = [b for b in items if b["process"] == "worker-host:4242"]
    assert [(b["name"], b["state"], b["failures"]) for b in reported] == [("psp", "open", 1)]
    assert reported[0]["reported_at"] is not None
    # The open wait counts down from when it was reported: 2 s have passed since.
    assert reported[0]["retry_after_s"] is not None
    assert reported[0]["retry_after_s"] <= tripped.config.wait_s - 2 + 0.001
    assert container.breaker_reports is not None
    own = [b for b in items if b["process"] == container.breaker_reports.process]
    assert len(own) == 6  # this process's live breakers, listed once (its own report is not repeated)
    assert all(b["reported_at"] is None for b in own)

    clock.advance(10)  # the worker stopped reporting
    async with api(container) as client:
        headers = await admin(container)
        items = (await client.get("/admin/resilience/breakers", headers=headers)).json()["items"]
    assert not [b for b in items if b["process"] == "worker-host:4242"]
