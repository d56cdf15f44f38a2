"""The simulated PSP in-process (ASGI), on SQLite and PostgreSQL: idempotency, states, ledger, faults."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from mercato.kit.clock import ManualClock
from mercato.providers import (
    FaultSettings,
    ProviderApp,
    ProviderError,
    PspClient,
    ResponseLost,
    create_psp_app,
)
from mercato.providers.psp.service import psp_metadata

if TYPE_CHECKING:
    from tests.integration.provider_support import InProcess, Served

pytest_plugins = ["tests.integration.provider_support"]


@pytest.fixture
def psp_app(provider_db_url: str) -> ProviderApp:
    return create_psp_app(provider_db_url, clock=ManualClock(), rng=random.Random(1))


@pytest.fixture
async def psp(psp_app: ProviderApp, in_process: InProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with in_process(psp_app, psp_metadata) as client:
        yield client


def _key() -> str:
    return uuid.uuid4().hex


def _order() -> str:
    return f"ord-{uuid.uuid4().hex[:8]}"


async def _post(
    client: httpx.AsyncClient, path: str, body: dict[str, Any] | None = None, key: str | None = None
):
    return await client.post(path, json=body or {}, headers={"Idempotency-Key": key or _key()})


async def _authorize(
    client: httpx.AsyncClient, order: str, amount: int = 1000, **extra: Any
) -> dict[str, Any]:
    response = await _post(
        client,
        "/v1/authorizations",
        {"amount_minor": amount, "currency": "EUR", "order_reference": order, **extra},
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


async def _summary(client: httpx.AsyncClient, order: str) -> dict[str, Any]:
    response = await client.get("/v1/ledger/summary", params={"order_reference": order})
    assert response.status_code == 200
    orders = response.json()["orders"]
    return dict(orders[0]) if orders else {}


async def test_same_key_same_body_replays_the_stored_response(psp: httpx.AsyncClient) -> None:
    order, key = _order(), _key()
    body = {"amount_minor": 2500, "currency": "EUR", "order_reference": order}
    first = await _post(psp, "/v1/authorizations", body, key)
    # Same body with keys in another order: the fingerprint is of the parsed request, not its bytes.
    again = await _post(psp, "/v1/authorizations", dict(reversed(list(body.items()))), key)
    assert first.status_code == again.status_code == 201
    assert again.json() == first.json()
    assert again.headers["idempotent-replayed"] == "true"
    assert "idempotent-replayed" not in first.headers
    assert first.headers["location"] == f"/v1/authorizations/{first.json()['authorization_id']}"
    assert (await _summary(psp, order))["authorizations"] == 1


async def test_same_key_different_body_or_operation_is_422(psp: httpx.AsyncClient) -> None:
    order, key = _order(), _key()
    await _post(
        psp, "/v1/authorizations", {"amount_minor": 100, "currency": "EUR", "order_reference": order}, key
    )
    other_body = await _post(
        psp, "/v1/authorizations", {"amount_minor": 101, "currency": "EUR", "order_reference": order}, key
    )
    assert other_body.status_code == 422
    assert other_body.headers["content-type"] == "application/problem+json"
    assert other_body.json()["type"] == "/problems/idempotency-key-reused"
    auth = await _authorize(psp, order)
    other_op = await _post(psp, f"/v1/authorizations/{auth['authorization_id']}/void", key=key)
    assert other_op.status_code == 422
    assert (await _summary(psp, order))["authorizations"] == 2


async def test_missing_key_is_400_and_invalid_body_is_422(psp: httpx.AsyncClient) -> None:
    missing = await psp.post(
        "/v1/authorizations", json={"amount_minor": 1, "currency": "EUR", "order_reference": "o"}
    )
    assert missing.status_code == 400
    assert missing.json()["type"] == "/problems/idempotency-key-missing"
    invalid = await _post(
        psp, "/v1/authorizations", {"amount_minor": -5, "currency": "euro", "order_reference": "o"}
    )
    assert invalid.status_code == 422
    assert {e["field"] for e in invalid.json()["errors"]} == {"body.amount_minor", "body.currency"}
    assert invalid.headers["x-request-id"] == invalid.json()["request_id"]


async def test_concurrent_requests_with_one_key_get_409_while_the_first_is_in_flight(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    # A fixed 300 ms "card network" delay, spent while the key is held.
    psp_app.injector.update(FaultSettings(latency_p50_ms=300, latency_p99_ms=300))
    order, key = _order(), _key()
    body = {"amount_minor": 700, "currency": "EUR", "order_reference": order}
    racing = await asyncio.gather(*(_post(psp, "/v1/authorizations", body, key) for _ in range(2)))
    assert sorted(r.status_code for r in racing) == [201, 409]
    conflict = next(r for r in racing if r.status_code == 409)
    assert conflict.json()["type"] == "/problems/idempotency-key-in-flight"
    assert conflict.headers["retry-after"] == "1"
    psp_app.injector.update(FaultSettings())
    replay = await _post(psp, "/v1/authorizations", body, key)
    assert (replay.status_code, replay.headers["idempotent-replayed"]) == (201, "true")
    assert (await _summary(psp, order))["authorizations"] == 1


async def test_capture_void_refund_state_machine(psp: httpx.AsyncClient) -> None:
    order = _order()
    auth = await _authorize(psp, order, 1000)
    auth_id = auth["authorization_id"]
    assert auth["status"] == "authorized"
    too_much = await _post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 1001})
    assert (too_much.status_code, too_much.json()["type"]) == (422, "/problems/amount-exceeds-authorized")
    captured = await _post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 900})
    assert captured.status_code == 201
    capture_id = captured.json()["capture_id"]
    twice = await _post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 900})
    assert (twice.status_code, twice.json()["type"]) == (409, "/problems/already-captured")
    void = await _post(psp, f"/v1/authorizations/{auth_id}/void")
    assert (void.status_code, void.json()["type"]) == (409, "/problems/already-captured")
    assert (await _post(psp, f"/v1/captures/{capture_id}/refund", {"amount_minor": 400})).status_code == 201
    over = await _post(psp, f"/v1/captures/{capture_id}/refund", {"amount_minor": 501})
    assert (over.status_code, over.json()["type"]) == (422, "/problems/amount-exceeds-refundable")
    assert (await _post(psp, f"/v1/captures/{capture_id}/refund", {"amount_minor": 500})).status_code == 201
    state = (await psp.get(f"/v1/authorizations/{auth_id}")).json()
    assert (state["status"], state["captured_minor"], state["capture_id"]) == ("captured", 900, capture_id)
    assert (await psp.get(f"/v1/captures/{capture_id}")).json()["refunded_minor"] == 900
    assert await _summary(psp, order) == {
        "order_reference": order,
        "authorizations": 1,
        "authorized_minor": 1000,
        "declines": 0,
        "captures": 1,
        "captured_minor": 900,
        "voids": 0,
        "voided_minor": 0,
        "refunds": 2,
        "refunded_minor": 900,
    }


async def test_void_then_capture_is_409_and_unknown_ids_are_404(psp: httpx.AsyncClient) -> None:
    order = _order()
    auth_id = (await _authorize(psp, order))["authorization_id"]
    voided = await _post(psp, f"/v1/authorizations/{auth_id}/void")
    assert (voided.status_code, voided.json()["status"]) == (200, "voided")
    again = await _post(psp, f"/v1/authorizations/{auth_id}/void")
    assert again.json()["type"] == "/problems/already-voided"
    capture = await _post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 1})
    assert (capture.status_code, capture.json()["type"]) == (409, "/problems/already-voided")
    assert (
        await _post(psp, f"/v1/authorizations/{uuid.uuid4()}/capture", {"amount_minor": 1})
    ).status_code == 404
    assert (await _post(psp, f"/v1/captures/{uuid.uuid4()}/refund", {"amount_minor": 1})).status_code == 404
    assert (await psp.get(f"/v1/authorizations/{uuid.uuid4()}")).status_code == 404
    summary = await _summary(psp, order)
    assert (summary["voids"], summary["voided_minor"], summary["captures"]) == (1, 1000, 0)


async def test_stored_rejections_replay_even_after_the_state_moved_on(psp: httpx.AsyncClient) -> None:
    auth_id = (await _authorize(psp, _order()))["authorization_id"]
    key = _key()
    early = await _post(psp, f"/v1/authorizations/{auth_id}/void", key=key)
    assert early.status_code == 200
    replay = await _post(psp, f"/v1/authorizations/{auth_id}/void", key=key)
    assert (replay.status_code, replay.headers["idempotent-replayed"]) == (200, "true")


async def test_magic_tokens_decline_and_declined_authorizations_cannot_move(psp: httpx.AsyncClient) -> None:
    order = _order()
    declined = await _authorize(psp, order, card_token="tok_insufficient_funds")
    assert (declined["status"], declined["decline_reason"]) == ("declined", "insufficient_funds")
    capture = await _post(
        psp, f"/v1/authorizations/{declined['authorization_id']}/capture", {"amount_minor": 1}
    )
    assert capture.json()["type"] == "/problems/authorization-declined"
    summary = await _summary(psp, order)
    assert (summary["declines"], summary["authorizations"]) == (1, 0)


async def test_racing_captures_with_different_keys_capture_once(psp: httpx.AsyncClient) -> None:
    order = _order()
    auth_id = (await _authorize(psp, order))["authorization_id"]
    results = await asyncio.gather(
        *(_post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 1000}) for _ in range(5))
    )
    assert sorted(r.status_code for r in results) == [201, 409, 409, 409, 409]
    assert (await _summary(psp, order))["captures"] == 1


async def test_lost_response_applies_the_effect_and_a_retry_replays_it(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    order, key = _order(), _key()
    body = {"amount_minor": 1200, "currency": "EUR", "order_reference": order}
    psp_app.injector.update(FaultSettings(lost_response_rate=1.0))
    with pytest.raises(ResponseLost):
        await _post(psp, "/v1/authorizations", body, key)
    assert (await _summary(psp, order))["authorizations"] == 1
    psp_app.injector.update(FaultSettings())
    retry = await _post(psp, "/v1/authorizations", body, key)
    assert (retry.status_code, retry.headers["idempotent-replayed"]) == (201, "true")
    assert (await _summary(psp, order))["authorizations"] == 1


async def test_injected_errors_apply_nothing_and_read_endpoints_are_never_faulted(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    order, key = _order(), _key()
    body = {"amount_minor": 300, "currency": "EUR", "order_reference": order}
    psp_app.injector.update(FaultSettings(error_rate=1.0, seed=4))
    statuses = set()
    for _ in range(12):
        failed = await _post(psp, "/v1/authorizations", body, key)
        statuses.add(failed.status_code)
        assert failed.headers["content-type"] == "application/problem+json"
        assert failed.json()["type"] == "/problems/injected-error"
        if failed.status_code == 503:
            assert failed.headers["retry-after"] == "1"
    assert statuses == {500, 503}
    assert (await psp.get("/healthz")).status_code == 200
    assert await _summary(psp, order) == {}
    psp_app.injector.update(FaultSettings())
    ok = await _post(psp, "/v1/authorizations", body, key)
    assert ok.status_code == 201
    assert "idempotent-replayed" not in ok.headers


async def test_hang_never_answers_and_applies_nothing(psp: httpx.AsyncClient, psp_app: ProviderApp) -> None:
    order = _order()
    psp_app.injector.update(FaultSettings(hang_rate=1.0))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            _post(
                psp, "/v1/authorizations", {"amount_minor": 1, "currency": "EUR", "order_reference": order}
            ),
            0.3,
        )
    assert await _summary(psp, order) == {}


async def test_outage_and_admin_faults_endpoint(psp: httpx.AsyncClient) -> None:
    bad = await psp.put("/admin/faults", json={"error_rate": 0.9, "hang_rate": 0.5})
    assert (bad.status_code, bad.headers["content-type"]) == (422, "application/problem+json")
    put = await psp.put("/admin/faults", json={"outage_for_s": 30, "latency_p50_ms": 5, "latency_p99_ms": 50})
    assert put.status_code == 200
    assert (put.json()["outage_active"], put.json()["outage_remaining_s"]) == (True, 30.0)
    down = await _post(
        psp, "/v1/authorizations", {"amount_minor": 1, "currency": "EUR", "order_reference": "o"}
    )
    assert (down.status_code, down.json()["type"], down.headers["retry-after"]) == (
        503,
        "/problems/provider-outage",
        "30",
    )
    assert (await psp.get("/v1/ledger")).status_code == 200
    current = (await psp.get("/admin/faults")).json()
    assert (current["outage_for_s"], current["latency_p99_ms"]) == (30, 50)
    assert (await psp.put("/admin/faults", json={})).json()["outage_active"] is False


async def test_metrics_count_received_requests_by_route_and_fault(
    psp: httpx.AsyncClient, psp_app: ProviderApp
) -> None:
    psp_app.injector.update(FaultSettings(error_rate=1.0))
    for _ in range(3):
        await _post(psp, "/v1/authorizations", {"amount_minor": 1, "currency": "EUR", "order_reference": "o"})
    psp_app.injector.update(FaultSettings())
    await _authorize(psp, _order())
    text = (await psp.get("/metrics")).text
    assert (
        'mercato_provider_requests_received_total{fault="error",method="POST",provider="psp",'
        'route="/v1/authorizations"} 3.0'
    ) in text
    assert 'fault="none",method="POST",provider="psp",route="/v1/authorizations"} 1.0' in text
    assert 'mercato_http_requests_total{method="POST",route="/v1/authorizations",status="201"} 1.0' in text


async def test_ledger_lists_entries_with_keyset_pagination(psp: httpx.AsyncClient) -> None:
    order = _order()
    auth_id = (await _authorize(psp, order, 500))["authorization_id"]
    await _post(psp, f"/v1/authorizations/{auth_id}/capture", {"amount_minor": 500})
    await _authorize(psp, order, 50, card_token="tok_decline")
    page = (await psp.get("/v1/ledger", params={"order_reference": order, "limit": 2})).json()
    assert [e["kind"] for e in page["items"]] == ["authorization", "capture"]
    rest = (
        await psp.get("/v1/ledger", params={"order_reference": order, "cursor": page["next_cursor"]})
    ).json()
    assert ([e["kind"] for e in rest["items"]], rest["next_cursor"]) == (["decline"], None)
    assert (await psp.get("/v1/ledger", params={"limit": 101})).status_code == 400
    assert (await psp.get("/v1/ledger", params={"cursor": "garbage"})).status_code == 400


async def test_client_wraps_the_api_and_raises_problems(psp_app: ProviderApp, on_a_port: Served) -> None:
    async with on_a_port(psp_app, psp_metadata) as base_url:
        client = PspClient(base_url)
        try:
            order = _order()
            auth = await client.authorize(
                amount_minor=800, currency="EUR", order_reference=order, idempotency_key="a1"
            )
            capture = await client.capture(auth.authorization_id, amount_minor=800, idempotency_key="c1")
            refund = await client.refund(capture.capture_id, amount_minor=300, idempotency_key="r1")
            assert refund.amount_minor == 300
            with pytest.raises(ProviderError) as conflict:
                await client.void(auth.authorization_id, idempotency_key="v1")
            assert (conflict.value.status, conflict.value.slug, conflict.value.retryable) == (
                409,
                "already-captured",
                False,
            )
            summary = await client.summary(order_reference=order)
            assert (summary.totals.captures, summary.totals.refunded_minor) == (1, 300)
            assert len((await client.ledger(order_reference=order)).items) == 3
        finally:
            await client.aclose()
