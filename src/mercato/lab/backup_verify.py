"""`mercato backup verify --cluster`: a backup is good only if the shop's books balance in a restore.

pgBackRest's own `verify` proves the repository's files match their checksums; that says nothing
about whether the database they make is one the shop can run on. So the backup (the newest state,
or the state at `--to-time`) is restored into a scratch folder, started there on a free port
(`mercato.cluster.backup.restore_and_start`: never over a live node), and the shop's invariants are
checked on that copy from the shop's own records — the only ones a restore brings back (the PSP's
ledger and the carrier's shipments are other companies' systems):

- **stock conserved**: per SKU, `reserved` = the units of active reservations and `committed` = the
  units of committed reservations; a completed order's reservation is committed with exactly the
  order's units, a cancelled order holds none;
- **completed orders paid and shipped**: a completed order's saga completed, with a capture and a
  shipment recorded (the saga's `capture_payment` and `create_shipment` steps succeeded and their
  ids are in its data), the amount captured its total;
- **no capture without an order**: every capture the shop recorded (saga step or
  `payment_captured` event) belongs to an existing order that is completed, or cancelled and
  refunded;
- **orders and sagas agree**: every order has its saga; completed ↔ completed, cancelled ↔
  compensated.

A copy taken while checkouts were in flight is fine: pending orders with running sagas and active
reservations are consistent states. The checks are pure functions over `Books` (unit-tested with
hand-made books that must fail them); `collect_books` reads a restored database.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import create_async_engine

from mercato.cluster.backup import BackupFailed, restore_and_start, stop_scratch
from mercato.cluster.backup import run as pgbackrest
from mercato.cluster.topology import Topology
from mercato.kit.messaging.tables import outbox
from mercato.kit.sagas.store import saga_instances, saga_steps
from mercato.lab.chaos_invariants import Verdict
from mercato.shop.checkout.model import ORDER_SAGA
from mercato.shop.inventory.tables import reservation_lines, reservations, stock
from mercato.shop.orders.tables import order_lines, orders

__all__ = [
    "Books",
    "VerifyReport",
    "check_books",
    "collect_books",
    "verify_cluster_backup",
]

CAPTURED_EVENT = "mercato.payments.payment_captured"


@dataclass(frozen=True)
class Order:
    order_id: str
    status: str
    total_minor: int
    units: dict[str, int]


@dataclass(frozen=True)
class Saga:
    saga_id: str
    status: str
    data: dict[str, Any]


@dataclass(frozen=True)
class Reservation:
    reference: str
    status: str
    units: dict[str, int]


@dataclass(frozen=True)
class Books:
    """What the shop's own database says (a restored copy has nothing else)."""

    stock: dict[str, tuple[int, int]]  # sku -> (reserved, committed)
    reservations: list[Reservation]
    orders: list[Order]
    sagas: dict[str, Saga]  # order sagas by id (= the order id)
    # (saga id, step, direction) of every step that succeeded
    steps: set[tuple[str, str, str]]
    captured_events: list[str] = field(default_factory=list)  # orders named by payment_captured


def stock_conserved(books: Books) -> Verdict:
    verdict = Verdict("stock_conserved", "reserved/committed = active/committed reservations; orders match")
    active: Counter[str] = Counter()
    committed: Counter[str] = Counter()
    for r in books.reservations:
        target = active if r.status == "active" else committed if r.status == "committed" else None
        if target is not None:
            target.update(r.units)
    for sku, (reserved, done) in sorted(books.stock.items()):
        verdict.checked += 1
        if reserved != active[sku]:
            verdict.fail(f"{sku}: reserved {reserved} != {active[sku]} units in active reservations")
        if done != committed[sku]:
            verdict.fail(f"{sku}: committed {done} != {committed[sku]} units in committed reservations")
    for sku in sorted((set(active) | set(committed)) - set(books.stock)):
        verdict.fail(f"{sku}: reservations but no stock row")
    by_reference = {r.reference: r for r in books.reservations}
    for order in books.orders:
        reservation = by_reference.get(order.order_id)
        if order.status == "completed":
            verdict.checked += 1
            if reservation is None or reservation.status != "committed":
                state = "none" if reservation is None else reservation.status
                verdict.fail(f"completed order {order.order_id}: reservation {state}, not committed")
            elif reservation.units != order.units:
                verdict.fail(
                    f"completed order {order.order_id}: committed {reservation.units} "
                    f"!= ordered {order.units}"
                )
        elif order.status == "cancelled" and reservation is not None:
            verdict.checked += 1
            if reservation.status in ("active", "committed"):
                verdict.fail(
                    f"cancelled order {order.order_id} still holds a {reservation.status} reservation"
                )
    return verdict


