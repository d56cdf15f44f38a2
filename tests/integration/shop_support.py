"""Helpers for the inventory, cart and orders tests: tokens per role and an in-process client."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx

from mercato.bootstrap import Container
from mercato.gateway.app import create_app
from mercato.kit.auth import Principal
from mercato.shop.catalog.model import NewProduct, Product
from tests.conftest import make_settings

CUSTOMER_SCOPES = frozenset({"cart:read", "cart:write", "orders:read", "orders:write"})
ADMIN_SCOPES = CUSTOMER_SCOPES | {
    "catalog:write",
    "inventory:read",
    "inventory:write",
    "orders:read_all",
    "users:write",
}
SERVICE_SCOPES = frozenset({"inventory:read", "inventory:write", "orders:read_all"})


def bearer(container: Container, *, subject: str, roles: set[str], scopes: frozenset[str]) -> dict[str, str]:
    issued = container.token_codec.issue(
        Principal(subject=subject, roles=frozenset(roles), scopes=frozenset(scopes))
    )
    return {"Authorization": f"Bearer {issued.token}"}


def customer(
    container: Container, scopes: frozenset[str] = CUSTOMER_SCOPES
) -> tuple[uuid.UUID, dict[str, str]]:
    user_id = uuid.uuid4()
    return user_id, bearer(container, subject=str(user_id), roles={"customer"}, scopes=scopes)


def admin(container: Container) -> dict[str, str]:
    return bearer(container, subject=str(uuid.uuid4()), roles={"admin"}, scopes=ADMIN_SCOPES)


def service_account(container: Container) -> dict[str, str]:
    return bearer(container, subject="checkout-service", roles={"service"}, scopes=SERVICE_SCOPES)


@asynccontextmanager
async def api(container: Container) -> AsyncIterator[httpx.AsyncClient]:
    """The real app in-process, on the test's container (its lifespan is not run, so the
    container stays open for the fixture to clean up)."""
    app = create_app(
        make_settings(container.settings.database.url), container=container, configure_logs=False
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client


async def product(
    container: Container, sku: str, price_minor: int, *, currency: str = "EUR", name: str | None = None
) -> Product:
    return await container.catalog.create(
        NewProduct(
            sku=sku,
            name=name or f"Product {sku}",
            price_minor=price_minor,
            currency=currency,
            category="books",
        )
    )
