"""EXPLAIN on PostgreSQL: the hot list queries use the indexes built for them.

The statements explained are the ones the repositories run: the orders repository's own
`page_statement`, and for the catalog the SQL captured while `CatalogRepository.page` executes.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from sqlalchemy import event, insert, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.bootstrap import Container, build_container
from mercato.demo.seed import demo_products
from mercato.kit.clock import ManualClock
from mercato.kit.ids import new_id
from mercato.kit.sagas.store import _CLAIM_DUE as CLAIM_DUE
from mercato.kit.sagas.store import saga_instances
from mercato.kit.storage.statements_in_tx import statements_for
from mercato.shop.catalog.model import ProductQuery, ProductSort
from mercato.shop.catalog.repository import CatalogRepository
from mercato.shop.catalog.tables import products
from mercato.shop.inventory.repository import InventoryRepository
from mercato.shop.inventory.tables import reservations
from mercato.shop.orders.repository import OrdersRepository
from mercato.shop.orders.tables import orders
from tests.conftest import make_settings
from tests.tables import emptiable_tables


@pytest.fixture
async def pg(pg_url: str, clock: ManualClock) -> AsyncIterator[Container]:
    built = build_container(make_settings(pg_url), clock=clock)
    try:
        yield built
    finally:
        async with built.db.write() as conn:
            for table in emptiable_tables():
                await conn.execute(text(f'DELETE FROM "{table.name}"'))
        await built.close()


def index_names(plan: Any) -> Iterator[str]:
    if isinstance(plan, dict):
        if "Index Name" in plan:
            yield str(plan["Index Name"])
        for value in plan.values():
            yield from index_names(value)
    elif isinstance(plan, list):
        for item in plan:
            yield from index_names(item)


async def explain(conn: AsyncConnection, sql: str, params: Any = ()) -> list[str]:
    raw = (await conn.exec_driver_sql("EXPLAIN (FORMAT JSON) " + sql, params)).scalar_one()
    plan = orjson.loads(raw) if isinstance(raw, (str, bytes)) else raw
    return list(index_names(plan))


async def test_customer_order_list_uses_the_customer_index(pg: Container) -> None:
    rng = random.Random(3)
    customers = [uuid.uuid4() for _ in range(60)]
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows: list[dict[str, Any]] = []
    for n in range(4000):
        moment = start + timedelta(minutes=n)
        rows.append(
            {
                "id": new_id(),
                "customer_id": rng.choice(customers),
                "status": "pending",
                "currency": "EUR",
                "total_minor": rng.randrange(100, 100_000),
                "item_count": rng.randrange(1, 5),
                "version": 1,
                "created_at": moment,
                "updated_at": moment,
            }
        )
    async with pg.db.write() as conn:
        await conn.execute(insert(orders), rows)
    async with pg.db.write() as conn:
        await conn.exec_driver_sql("ANALYZE orders")

    repo = OrdersRepository()
    statements = [
        repo.page_statement(customer_id=customers[0], after_id=None, limit=21),
        repo.page_statement(customer_id=customers[0], after_id=rows[2000]["id"], limit=21),
    ]
    async with pg.db.read() as conn:
        for stmt in statements:
            sql = str(stmt.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
            assert "ix_orders_customer_id_id" in await explain(conn, sql), sql


class _Capture:
    """Records the SQL and parameters the driver receives inside `with _Capture(container) as c:`."""

    def __init__(self, container: Container) -> None:
        self.calls: list[tuple[str, Any]] = []
        self._engine = container.db.engine.sync_engine

    def __enter__(self) -> _Capture:
        event.listen(self._engine, "before_cursor_execute", self)
        return self

    def __exit__(self, *_: object) -> None:
        event.remove(self._engine, "before_cursor_execute", self)

    def __call__(self, _conn: Any, _cursor: Any, statement: str, parameters: Any, *_: Any) -> None:
        self.calls.append((statement, parameters))

    def first(self, table: str) -> tuple[str, Any]:
        """The first statement that named `table`, with its parameters."""
        return next(call for call in self.calls if table in call[0])


@pytest.mark.parametrize(
    ("query", "index"),
    [
        (ProductQuery(sort=ProductSort.NEWEST), "ix_catalog_products_live_id"),
        (ProductQuery(sort=ProductSort.PRICE_ASC), "ix_catalog_products_live_price"),
        (ProductQuery(sort=ProductSort.PRICE_DESC), "ix_catalog_products_live_price"),
        (
            ProductQuery(sort=ProductSort.PRICE_ASC, category="books"),
            "ix_catalog_products_live_category_price",
        ),
        (
            ProductQuery(sort=ProductSort.PRICE_ASC, category="books", min_price_minor=1000),
            "ix_catalog_products_live_category_price",
        ),
    ],
    ids=["default", "price", "-price", "category+price", "category+price+min"],
)
async def test_product_lists_use_their_live_index(pg: Container, query: ProductQuery, index: str) -> None:
    await pg.catalog.create_many(demo_products(4000, random.Random(11)))
    async with pg.db.write() as conn:
        # Some archived rows, so the partial indexes differ from the whole table.
        await conn.execute(update(products).where(products.c.sku.like("%0")).values(archived=True))
    async with pg.db.write() as conn:
        await conn.exec_driver_sql("ANALYZE catalog_products")

    with _Capture(pg) as capture:
        async with pg.db.read() as conn:
            assert await CatalogRepository().page(conn, query)
    sql, params = capture.first("catalog_products")

    async with pg.db.read() as conn:
        used = await explain(conn, sql, tuple(params))
    assert index in used, (used, sql)


async def test_the_saga_claim_walks_the_active_deadline_index(pg: Container) -> None:
    """A backlog of finished sagas and a thousand due ones: the claim reads the active sagas in
    deadline order from their partial index and stops at its limit, rather than sorting them all."""
    rng = random.Random(5)
    now = pg.clock.now()
    rows: list[dict[str, Any]] = []
    for n in range(20_000):
        active = n % 20 == 0
        status = (
            rng.choice(["running", "compensating"]) if active else rng.choice(["completed", "compensated"])
        )
        rows.append(
            {
                "id": new_id(),
                "saga_type": "order",
                "status": status,
                "step_index": 0,
                "attempt": 0,
                "data": {},
                "correlation_id": "plan",
                "owner": None,
                "lease_token": 0,
                "lease_expires_at": None,
                "next_attempt_at": now - timedelta(seconds=rng.randrange(1, 600)),
                "deadline_at": now + timedelta(seconds=rng.randrange(-300, 300)),
                "created_at": now - timedelta(minutes=10),
                "updated_at": now - timedelta(minutes=10),
                "finished_at": None if active else now,
            }
        )
    async with pg.db.write() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(saga_instances), rows[start : start + 5000])
    async with pg.db.write() as conn:
        await conn.exec_driver_sql("ANALYZE saga_instances")

    claimed = await pg.sagas.claim_due(owner="plan", lease_s=30.0, limit=32)
    deadlines = [saga.deadline_at for saga in claimed]
    assert len(claimed) == 32
    assert deadlines == sorted(deadlines)
    active = sorted(r["deadline_at"] for r in rows if r["status"] in ("running", "compensating"))
    assert deadlines == active[:32], "the 32 earliest deadlines, from every active saga"
    # The claim runs on the raw-driver layer: its SQL and arguments as that layer sends them.
    prepared = statements_for(pg.db.engine.dialect).get(CLAIM_DUE)
    later = now + timedelta(seconds=31)
    args = prepared.args({"now": later, "limit": 32, "owner": "plan", "expires": later})

    async with pg.db.read() as conn:
        used = await explain(conn, prepared.sql, tuple(args))
    sql = prepared.sql
    assert "ix_saga_instances_active_deadline" in used, (used, sql)


async def test_the_reservation_expirer_walks_the_active_reservations_index(pg: Container) -> None:
    """Twenty thousand ended reservations and a thousand active ones: the expirer's query reads the
    active ones in (expires_at, id) order from their partial index (migration 0031), which ending a
    reservation (every checkout's commit) no longer writes to."""
    rng = random.Random(7)
    now = pg.clock.now()
    rows = [
        {
            "id": new_id(),
            "reference": f"plan-{n}",
            "status": "active" if n % 21 == 0 else rng.choice(["committed", "released", "expired"]),
            "expires_at": now + timedelta(seconds=rng.randrange(-600, 600)),
            "created_at": now - timedelta(minutes=10),
            "updated_at": now - timedelta(minutes=10),
        }
        for n in range(21_000)
    ]
    async with pg.db.write() as conn:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(reservations), rows[start : start + 5000])
        await conn.exec_driver_sql("ANALYZE inventory_reservations")

    with _Capture(pg) as capture:
        async with pg.db.read() as conn:
            due = await InventoryRepository().due_ids(conn, now, 500)
    expected = sorted(
        (r["expires_at"], r["id"]) for r in rows if r["status"] == "active" and r["expires_at"] <= now
    )
    assert due == [rid for _, rid in expected[:500]]
    sql, params = capture.first("inventory_reservations")

    async with pg.db.read() as conn:
        used = await explain(conn, sql, tuple(params))
    assert "ix_inventory_reservations_active_expires_at" in used, (used, sql)