def _done(books: Books, saga_id: str, step: str, direction: str = "forward") -> bool:
    return (saga_id, step, direction) in books.steps


def completed_orders_paid_and_shipped(books: Books) -> Verdict:
    verdict = Verdict("completed_paid_and_shipped", "completed: saga completed, captured its total, shipped")
    for order in books.orders:
        if order.status != "completed":
            continue
        verdict.checked += 1
        saga = books.sagas.get(order.order_id)
        if saga is None or saga.status != "completed":
            verdict.fail(f"completed order {order.order_id}: saga {saga.status if saga else 'missing'}")
            continue
        if not (_done(books, saga.saga_id, "capture_payment") and saga.data.get("capture_id")):
            verdict.fail(f"completed order {order.order_id}: no capture recorded (capture_payment step)")
        elif int(saga.data.get("amount_minor", -1)) != order.total_minor:
            verdict.fail(
                f"completed order {order.order_id}: captured {saga.data.get('amount_minor')} "
                f"!= total {order.total_minor}"
            )
        if not (_done(books, saga.saga_id, "create_shipment") and saga.data.get("shipment_id")):
            verdict.fail(f"completed order {order.order_id}: no shipment recorded (create_shipment step)")
        for step in ("capture_payment", "create_shipment"):
            if _done(books, saga.saga_id, step, "compensate"):
                verdict.fail(f"completed order {order.order_id}: {step} was undone")
    return verdict


def no_capture_without_order(books: Books) -> Verdict:
    verdict = Verdict("no_capture_without_order", "every capture belongs to a completed (or refunded) order")
    by_id = {o.order_id: o for o in books.orders}
    captured = {s.saga_id for s in books.sagas.values() if _done(books, s.saga_id, "capture_payment")}
    captured |= set(books.captured_events)
    for order_id in sorted(captured):
        verdict.checked += 1
        order = by_id.get(order_id)
        if order is None:
            verdict.fail(f"capture for order {order_id}, which does not exist")
        elif order.status == "cancelled" and not _done(books, order_id, "capture_payment", "compensate"):
            verdict.fail(f"cancelled order {order_id} was captured and not refunded")
        elif order.status not in ("completed", "cancelled") and order_id not in books.sagas:
            verdict.fail(f"{order.status} order {order_id} captured without a saga")
    return verdict


def orders_and_sagas_agree(books: Books) -> Verdict:
    verdict = Verdict("orders_and_sagas_agree", "every order has its saga; final states match")
    expected = {"completed": {"completed"}, "cancelled": {"compensated"}}
    for order in books.orders:
        verdict.checked += 1
        saga = books.sagas.get(order.order_id)
        if saga is None:
            verdict.fail(f"order {order.order_id} ({order.status}) has no saga")
        elif order.status in expected and saga.status not in expected[order.status]:
            verdict.fail(f"order {order.order_id} is {order.status} but its saga is {saga.status}")
        elif saga.status == "completed" and order.status != "completed":
            verdict.fail(f"saga {saga.saga_id} completed but its order is {order.status}")
    orders_ = {o.order_id for o in books.orders}
    for saga_id in sorted(set(books.sagas) - orders_):
        verdict.fail(f"saga {saga_id} has no order")
    return verdict


CHECKS: tuple[Callable[[Books], Verdict], ...] = (
    stock_conserved,
    completed_orders_paid_and_shipped,
    no_capture_without_order,
    orders_and_sagas_agree,
)


def check_books(books: Books) -> list[Verdict]:
    return [check(books) for check in CHECKS]


