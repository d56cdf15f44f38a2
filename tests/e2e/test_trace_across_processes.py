"""Concept 35: one checkout is ONE trace across the API, the worker and the simulators, each a real
process exporting OTLP/HTTP to a receiver in this test.

The client sends `traceparent`; the API's server span continues it, the outbox row and the stream
message carry it (CloudEvents `traceparent`), the worker's saga steps continue it from the saga row,
the PSP/carrier calls send it on, and the simulators' server spans and the worker's consumers and
projections close the tree. Every span's parent is the client's span or another span of the trace.
"""

from __future__ import annotations

import asyncio
import os
import random
import secrets
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.demo.seed import demo_products
from mercato.kit.ports import free_port
from mercato.kit.storage.migrations import upgrade
from mercato.lab.chaos_processes import ShopProcess
from mercato.shop.identity.contracts import Role
from tests.e2e.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.e2e

SECRET = "hob-trace-secret-that-is-long-enough-0123456789"
PASSWORD = "hob-trace-customer-1"
EMAIL = "hob-trace@example.com"


async def _seed(url: str) -> str:
    settings = Settings(
        env=Environment.TEST,
        database=DatabaseSettings(url=url),
        auth=AuthSettings(secret=SECRET, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
    )
    container = build_container(settings)
    try:
        products = await container.catalog.create_many(demo_products(2, random.Random(7)))
        await container.inventory.set_available_many(sorted((p.sku, 50) for p in products))
        await container.identity.create_user(EMAIL, PASSWORD, role=Role.CUSTOMER)
        return products[0].sku
    finally:
        await container.close()


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    running = OtlpReceiver().start()
    yield running
    running.stop()


def _env(receiver: OtlpReceiver) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MERCATO_", "OTEL_"))}
    env.update(
        {
            "MERCATO_TELEMETRY_TRACE_EXPORTER": "otlp",
            "MERCATO_TELEMETRY_OTLP_ENDPOINT": receiver.endpoint,
            "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
            # Export every 100 ms rather than every 5 s: the test waits for the spans.
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
    )
    return env


def _wait(url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} did not answer")


def test_a_checkout_is_one_trace_across_api_worker_and_simulators(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shop.db"
    upgrade(SCRIPT_LOCATION, url)
    sku = asyncio.run(_seed(url))
    psp_port, carrier_port, api_port, worker_port = free_port(), free_port(), free_port(), free_port()
    bare = _env(receiver)
    shop = {
        **bare,
        "MERCATO_ENV": "test",
        "MERCATO_DATA_DIR": str(tmp_path),
        "MERCATO_DATABASE_URL": url,
        "MERCATO_AUTH_SECRET": SECRET,
        "MERCATO_AUTH_ARGON2_TIME_COST": "1",
        "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192",
        "MERCATO_PROVIDERS_PSP_PORT": str(psp_port),
        "MERCATO_PROVIDERS_CARRIER_PORT": str(carrier_port),
        "MERCATO_PROVIDERS_MAIL_SMTP_PORT": str(free_port()),
    }
    processes = [
        ShopProcess(
            "psp",
            [
                "provider",
                "psp",
                "--port",
                str(psp_port),
                "--database-url",
                f"sqlite+aiosqlite:///{tmp_path}/psp.db",
            ],
            bare,
            tmp_path,
        ),
        ShopProcess(
            "carrier",
            [
                "provider",
                "carrier",
                "--port",
                str(carrier_port),
                "--database-url",
                f"sqlite+aiosqlite:///{tmp_path}/carrier.db",
            ],
            bare,
            tmp_path,
        ),
        ShopProcess(
            "api", ["api", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1"], shop, tmp_path
        ),
        ShopProcess("worker", ["worker", "--http-port", str(worker_port)], shop, tmp_path),
    ]
    try:
        for process in processes:
            process.start()
        _wait(f"http://127.0.0.1:{psp_port}/healthz")
        _wait(f"http://127.0.0.1:{carrier_port}/healthz")
        _wait(f"http://127.0.0.1:{api_port}/startupz")
        _wait(f"http://127.0.0.1:{worker_port}/healthz")

        trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
        with httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10) as client:
            login = client.post("/v1/auth/login", json={"email": EMAIL, "password": PASSWORD})
            assert login.status_code == 200, login.text
            auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
            put = client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=auth)
            assert put.status_code == 200, put.text
            checkout = client.post(
                "/v1/checkout",
                json={},
                headers={
                    **auth,
                    "Idempotency-Key": uuid.uuid4().hex,
                    "traceparent": f"00-{trace_id}-{client_span}-01",
                },
            )
            assert checkout.status_code == 202, checkout.text
            order_id = checkout.json()["order_id"]

            def complete(spans: list[ReceivedSpan]) -> bool:
                roles = {s.role for s in spans}
                names = " ".join(s.name for s in spans)
                return {"api", "worker", "psp", "carrier"} <= roles and "projection" in names

            status, spans = "", []
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline:
                status = client.get(f"/v1/orders/{order_id}", headers=auth).json()["status"]
                spans = receiver.of_trace(trace_id)
                if status == "completed" and complete(spans):
                    break
                time.sleep(0.3)
        assert status == "completed", f"order {status}; logs:\n" + "\n".join(p.tail() for p in processes)
        # Let the batches in flight arrive (a child may be exported before its parent's batch).
        time.sleep(1.0)
        spans = receiver.of_trace(trace_id)
        assert complete(spans), sorted({(s.role, s.name) for s in spans})
        # Every process's /metrics carries its CPU and memory (saturation), the worker its consumers' lag.
        for port in (api_port, worker_port, psp_port, carrier_port):
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            assert "process_cpu_seconds_total" in text
            assert "process_resident_memory_bytes" in text
        worker_metrics = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
        assert 'mercato_messaging_consumer_lag_messages{group="payments-ledger"' in worker_metrics
    finally:
        for process in reversed(processes):
            process.stop()

    ids = {s.span_id for s in spans}
    orphans = [s for s in spans if s.parent_span_id not in ids and s.parent_span_id != client_span]
    assert not orphans, [(s.role, s.name, s.parent_span_id) for s in orphans]
    # One root under the client's span: the API's server span for POST /v1/checkout.
    roots = [s for s in spans if s.parent_span_id == client_span]
    assert [(r.role, r.kind, r.name) for r in roots] == [("api", "SERVER", "POST /v1/checkout")]
    by_id = {s.span_id: s for s in spans}

    def ancestors(span: ReceivedSpan) -> list[ReceivedSpan]:
        chain = []
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            chain.append(span)
        return chain

    # The hops, each a child of the one before: the simulators' server spans are children of the
    # worker's client spans, which descend from a saga step, which descends from the API request.
    for provider in ("psp", "carrier"):
        servers = [s for s in spans if s.role == provider and s.kind == "SERVER"]
        assert servers, f"no server span from the {provider}"
        for server in servers:
            parent = by_id[server.parent_span_id]
            assert (parent.role, parent.kind) == ("worker", "CLIENT")
            assert parent.pid != server.pid
            chain = ancestors(parent)
            assert any(s.name.startswith("saga order_checkout") or s.name.startswith("saga ") for s in chain)
            assert chain[-1] is roots[0]
    # The outbox row became a stream message (producer span, in the worker's relay) whose consumers
    # (a projection, the ledger or notifications consumer) are its children.
    producers = [s for s in spans if s.kind == "PRODUCER"]
    assert producers
    assert all(s.role == "worker" for s in producers)
    consumers = [s for s in spans if s.kind == "CONSUMER"]
    assert consumers
    assert all(by_id[c.parent_span_id].kind == "PRODUCER" for c in consumers)
    assert any(c.name.startswith("projection ") for c in consumers)
