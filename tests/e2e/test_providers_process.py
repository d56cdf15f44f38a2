"""The simulated providers as real servers over real HTTP: runtime faults, and a ledger that survives a crash.

`mercato provider psp` runs as a subprocess (a lost response here is a TCP connection dropped without a
byte); `serve_providers` runs both simulators inside this test's event loop, as `mercato up` will.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mercato.providers import CarrierClient, ProviderSettings, PspClient, serve_providers
from mercato.providers._client import ProviderTimeout, ProviderUnavailable
from mercato.providers.carrier import ShipmentItem
from tests.e2e.conftest import free_port

pytestmark = pytest.mark.e2e


def _start_psp(workdir: Path, port: int, *flags: str) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    log = (workdir / "psp.log").open("ab")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mercato.cli.main",
            "provider",
            "psp",
            "--port",
            str(port),
            "--data-dir",
            str(workdir / "data"),
            *flags,
        ],
        cwd=workdir,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"psp exited early:\n{(workdir / 'psp.log').read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1.0).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"psp did not become ready:\n{(workdir / 'psp.log').read_text()}")


def _stop(proc: subprocess.Popen[bytes], *, crash: bool) -> None:
    if crash:
        proc.kill()
    else:
        proc.terminate()
    proc.wait(timeout=15)


async def test_psp_process_faults_and_durable_ledger(tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_psp(tmp_path, port, "--seed", "5")
    try:
        client = PspClient(base, timeout=ProviderTimeout(read_s=0.5, connect_s=2.0))
        admin = httpx.AsyncClient(base_url=base, timeout=2.0)
        try:
            paid = await client.authorize(
                amount_minor=1500, currency="EUR", order_reference="o-1", idempotency_key="a-1"
            )
            await client.capture(paid.authorization_id, amount_minor=1500, idempotency_key="c-1")

            # Lost response: the client sees the connection die without a response...
            assert (await admin.put("/admin/faults", json={"lost_response_rate": 1.0})).status_code == 200
            with pytest.raises(ProviderUnavailable):
                await client.authorize(
                    amount_minor=900, currency="EUR", order_reference="o-2", idempotency_key="a-2"
                )
            # ...yet the authorization exists, and the retry with the same key returns it, not a second one.
            assert (await client.summary(order_reference="o-2")).totals.authorizations == 1
            await admin.put("/admin/faults", json={})
            retried = await admin.post(
                "/v1/authorizations",
                json={"amount_minor": 900, "currency": "EUR", "order_reference": "o-2"},
                headers={"Idempotency-Key": "a-2"},
            )
            assert (retried.status_code, retried.headers["idempotent-replayed"]) == (201, "true")

            # Hang: no answer at all; the client's own read timeout is what ends the wait.
            await admin.put("/admin/faults", json={"hang_rate": 1.0})
            with pytest.raises(ProviderUnavailable, match="Timeout"):
                await client.authorize(
                    amount_minor=1, currency="EUR", order_reference="o-3", idempotency_key="a-3"
                )
            await admin.put("/admin/faults", json={})

            metrics = (await admin.get("/metrics")).text
            for fault in ("lost_response", "hang"):
                assert (
                    f'fault="{fault}",method="POST",provider="psp",route="/v1/authorizations"}} 1.0'
                    in metrics
                )
            before = await client.summary()
            assert (before.totals.authorizations, before.totals.captures, before.totals.captured_minor) == (
                2,
                1,
                1500,
            )
        finally:
            await client.aclose()
            await admin.aclose()
    finally:
        _stop(proc, crash=True)

    # Restarted after a SIGKILL, with latency flags: the ledger is intact and the flags are in force.
    proc = _start_psp(tmp_path, port, "--latency-p50-ms", "5", "--latency-p99-ms", "20")
    try:
        async with httpx.AsyncClient(base_url=base, timeout=2.0) as admin:
            faults = (await admin.get("/admin/faults")).json()
            assert (faults["latency_p50_ms"], faults["latency_p99_ms"], faults["error_rate"]) == (5, 20, 0)
            after = (await admin.get("/v1/ledger/summary")).json()
            assert after["totals"] == before.totals.model_dump(mode="json")
            replay = await admin.post(
                f"/v1/authorizations/{paid.authorization_id}/capture",
                json={"amount_minor": 1500},
                headers={"Idempotency-Key": "c-1"},
            )
            assert (replay.status_code, replay.headers["idempotent-replayed"]) == (201, "true")
    finally:
        _stop(proc, crash=False)
    # uvicorn re-raises the SIGTERM it handled once shutdown is done, hence -15; the log shows it was clean.
    assert proc.returncode in (0, -15)
    assert "Application shutdown complete" in (tmp_path / "psp.log").read_text()


async def test_serve_providers_runs_both_in_the_current_loop(tmp_path: Path) -> None:
    settings = ProviderSettings(psp_port=free_port(), carrier_port=free_port(), data_dir=tmp_path)
    running = await serve_providers(settings)
    try:
        psp = PspClient(settings.psp_base_url)
        carrier = CarrierClient(settings.carrier_base_url)
        try:
            auth = await psp.authorize(
                amount_minor=10, currency="EUR", order_reference="o", idempotency_key="k"
            )
            assert auth.status.value == "authorized"
            shipment = await carrier.create_shipment(
                order_reference="o", items=[ShipmentItem(sku="S", quantity=1)], idempotency_key="k"
            )
            assert (await carrier.summary()).totals.active == 1
            assert shipment.order_reference == "o"
        finally:
            await psp.aclose()
            await carrier.aclose()
    finally:
        await running.stop()
    assert all(task.done() for task in running.tasks)
    assert (tmp_path / "psp.db").exists()
    assert (tmp_path / "carrier.db").exists()
