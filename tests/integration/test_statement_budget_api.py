"""Round-trip budgets for the checkout bench's two requests: PUT a cart line, POST /v1/checkout.

Every statement and every transaction costs client CPU (and on PostgreSQL network round trips), so
the number each request issues is part of its contract. The counts are taken the way the bench's
probe takes them (`mercato.bench.checkout_probe`): one per `before_cursor_execute`, and one
transaction per commit or rollback of a connection that executed at least one statement.
"""

from __future__ import annotations

import uuid

from mercato.bootstrap import Container
from tests.integration.shop_support import api, customer, product
from tests.integration.statement_budget import Tally, counting, verbs


def _work(tally: Tally) -> tuple[int, int]:
    """(statements besides BEGIN, transactions), after checking the BEGINs.

    Neither engine's BEGIN is a cursor execute: asyncpg sends its own, and on SQLite the app sends
    BEGIN (IMMEDIATE for writes) on aiosqlite's connection in one hop (ADR 0058), so none is seen.
    """
    assert tally.begins == 0, tally.report()
    return len(tally.statements), tally.transactions


async def test_put_cart_line_and_checkout_stay_within_their_round_trip_budgets(
    container: Container,
) -> None:
    await product(container, "BUDGET-1", 1250)
    await product(container, "BUDGET-2", 199)
    for sku in ("BUDGET-1", "BUDGET-2"):
        await container.inventory.set_available(sku, 100)
    _, auth = await customer(container)
    sqlite = container.db.dialect == "sqlite"
    async with api(container) as client:
        first = await client.put("/v1/carts/me/items/BUDGET-1", json={"quantity": 2}, headers=auth)
        assert first.status_code == 200, first.text

        with counting(container) as put:
            added = await client.put("/v1/carts/me/items/BUDGET-2", json={"quantity": 3}, headers=auth)
        assert added.status_code == 200, added.text
        assert [line["sku"] for line in added.json()["lines"]] == ["BUDGET-1", "BUDGET-2"]
        assert added.json()["total_minor"] == 2 * 1250 + 3 * 199

        with counting(container) as post:
            placed = await client.post(
                "/v1/checkout", json={}, headers={**auth, "Idempotency-Key": uuid.uuid4().hex}
            )
        assert placed.status_code == 202, placed.text
        assert placed.json()["total_minor"] == 2 * 1250 + 3 * 199
        cart = await client.get("/v1/carts/me", headers=auth)
        assert cart.json()["lines"] == []

    # Was 7 statements in 5 transactions: one write transaction that reads the cart joined with
    # its prices, then upserts the line; the answer is built from what it read.
    # Both on the raw driver (kit/storage/statements.py): no SQLAlchemy connection around them.
    # No BEGIN/COMMIT around them on PostgreSQL (`driver_read_then_write`): the read, then the
    # upsert committing on its own; SQLite's write transaction takes the write lock up front.
    assert _work(put) == (2, 1) if sqlite else (2, 0), put.report()
    assert [sql.split()[:2] for sql in put.statements] == [["driver:", "SELECT"], ["driver:", "INSERT"]]
    # Was 12 (13 on PostgreSQL) in 5 with two lines: claim the key (one INSERT, no savepoint);
    # read the priced cart, take it (one DELETE), write the order, its lines, the saga, the event
    # (and the saga wake-up NOTIFY on PostgreSQL); store the response. Then 8 (9) in 1, with only
    # the key's claim, the event and the stored response on the raw driver.
    # Now every statement is on the raw driver (kit/storage/statements.py), the order's own ones
    # inside its one write transaction (`on_connection`); on PostgreSQL the order and its lines
    # are one statement (a data-modifying CTE), and so are the saga and its wake-up NOTIFY.
    # ADR 0075: on PostgreSQL the cart's lines are taken and priced by one statement (a DELETE …
    # RETURNING in a CTE joined with the catalog's quotes; was the priced read, then a DELETE of
    # exactly those lines), and `order_placed` rides in the saga's insert (as a step's events ride
    # in its move): 7 → 5. SQLite reads, then deletes, and inserts in turn, as before.
    # ADR 0087: the order's reservation in the same transaction (PostgreSQL: one statement, its
    # header, takes and lines; SQLite: those in turn), and the saga's insert records that step
    # (PostgreSQL: in the same statement): 5 → 6; the saga's own move for it is gone.
    assert _work(post) == (13, 1) if sqlite else (6, 1), post.report()
    assert all(sql.startswith("driver:") for sql in post.statements), post.report()
    heads = [sql.split()[1:3] for sql in post.statements]
    # The key's claim, the order's event (the outbox insert with its NOTIFY on PostgreSQL,
    # kit/messaging) and the stored response.
    outbox = ["INSERT", "INTO"] if sqlite else ["WITH", "new_outbox_rows"]
    cart = [["SELECT", "keyed.sku,"], ["DELETE", "FROM"]] if sqlite else [["WITH", "taken_lines"]]
    order = [["INSERT", "INTO"], ["INSERT", "INTO"]] if sqlite else [["WITH", "new_order"]]
    saga = [["INSERT", "INTO"], ["INSERT", "INTO"]] if sqlite else [["WITH", "new_saga"]]
    reserve = (
        [["INSERT", "INTO"], ["SELECT", "count(*)"], ["UPDATE", "inventory_stock"], ["INSERT", "INTO"]]
        if sqlite
        else [["WITH", "new_reservation"]]
    )
    assert heads == [
        ["INSERT", "INTO"],
        *cart,
        *order,
        *reserve,
        *([*saga, outbox] if sqlite else saga),
        ["UPDATE", "idempotency_keys"],
    ], post.report()
    assert not {"SAVEPOINT", "RELEASE"} & set(verbs(post)), post.report()
