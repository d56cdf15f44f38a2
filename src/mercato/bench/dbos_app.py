"""The DBOS side of ``mercato bench checkout --vs dbos``: one process running DBOS Transact (ADR 0049).

Run by `mercato.bench.dbos_checkout` as ``python -m mercato.bench.dbos_app PLAN.json RESULT.json``.
The plan names the PostgreSQL database (DBOS's system tables and the two application tables live
in it), the PSP and carrier simulators' URLs, their process ids (for CPU accounting), and the rate
ladder. The six steps, as one DBOS workflow:

1. ``create_order`` - a datasource transaction: ``INSERT`` the order (``pending``);
2. ``reserve_stock`` - a datasource transaction: the conditional ``UPDATE`` of the SKU's stock;
3. ``authorize`` - a step: the PSP's ``POST /v1/authorizations`` (our `PspClient`);
4. ``ship`` - a step: the carrier's ``POST /v1/shipments`` (our `CarrierClient`);
5. ``capture`` - a step: the PSP's capture;
6. ``complete`` - a datasource transaction: the order ``completed`` with its three provider ids.

DBOS checkpoints each step's output in its system tables (and each transaction's in the same
transaction), so a crashed workflow resumes where it stopped. Nothing else: no outbox or events,
no compensations (a failing step fails the workflow, with the stock still reserved), no idempotency
key at an HTTP edge, no deadline; the provider calls carry idempotency keys made from the workflow
id, as ours do. Workflows start in this process (``DBOS.start_workflow_async``), open loop:
workflow ``i`` of a step at ``t0 + i/rate``; latency is from that intended time to the result.

This module imports ``dbos`` (the ``bench`` extra); nothing else in the package imports it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from mercato.bench.servers import machine_busy_s, process_tree_cpu_s
from mercato.bench.stats import LatencyHistogram, achieved_rate
from mercato.bench.timetable import total_requests

AMOUNT_MINOR = 1999
PLENTY = 10_000_000

SCHEMA = """
CREATE TABLE IF NOT EXISTS hdb_stock (sku text PRIMARY KEY, available bigint NOT NULL);
CREATE TABLE IF NOT EXISTS hdb_orders (
    id text PRIMARY KEY, sku text NOT NULL, quantity int NOT NULL, amount_minor bigint NOT NULL,
    status text NOT NULL, authorization_id text, shipment_id text, capture_id text,
    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now()
);
"""


async def run(plan: dict[str, Any]) -> dict[str, Any]:
    import sqlalchemy as sa
    from dbos import DBOS, AsyncSQLAlchemyDatasource, DBOSConfig

    from mercato.providers.carrier.client import CarrierClient
    from mercato.providers.carrier.models import ShipmentItem
    from mercato.providers.psp.client import PspClient

    url: str = plan["database_url"]  # postgresql://user:pw@host:port/db
    skus = [f"HDB-{n:04d}" for n in range(int(plan["skus"]))]
    psp = PspClient(plan["psp_url"])
    carrier = CarrierClient(plan["carrier_url"])
    config: DBOSConfig = {
        "name": "mercato-bench-checkout",
        "system_database_url": url,
        "log_level": "WARNING",
    }
    DBOS(config=config)
    ds = await AsyncSQLAlchemyDatasource.create(url)
    async with ds.engine.begin() as conn:
        for statement in filter(None, (s.strip() for s in SCHEMA.split(";"))):
            await conn.execute(sa.text(statement))
        await conn.execute(
            sa.text("INSERT INTO hdb_stock (sku, available) VALUES (:sku, :n) ON CONFLICT DO NOTHING"),
            [{"sku": sku, "n": PLENTY} for sku in skus],
        )

    # READ COMMITTED: what our saga's statements run at; DBOS's default SERIALIZABLE would make the
    # hot stock row abort and retry under concurrency.
    @ds.transaction(isolation_level="READ COMMITTED")
    async def create_order(order_id: str, sku: str) -> None:
        await ds.sql_session().execute(
            sa.text(
                "INSERT INTO hdb_orders (id, sku, quantity, amount_minor, status)"
                " VALUES (:id, :sku, 1, :amount, 'pending')"
            ),
            {"id": order_id, "sku": sku, "amount": AMOUNT_MINOR},
        )

    @ds.transaction(isolation_level="READ COMMITTED")
    async def reserve_stock(sku: str) -> None:
        row = (
            await ds.sql_session().execute(
                sa.text(
                    "UPDATE hdb_stock SET available = available - 1"
                    " WHERE sku = :sku AND available >= 1 RETURNING available"
                ),
                {"sku": sku},
            )
        ).first()
        if row is None:
            raise RuntimeError(f"out of stock: {sku}")

    @DBOS.step()
    async def authorize(order_id: str) -> str:
        out = await psp.authorize(
            amount_minor=AMOUNT_MINOR,
            currency="EUR",
            order_reference=order_id,
            idempotency_key=f"{order_id}:authorize",
        )
        return str(out.authorization_id)

    @DBOS.step()
    async def ship(order_id: str, sku: str) -> str:
        out = await carrier.create_shipment(
            order_reference=order_id,
            items=[ShipmentItem(sku=sku, quantity=1)],
            idempotency_key=f"{order_id}:ship",
        )
        return str(out.shipment_id)

    @DBOS.step()
    async def capture(order_id: str, authorization_id: str) -> str:
        out = await psp.capture(
            authorization_id, amount_minor=AMOUNT_MINOR, idempotency_key=f"{order_id}:capture"
        )
        return str(out.capture_id)

    @ds.transaction(isolation_level="READ COMMITTED")
    async def complete(order_id: str, authorization_id: str, shipment_id: str, capture_id: str) -> None:
        await ds.sql_session().execute(
            sa.text(
                "UPDATE hdb_orders SET status = 'completed', authorization_id = :a, shipment_id = :s,"
                " capture_id = :c, updated_at = now() WHERE id = :id"
            ),
            {"id": order_id, "a": authorization_id, "s": shipment_id, "c": capture_id},
        )

    @DBOS.workflow()
    async def checkout(order_id: str, sku: str) -> str:
        await create_order(order_id, sku)
        await reserve_stock(sku)
        authorization_id = await authorize(order_id)
        shipment_id = await ship(order_id, sku)
        capture_id = await capture(order_id, authorization_id)
        await complete(order_id, authorization_id, shipment_id, capture_id)
        return capture_id

    DBOS.launch()
    provider_pids = [int(p) for p in plan["provider_pids"]]

    async def one_step(rate: float, duration_s: float, tag: str) -> dict[str, Any]:
        n = total_requests(rate_per_s=rate, duration_s=duration_s)
        t0 = time.monotonic() + 0.25
        wall0 = time.time() - time.monotonic()
        latencies = LatencyHistogram()
        finished: list[float] = []
        failures: list[str] = []

        async def fire(i: int) -> None:
            due = t0 + i / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            order_id = f"{tag}-{i}"
            try:
                handle = await DBOS.start_workflow_async(checkout, order_id, skus[i % len(skus)])
                await handle.get_result()
            except Exception as exc:  # noqa: BLE001 - a failed workflow is a counted outcome
                failures.append(f"{type(exc).__name__}: {exc}"[:200])
                return
            done = time.monotonic()
            latencies.record_s(done - due)
            finished.append(done)

        cpu0 = _cpu(provider_pids)
        tasks = [asyncio.create_task(fire(i)) for i in range(n)]
        _, pending = await asyncio.wait(tasks, timeout=n / rate + 0.25 + float(plan["drain_s"]))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.monotonic() - t0
        cpu1 = _cpu(provider_pids)
        completed = latencies.count
        cpu = {k: cpu1[k] - cpu0[k] for k in cpu1}
        return {
            "offered_rate": rate,
            "scheduled": n,
            "completed": completed,
            "failed": len(failures),
            "unfinished": len(pending),
            "failure_sample": failures[:3],
            "completed_rate": achieved_rate(
                ok=completed,
                span_s=n / rate,
                first_due_s=t0,
                last_done_s=max(finished) if finished else t0,
            ),
            "done_p50_ms": latencies.percentile_ms(50) if completed else 0.0,
            "done_p99_ms": latencies.percentile_ms(99) if completed else 0.0,
            "cpu_s": cpu,
            "wall_s": wall,
            "first_due_wall_s": t0 + wall0,
        }

    steps: list[dict[str, Any]] = []
    try:
        rates = [float(r) for r in plan["rates"]]
        if float(plan["warmup_s"]) > 0:
            await one_step(rates[0], float(plan["warmup_s"]), "warm")
        for number, rate in enumerate(rates, start=1):
            step = await one_step(rate, float(plan["duration_s"]), f"s{number}")
            steps.append(step)
            print(
                json.dumps({"step": number, "rate": rate, "completed_rate": step["completed_rate"]}),
                flush=True,
            )
            if plan.get("stop_when_saturated", True) and step["completed_rate"] < 0.5 * rate:
                break
    finally:
        await psp.aclose()
        await carrier.aclose()
        DBOS.destroy()
    import dbos

    return {"dbos_version": getattr(dbos, "__version__", _dist_version()), "steps": steps}


def _dist_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dbos")
    except PackageNotFoundError:  # pragma: no cover - run only with dbos installed
        return "unknown"


def _cpu(provider_pids: list[int]) -> dict[str, float]:
    """This process's CPU (every thread: DBOS runs background threads), each simulator's, the machine's."""
    figures = {"dbos app": time.process_time()}
    for name, pid in zip(("psp", "carrier"), provider_pids, strict=False):
        figures[name] = process_tree_cpu_s(pid) or 0.0
    figures["machine (all)"] = machine_busy_s()
    return figures


def main(argv: list[str]) -> int:
    plan_path, result_path = Path(argv[0]), Path(argv[1])
    result = asyncio.run(run(json.loads(plan_path.read_text(encoding="utf-8"))))
    result_path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