async def test_the_stock_table_leaves_room_for_hot_updates(pg: Container) -> None:
    """Each stock row is updated twice a checkout and none of those updates changes an indexed
    column: with room on its page the new version is a HOT update (migration 0031: 53 % → 89 % of
    them in the checkout bench)."""
    async with pg.db.read() as conn:
        options = (
            await conn.exec_driver_sql("SELECT reloptions FROM pg_class WHERE relname = 'inventory_stock'")
        ).scalar_one()
    assert "fillfactor=50" in (options or []), options


async def test_the_claimed_queues_are_vacuumed_by_dead_rows(pg: Container) -> None:
    """The relay's and the saga runner's claims walk their partial index from the oldest end, over
    every dead entry left since the last vacuum; a vacuum triggered by 20 % of an ever-growing table
    comes ever more rarely (migration 0032: one relay claim 880 → 3,554 blocks within one bench)."""
    async with pg.db.read() as conn:
        rows = (
            await conn.exec_driver_sql(
                "SELECT relname, reloptions FROM pg_class"
                " WHERE relname IN ('messaging_outbox', 'saga_instances') AND relkind = 'r'"
            )
        ).all()
    options = {str(name): list(opts or []) for name, opts in rows}
    for table in ("messaging_outbox", "saga_instances"):
        assert "autovacuum_vacuum_scale_factor=0" in options[table], options
        assert "autovacuum_vacuum_threshold=1000" in options[table], options
