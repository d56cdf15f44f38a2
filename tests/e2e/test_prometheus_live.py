"""A real Prometheus scraping a real `mercato up` with the generated scrape config and the SLO rules:
every journey's error ratio and the checkout completion ratio are computed from what the process
exports (a renamed metric, label or saga type would leave them empty)."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from mercato.cli.observability import render_scrape_config
from mercato.config import Settings
from mercato.providers.config import ProviderSettings
from tests.e2e.conftest import RunningShop, demo_token, free_port

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("prometheus") is None, reason="prometheus (Debian package) not installed"
    ),
]

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules" / "slos.rules.yml"


@pytest.fixture
def prometheus(shop: RunningShop, tmp_path: Path) -> Iterator[str]:
    config = render_scrape_config(
        Settings(providers=ProviderSettings(enabled=False)),  # type: ignore[call-arg]
        api=[shop.base_url.removeprefix("http://")],
        workers=[],
        rule_files=[str(RULES)],
        interval_s=1,
    )
    (tmp_path / "prometheus.yml").write_text(config, encoding="utf-8")
    port = free_port()
    binary = shutil.which("prometheus")
    assert binary is not None
    with (tmp_path / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Ready once it has scraped the shop: the rates need two samples after the traffic starts.
        _wait(lambda: _query(url, 'up{job="mercato-api"}') == {"": 1.0}, "the first scrape", tmp_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


def _query(url: str, promql: str) -> dict[str, float]:
    try:
        body = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5).json()
    except (httpx.TransportError, ValueError):  # not listening yet, or "not ready" in plain text
        return {}
    results = body.get("data", {}).get("result", [])
    return {
        ":".join(r["metric"][k] for k in ("journey", "sli") if k in r["metric"]): float(r["value"][1])
        for r in results
    }


def _wait(
    ready: Callable[[], bool],
    what: str,
    tmp_path: Path,
    timeout_s: float = 60.0,
    last: Callable[[], object] = lambda: None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    log = (tmp_path / "prometheus.log").read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out waiting for {what} (last: {last()}); prometheus log:\n{log}")


def _shop_round(client: httpx.Client, customer: dict[str, str]) -> None:
    """Browse, fill the cart, check out, and follow the order until it is no longer pending."""
    products = client.get("/v1/products", params={"limit": 50, "category": "music"}).json()["items"]
    client.get(f"/v1/products/{products[0]['id']}")
    client.get(f"/v1/products/{uuid.uuid4()}")  # a 404: the client's error, not the shop's
    sku = next(
        p["sku"] for p in products if client.get(f"/v1/inventory/{p['sku']}/availability").json()["in_stock"]
    )
    assert client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=customer).status_code == 200
    accepted = client.post("/v1/checkout", headers={**customer, "Idempotency-Key": f"slo-{uuid.uuid4()}"})
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["location"]
    deadline = time.monotonic() + 30
    while client.get(location, headers=customer).json()["status"] == "pending":
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_the_slo_rules_evaluate_over_the_metrics_the_shop_exports(
    shop: RunningShop, prometheus: str, tmp_path: Path
) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        customer = {"Authorization": f"Bearer {demo_token(shop.base_url, 'customer')}"}
        # Two rounds a few scrapes apart: a series first seen at 1 has no increase to rate yet.
        for _ in range(2):
            _shop_round(client, customer)
            time.sleep(3)

    journeys = ("browse", "cart", "checkout", "order_status")
    # No 5xx and no failed saga: those ratios are exactly 0. Latency depends on this machine's load,
    # so only its presence (a ratio, not NaN: the threshold bucket exists) is asserted.
    good = {f"{j}:availability" for j in journeys} | {"checkout:completion"}
    slow = {f"{j}:latency" for j in journeys}

    def evaluated() -> bool:
        ratios = _query(prometheus, "mercato:slo_errors:ratio_rate5m")
        return (
            ratios.keys() == good | slow
            and all(ratios[k] == 0.0 for k in good)
            and all(0.0 <= ratios[k] <= 1.0 for k in slow)
        )

    _wait(
        evaluated,
        "every SLO's 5m error ratio over the shop's traffic",
        tmp_path,
        last=lambda: _query(prometheus, "mercato:slo_errors:ratio_rate5m"),
    )
    assert _query(prometheus, "ALERTS") == {}
