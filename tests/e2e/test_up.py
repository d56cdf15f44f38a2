"""A new user's first minutes: `mercato up` on a fresh directory, then browse the catalog."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import RunningShop, demo_token

pytestmark = pytest.mark.e2e


def test_up_seeds_and_serves_the_catalog(shop: RunningShop) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        seen = 0
        cursor = None
        while True:
            params = {"limit": 100, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/products", params=params).json()
            seen += len(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen >= 1000
        first = client.get("/v1/products", params={"limit": 1}).json()["items"][0]
        one = client.get(f"/v1/products/{first['id']}")
        assert one.status_code == 200
        assert one.json()["sku"] == first["sku"]


def test_embedded_mode_keeps_its_data_under_var(shop: RunningShop) -> None:
    assert (shop.workdir / "var" / "mercato.db").exists()


def test_probes_and_docs(shop: RunningShop) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert {c["name"] for c in ready.json()["checks"]} >= {"database"}
        assert client.get("/startupz").json()["steps"]["seed"] is True
        assert client.get("/docs").status_code == 200
        assert "/v1/products" in client.get("/openapi.json").json()["paths"]


def test_request_id_is_echoed_and_errors_are_problems(shop: RunningShop) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        response = client.get("/v1/products/not-a-product", headers={"X-Request-ID": "e2e-abc-123"})
        assert response.status_code == 404
        assert response.headers["x-request-id"] == "e2e-abc-123"
        assert response.headers["content-type"] == "application/problem+json"
        body = response.json()
        assert body["type"] == "/problems/product-not-found"
        assert body["request_id"] == "e2e-abc-123"
        assert client.get(body["type"]).json()["title"] == "Product not found"


def test_a_customer_checks_out_and_the_order_completes(shop: RunningShop) -> None:
    """The whole embedded system: API, saga runner, payment provider and carrier in one process."""
    import time

    from mercato.config import SeedSettings
    from mercato.demo.seed import demo_accounts

    accounts = demo_accounts(SeedSettings())
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:

        def login(role: str) -> dict[str, str]:
            return {"Authorization": f"Bearer {demo_token(shop.base_url, role)}"}

        admin, customer = login("admin"), login("customer")
        products = client.get("/v1/products", params={"limit": 100, "category": "books"}).json()["items"]
        # Products other e2e tests created (schemathesis posts some) may have no stock row: 404.
        sku = next(
            p["sku"]
            for p in products
            if client.get(f"/v1/inventory/{p['sku']}", headers=admin).json().get("available", 0) > 0
        )
        put = client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=customer)
        assert put.status_code == 200, put.text
        accepted = client.post("/v1/checkout", headers={**customer, "Idempotency-Key": "e2e-checkout-1"})
        assert accepted.status_code == 202, accepted.text
        location = accepted.headers["location"]
        deadline = time.monotonic() + 30
        order = client.get(location, headers=customer).json()
        while order["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.1)
            order = client.get(location, headers=customer).json()
        assert order["status"] == "completed", order
        assert order["checkout"]["saga_status"] == "completed"
        assert [s["step"] for s in order["checkout"]["steps"]][-1] == "mark_complete"

        # Choreography: the notifications context records the confirmation and the notifier mails it
        # to the mail provider `mercato up` started (one mail for this order, to the customer).
        _, customer_email, _ = next(a for a in accounts if a[0].value == "customer")
        order_id = location.rstrip("/").rsplit("/", 1)[-1]
        mails: list[dict[str, object]] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            mails = httpx.get(f"{shop.mail_url}/messages", params={"recipient": customer_email}).json()[
                "items"
            ]
            if any(order_id in str(m["subject"]) for m in mails):
                break
            time.sleep(0.2)
        assert [m for m in mails if order_id in str(m["subject"])], mails
        assert len([m for m in mails if order_id in str(m["subject"])]) == 1
        notes = client.get("/admin/notifications", params={"order_id": order_id}, headers=admin).json()[
            "items"
        ]
        assert {(n["channel"], n["status"]) for n in notes} >= {("email", "sent")}
