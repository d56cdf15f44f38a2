"""The composition root: the one place that picks backends and wires services together.

Nothing else decides "am I on PostgreSQL?"; everything else receives what it needs.
"""

from __future__ import annotations

from dataclasses import dataclass

from mercato.config import Settings
from mercato.kit.auth import TokenCodec
from mercato.kit.clock import Clock, SystemClock
from mercato.kit.health import HealthRegistry
from mercato.kit.idempotency import IdempotencyStore
from mercato.kit.storage import Database, create_database
from mercato.migrations import SCRIPT_LOCATION
from mercato.shop.cart.model import CartLimits
from mercato.shop.cart.service import CartService
from mercato.shop.catalog.service import CatalogService
from mercato.shop.identity.service import IdentityService
from mercato.shop.inventory.service import InventoryService
from mercato.shop.orders.service import OrdersService

SEED_MARKER = "seed_completed_at"


@dataclass
class Container:
    settings: Settings
    clock: Clock
    db: Database
    token_codec: TokenCodec
    health: HealthRegistry
    catalog: CatalogService
    identity: IdentityService
    inventory: InventoryService
    cart: CartService
    orders: OrdersService
    idempotency: IdempotencyStore

    async def close(self) -> None:
        await self.db.dispose()


def build_database(settings: Settings) -> Database:
    db = settings.database
    if db.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return create_database(
        db.url,
        pool_size=db.pool_size,
        max_overflow=db.max_overflow,
        pool_timeout_s=db.pool_timeout_s,
        statement_timeout_s=db.statement_timeout_s,
        echo=db.echo,
    )


def build_container(settings: Settings, *, clock: Clock | None = None) -> Container:
    clock = clock or SystemClock()
    db = build_database(settings)
    codec = TokenCodec(
        secret=settings.auth.secret.get_secret_value(),
        issuer=settings.auth.issuer,
        audience=settings.auth.audience,
        access_ttl_s=settings.auth.access_ttl_s,
        clock=clock,
    )
    health = HealthRegistry()
    health.add_check("database", db.ping)
    catalog = CatalogService(db, clock)
    shop = settings.shop
    # The catalog service is the cart's PriceBook; the cart service is the orders' CartSource.
    cart = CartService(
        db,
        clock,
        catalog,
        CartLimits(max_quantity_per_line=shop.max_quantity_per_line, max_lines=shop.max_cart_lines),
    )
    return Container(
        settings=settings,
        clock=clock,
        db=db,
        token_codec=codec,
        health=health,
        catalog=catalog,
        identity=IdentityService(db, clock, codec, settings.auth),
        inventory=InventoryService(db, clock, reservation_ttl_s=shop.reservation_ttl_s),
        cart=cart,
        orders=OrdersService(db, clock, cart),
        idempotency=IdempotencyStore(db, clock=clock),
    )


__all__ = ["SCRIPT_LOCATION", "SEED_MARKER", "Container", "build_container", "build_database"]
