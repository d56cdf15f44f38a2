# ruff: noqa: F811 - `shop` is the fixture imported from test_checkout, used as a parameter
"""Read-model reconciliation against real checkouts: corrupt rows are found, counted, exported as
`mercato_projection_drift_rows`, and repaired by `mercato projections verify NAME --repair`.

The orders come from the real saga (simulated PSP and carrier over HTTP) through the outbox, the
relay and the projectors, on SQLite and PostgreSQL; then rows of the read models are corrupted by
hand, as a projection bug or a bad restore would.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from datetime import timedelta

import pytest
from prometheus_client import generate_latest
from sqlalchemy import delete, insert, update
from typer.testing import CliRunner

from mercato.cli.main import app
from mercato.config import get_settings
from mercato.kit.clock import ManualClock, SystemClock
from mercato.kit.projections import Projector
from mercato.shop.reporting.reconcile import RECONCILED, Reconciler
from mercato.shop.reporting.tables import order_summary, sales_by_day
from mercato.workers.projections import build_projectors
from mercato.workers.reconcile import ReadModelReconciliation
from tests.conftest import TEST_SECRET
from tests.integration.test_checkout import Shop, shop  # noqa: F401
from tests.integration.test_read_models import _project, _run_checkouts

runner = CliRunner()


def tomorrow() -> ManualClock:
    """Every order settled, and today a finished day (so `sales_by_day` is checked too)."""
    return ManualClock(SystemClock().now() + timedelta(days=1))


def tomorrow_reconciler(shop: Shop, *, seed: int | None = None) -> Reconciler:
    rng = random.Random(seed) if seed is not None else None
    return Reconciler(shop.container.db, shop.container.orders, tomorrow(), settle_s=0, rng=rng)


def drift_metric(shop: Shop, projection: str) -> float:
    text = generate_latest(shop.container.metrics_registry).decode()
    for line in text.splitlines():
        if line.startswith(f'mercato_projection_drift_rows{{projection="{projection}"}}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no drift metric for {projection}")


def pool_completed(shop: Shop) -> float:
    text = generate_latest(shop.container.metrics_registry).decode()
    for line in text.splitlines():
        if line.startswith('mercato_process_pool_completed_total{pool="cpu"}'):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no process pool metric")


async def test_corrupted_read_models_are_found_exported_and_repaired(
    shop: Shop, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    done_1, done_2, declined = await _run_checkouts(shop)
    projectors: dict[str, Projector] = build_projectors(shop.container)
    await _project(projectors)
    checks = ReadModelReconciliation(shop.container, clock=tomorrow(), settle_s=0)
    # The checks run in the container's process pool, as in `mercato worker` (ADR 0053).
    assert shop.container.cpu_pool is not None

    # A healthy read model: every settled order and day agrees, both ways.
    clean = await checks.check("order_summary", mode="full")
    assert (clean.checked, clean.rows) == (3, 0)
    sales = await checks.check("sales_by_day", mode="full")
    assert (sales.checked, sales.rows) == (1, 0)  # one (today, currency) row: two completed orders

    # Corrupt: a wrong total, a lost row, a row with no order behind it, and the day's revenue.
    async with shop.container.db.write() as conn:
        s = order_summary.c
        await conn.execute(update(order_summary).where(s.order_id == done_1).values(total_minor=1))
        await conn.execute(delete(order_summary).where(s.order_id == declined))
        ghost = uuid.uuid4()
        await conn.execute(
            insert(order_summary).values(
                order_id=ghost,
                customer_id=uuid.uuid4(),
                status="completed",
                currency="EUR",
                total_minor=100,
                item_count=1,
                items=[],
                payment_state="captured",
                updated_at=SystemClock().now(),
            )
        )
        await conn.execute(update(sales_by_day).values(revenue_minor=sales_by_day.c.revenue_minor + 1))

    full = await checks.check("order_summary", mode="full")
    assert (full.wrong, full.missing, full.extra) == ([str(done_1)], [str(declined)], [str(ghost)])
    assert drift_metric(shop, "order_summary") == 3
    # In a pool worker or inline, every full check finds exactly the same drift.
    for name in RECONCILED:
        assert await checks.check(name, mode="full") == await tomorrow_reconciler(shop).verify(
            name, mode="full"
        )
    assert pool_completed(shop) == 5  # the 3 checks above and 2 here, one job each
    # The worker's periodic pass (a sample; here it covers the three orders) sees it too.
    assert await checks.sample_pass() > 0
    assert drift_metric(shop, "order_summary") == 2  # a sample looks from orders: no extras
    assert drift_metric(shop, "sales_by_day") == 1
    assert done_2  # untouched, and not reported

    # The operator's full check exits 1 on drift; `--repair` rebuilds from the log and re-checks.
    monkeypatch.setenv("MERCATO_DATABASE_URL", database_url)
    monkeypatch.setenv("MERCATO_ENV", "test")
    monkeypatch.setenv("MERCATO_AUTH_SECRET", TEST_SECRET)
    monkeypatch.setenv("MERCATO_WORKER_RECONCILE_SETTLE_S", "0")
    get_settings.cache_clear()
    try:
        verify = ["projections", "verify", "order_summary", "--json"]
        found = await asyncio.to_thread(runner.invoke, app, verify)
        assert found.exit_code == 1, found.output
        assert json.loads(found.stdout)["drift_rows"] == 3
        repaired = await asyncio.to_thread(runner.invoke, app, [*verify, "--repair"])
        assert repaired.exit_code == 0, repaired.output
        # The JSON is the last line (the rebuild logs a line of its own before it).
        report = json.loads(repaired.stdout.strip().splitlines()[-1])
        assert report["found"]["drift_rows"] == 3
        assert report["after_repair"]["drift_rows"] == 0
    finally:
        get_settings.cache_clear()
    assert (await checks.check("order_summary", mode="full")).rows == 0
    # sales_by_day is repaired the same way (the CLI checks only finished days; this check's
    # clock makes today one), here through the projector the CLI uses.
    await projectors["sales_by_day"].rebuild()
    assert (await checks.check("sales_by_day", mode="full")).rows == 0