def _units(rows: list[tuple[str, int]]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for sku, quantity in rows:
        out[sku] += quantity
    return dict(out)


async def collect_books(url: str) -> Books:
    """Read the shop's books from the database at `url` (a SQLAlchemy URL, e.g. a restored copy)."""
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    try:
        async with engine.connect() as conn:
            lines: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for r in await conn.execute(
                select(order_lines.c.order_id, order_lines.c.sku, order_lines.c.quantity)
            ):
                lines[str(r.order_id)].append((str(r.sku), int(r.quantity)))
            order_rows = [
                Order(str(r.id), str(r.status), int(r.total_minor), _units(lines[str(r.id)]))
                for r in await conn.execute(select(orders.c.id, orders.c.status, orders.c.total_minor))
            ]
            held: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for r in await conn.execute(select(reservation_lines)):
                held[str(r.reservation_id)].append((str(r.sku), int(r.quantity)))
            reservation_rows = [
                Reservation(str(r.reference), str(r.status), _units(held[str(r.id)]))
                for r in await conn.execute(
                    select(reservations.c.id, reservations.c.reference, reservations.c.status)
                )
            ]
            levels = {
                str(r.sku): (int(r.reserved), int(r.committed))
                for r in await conn.execute(select(stock.c.sku, stock.c.reserved, stock.c.committed))
            }
            sagas = {
                str(r.id): Saga(str(r.id), str(r.status), dict(r.data or {}))
                for r in await conn.execute(
                    select(saga_instances.c.id, saga_instances.c.status, saga_instances.c.data).where(
                        saga_instances.c.saga_type == ORDER_SAGA
                    )
                )
            }
            steps = {
                (str(r.saga_id), str(r.step), str(r.direction))
                for r in await conn.execute(
                    select(saga_steps.c.saga_id, saga_steps.c.step, saga_steps.c.direction).where(
                        saga_steps.c.outcome == "succeeded"
                    )
                )
            }
            events = [
                str(r.key)
                for r in await conn.execute(select(outbox.c.key).where(outbox.c.type == CAPTURED_EVENT))
            ]
    finally:
        await engine.dispose()
    return Books(levels, reservation_rows, order_rows, sagas, steps, events)


@dataclass
class VerifyReport:
    """One `backup verify --cluster`: the repository check, the scratch restore, the shop's books."""

    repository: str = ""
    restored_into: str = ""
    to_time: str | None = None
    restore_s: float = 0.0
    check_s: float = 0.0
    orders: int = 0
    verdicts: list[Verdict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.verdicts) and all(v.ok for v in self.verdicts)

    def problems(self) -> list[str]:
        return [f"{v.name}: {d}" for v in self.verdicts for d in v.details]


def restored_url(port: int, database: str) -> str:
    return f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{database}"


def verify_cluster_backup(
    topology: Topology,
    *,
    to_time: datetime | None = None,
    database: str = "mercato",
    keep: bool = False,
    tamper: Callable[[str], None] | None = None,
) -> VerifyReport:
    """pgBackRest `verify` (checksums of every backup file and archived WAL segment), then a restore
    into `<root>/restored/verify-<time>` started on a free port, then the shop's invariants on it.
    The scratch server is stopped and (unless `keep`) its folder deleted afterwards. `tamper` (tests
    only) gets the restored database's URL before the checks run, to prove they catch a break.
    Raises `BackupFailed` when the repository or the restore is unusable."""
    report = VerifyReport(to_time=None if to_time is None else to_time.isoformat())
    said = pgbackrest(topology, "verify", timeout_s=900.0).strip()
    report.repository = said or "checksums of backups and WAL verified"
    target = topology.dir(
        "restored", f"verify-{time.strftime('%Y%m%dT%H%M%S')}-{time.monotonic_ns() % 10**6}"
    )
    report.restored_into = str(target)
    scratch = restore_and_start(topology, target, to_time=to_time)
    report.restore_s = scratch.ready_s
    try:
        url = restored_url(scratch.port, database)
        if tamper is not None:
            tamper(url)
        started = time.monotonic()
        try:
            books = asyncio.run(collect_books(url))
        except Exception as exc:
            raise BackupFailed(
                f"the restored copy has no readable shop database {database!r}: {exc}"
            ) from exc
        report.orders = len(books.orders)
        report.verdicts = check_books(books)
        report.check_s = time.monotonic() - started
    finally:
        stop_scratch(target)
        if not keep:
            shutil.rmtree(target, ignore_errors=True)
    return report
