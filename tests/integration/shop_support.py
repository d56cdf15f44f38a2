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
from mercato.shop.identity.contracts import Role
from mercato.shop.identity.model import User
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


async def account(
    container: Container, *, role: str = "customer", user_id: uuid.UUID | None = None
) -> uuid.UUID:
    """A real account row: the bearer guard refuses tokens whose subject does not exist."""
    now = container.clock.now()
    user = User(
        id=user_id or uuid.uuid4(),
        email=f"{uuid.uuid4().hex[:12]}@example.com",
        role=Role(role),
        display_name="Test",
        disabled=False,
        created_at=now,
        updated_at=now,
        password_hash="not-a-usable-hash",
    )
    await container.identity.store_user(user)
    return user.id


async def bearer(
    container: Container, *, roles: set[str], scopes: frozenset[str], subject: str | None = None
) -> dict[str, str]:
    """A token for a new account with `roles` (or for `subject`, which must exist), carrying `scopes`."""
    if subject is None:
        role = next((r for r in ("admin", "service", "customer") if r in roles), "customer")
        subject = str(await account(container, role=role))
    assert container.signing_keys is not None
    await container.signing_keys.ready()  # what the identity service does before it signs
    issued = container.token_codec.issue(
        Principal(subject=subject, roles=frozenset(roles), scopes=frozenset(scopes))
    )
    return {"Authorization": f"Bearer {issued.token}"}


async def api_key(container: Container, scopes: frozenset[str]) -> dict[str, str]:
    """A real partner API key with `scopes` (its principal is no customer account)."""
    assert container.api_keys is not None
    issued = await container.api_keys.create("test partner", sorted(scopes))
    return {"X-API-Key": issued.secret}


async def customer(
    container: Container, scopes: frozenset[str] = CUSTOMER_SCOPES
) -> tuple[uuid.UUID, dict[str, str]]:
    user_id = await account(container)
    return user_id, await bearer(container, subject=str(user_id), roles={"customer"}, scopes=scopes)


async def admin(container: Container) -> dict[str, str]:
    return await bearer(container, roles={"admin"}, scopes=ADMIN_SCOPES)


async def service_account(container: Container) -> dict[str, str]:
    return await bearer(container, roles={"service"}, scopes=SERVICE_SCOPES)


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
