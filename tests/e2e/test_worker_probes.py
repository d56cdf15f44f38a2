"""Distributed mode with real processes: `mercato worker` serves its probes and metrics on its own port
(MERCATO_WORKER_HTTP_PORT, on by default), and `mercato api`'s `/admin/resilience/breakers` shows the
breakers of the worker, which makes the provider calls (ADR 0025)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.config import SeedSettings
from mercato.demo.seed import demo_accounts
from mercato.kit.storage.migrations import upgrade
from tests.e2e.conftest import free_port, start_mercato

pytestmark = pytest.mark.e2e


def _wait_for(url: str, *, timeout_s: float = 30.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return httpx.get(url, timeout=1.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _login(client: httpx.Client, email: str, password: str) -> dict[str, str]:
    tokens = client.post("/v1/auth/login", json={"email": email, "password": password}).json()
    return {"Authorization": f"Bearer {tokens['access_token']}"}


def test_the_worker_is_probed_and_its_breakers_show_in_the_api(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/shop.db"
    upgrade(SCRIPT_LOCATION, url)
    worker_port = free_port()
    # No payment provider listens on this port: every PSP call the worker makes fails (refused).
    env_extra = {
        "MERCATO_DATABASE_URL": url,
        "MERCATO_SEED_PRODUCTS": "30",
        "MERCATO_PROVIDERS_PSP_PORT": str(free_port()),
        "MERCATO_WORKER_HTTP_PORT": str(worker_port),
        "MERCATO_WORKER_BREAKER_REPORT_INTERVAL_S": "0.2",
        "MERCATO_CHECKOUT_PROVIDER_TIMEOUT_S": "0.5",
    }
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(env_extra)
    env.update({"MERCATO_AUTH_ARGON2_TIME_COST": "1", "MERCATO_AUTH_ARGON2_MEMORY_KIB": "8192"})
    subprocess.run([sys.executable, "-m", "mercato.cli.main", "seed"], cwd=tmp_path, env=env, check=True)
    api, base_url, _ = start_mercato(tmp_path, ["api"], env_extra)
    worker = subprocess.Popen(
        [sys.executable, "-m", "mercato.cli.main", "worker"],  # the port comes from the environment
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert _wait_for(f"http://127.0.0.1:{worker_port}/healthz").json()["status"] == "ok"
        ready = httpx.get(f"http://127.0.0.1:{worker_port}/readyz", timeout=5)
        assert ready.status_code == 200, ready.text
        assert [c["name"] for c in ready.json()["checks"]] == ["database"]

        accounts = demo_accounts(SeedSettings())
        with httpx.Client(base_url=base_url, timeout=10) as client:
            admin = _login(client, *accounts[0][1:])
            customer = _login(client, *accounts[1][1:])
            sku = next(
                p["sku"]
                for p in client.get("/v1/products", params={"limit": 30}).json()["items"]
                if client.get(f"/v1/inventory/{p['sku']}", headers=admin).json()["available"] > 0
            )
            assert (
                client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=customer).status_code
                == 200
            )
            checkout = client.post("/v1/checkout", headers={**customer, "Idempotency-Key": "probe-1"})
            assert checkout.status_code == 202, checkout.text

            def worker_psp() -> dict[str, Any] | None:
                items = client.get("/admin/resilience/breakers", headers=admin).json()["items"]
                return next(
                    (
                        b
                        for b in items
                        if b["name"] == "psp"
                        and b["process"].endswith(f":{worker.pid}")
                        and b["failures"] > 0
                    ),
                    None,
                )

            deadline = time.monotonic() + 30
            seen = worker_psp()
            while seen is None and time.monotonic() < deadline:
                time.sleep(0.2)
                seen = worker_psp()
            assert seen is not None, client.get("/admin/resilience/breakers", headers=admin).text
            assert seen["reported_at"] is not None
            items = client.get("/admin/resilience/breakers", headers=admin).json()["items"]
            own = [b for b in items if b["reported_at"] is None]
            # The API process made no provider call: its own breakers are idle.
            assert own
            assert all(b["calls"] == 0 for b in own)

        metrics = httpx.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
        assert 'mercato_worker_job_duration_seconds_count{job="notifier"}' in metrics
        assert "mercato_breaker_state" in metrics

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=15) == 0
        # A worker that stopped withdraws its reports: the API no longer shows its breakers.
        with httpx.Client(base_url=base_url, timeout=10) as client:
            items = client.get("/admin/resilience/breakers", headers=_login(client, *accounts[0][1:])).json()[
                "items"
            ]
        assert not [b for b in items if b["process"].endswith(f":{worker.pid}")]
    finally:
        for proc in (worker, api):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_a_worker_http_port_of_zero_turns_the_probes_off(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/w.db"
    upgrade(SCRIPT_LOCATION, url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update({"MERCATO_DATABASE_URL": url, "MERCATO_WORKER_HTTP_PORT": "0"})
    log = tmp_path / "worker.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mercato.cli.main", "worker"],
            cwd=tmp_path,
            env=env,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while "running" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.1)
        assert "Mercato worker" in log.read_text()
        assert "probes and metrics on" not in log.read_text()  # nothing bound, nothing to clash on
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
