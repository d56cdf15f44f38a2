"""The checkout chaos run's invariants, as pure functions over the evidence it collected.

Each function looks at what every side recorded on its own — the shop's orders, sagas, stock and
outbox, the stream log and a fresh downstream consumer, the PSP's ledger and the carrier's
shipments — and returns a `Verdict` naming every violation it found. Nothing here does I/O, so the
checks are unit-tested with hand-made evidence, including evidence that must fail them.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

__all__ = [
    "INVARIANTS",
    "CheckoutAttempt",
    "Evidence",
    "LedgerEntry",
    "OrderRecord",
    "OutboxRecord",
    "SagaRecord",
    "ShipmentRecord",
    "StockRecord",
    "StreamRecord",
    "Verdict",
    "cancelled_orders_unwound",
    "check_all",
    "completed_orders_paid_and_shipped",
    "exactly_one_terminal_state",
    "idempotent_checkouts",
    "no_double_capture",
    "outbox_delivered_once",
    "stock_conserved",
]

ORDER_COMPLETED = "mercato.orders.order_completed"
ORDER_CANCELLED = "mercato.orders.order_cancelled"
PAYMENT_CAPTURED = "mercato.payments.payment_captured"
# How many violations a verdict keeps verbatim: enough to debug, short enough to print.
MAX_DETAILS = 20


@dataclass(frozen=True, slots=True)
class OrderRecord:
    order_id: str
    status: str
    total_minor: int
    lines: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class SagaRecord:
    saga_id: str
    status: str
    failure: str | None
    created_at: datetime
    finished_at: datetime | None


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One line of the PSP's own ledger (`kind`: authorization, decline, capture, void, refund)."""

    kind: str
    order_reference: str
    authorization_id: str
    capture_id: str | None
    amount_minor: int


@dataclass(frozen=True, slots=True)
class ShipmentRecord:
    shipment_id: str
    order_reference: str
    status: str  # created | cancelled (as the carrier says)


@dataclass(frozen=True, slots=True)
class StockRecord:
    sku: str
    initial: int
    available: int
    reserved: int
    committed: int


@dataclass(frozen=True, slots=True)
class OutboxRecord:
    message_id: str
    type: str
    subject: str
    published: bool


@dataclass(frozen=True, slots=True)
class StreamRecord:
    message_id: str
    type: str
    subject: str


@dataclass(frozen=True, slots=True)
class CheckoutAttempt:
    """One client checkout: its Idempotency-Key, every order id its POSTs were answered with, and
    whether it was ever answered at all (a client that gave up may have left an order behind)."""

    key: str
    order_ids: tuple[str, ...]
    answered: bool
    posts: int


@dataclass(frozen=True)
class Evidence:
    orders: Sequence[OrderRecord]
    sagas: Sequence[SagaRecord]
    ledger: Sequence[LedgerEntry]
    shipments: Sequence[ShipmentRecord]
    stock: Sequence[StockRecord]
    outbox: Sequence[OutboxRecord]
    stream_log: Sequence[StreamRecord]
    # message id -> how many times a fresh consumer group applied it through the inbox.
    downstream_applied: Mapping[str, int]
    checkouts: Sequence[CheckoutAttempt]
    active_reservations: int
    # The longest a saga may take from start to terminal state (deadline plus compensation time).
    bound_s: float


@dataclass
class Verdict:
    name: str
    description: str
    checked: int = 0
    violations: int = 0
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.violations == 0

    def fail(self, detail: str) -> None:
        self.violations += 1
        if len(self.details) < MAX_DETAILS:
            self.details.append(detail)


def _by_order(ledger: Sequence[LedgerEntry]) -> dict[str, list[LedgerEntry]]:
    out: dict[str, list[LedgerEntry]] = defaultdict(list)
    for entry in ledger:
        out[entry.order_reference].append(entry)
    return out


def _active_shipments(shipments: Sequence[ShipmentRecord]) -> Counter[str]:
    return Counter(s.order_reference for s in shipments if s.status != "cancelled")


def _net_captured(entries: Sequence[LedgerEntry]) -> int:
    captured = sum(e.amount_minor for e in entries if e.kind == "capture")
    refunded = sum(e.amount_minor for e in entries if e.kind == "refund")
    return captured - refunded


def exactly_one_terminal_state(evidence: Evidence) -> Verdict:
    """Every order is `completed` xor `cancelled`, its saga agrees (completed / compensated), and
    the saga got there within the bound. A `failed` saga (a compensation that gave up) is reported
    with its failure: it needs a human, so the run did not take care of itself."""
    verdict = Verdict(
        "terminal_state", "every order completed xor cancelled, its saga finished within the bound"
    )
    sagas = {s.saga_id: s for s in evidence.sagas}
    expected = {"completed": "completed", "cancelled": "compensated"}
    for order in evidence.orders:
        verdict.checked += 1
        saga = sagas.get(order.order_id)
        if saga is None:
            verdict.fail(f"order {order.order_id} has no saga")
            continue
        if saga.status == "failed":
            verdict.fail(f"order {order.order_id}: saga failed: {saga.failure}")
            continue
        if order.status not in expected:
            verdict.fail(f"order {order.order_id} is {order.status} (saga {saga.status})")
            continue
        if saga.status != expected[order.status]:
            verdict.fail(f"order {order.order_id} is {order.status} but its saga is {saga.status}")
            continue
        if saga.finished_at is None:
            verdict.fail(f"order {order.order_id}: saga {saga.status} without a finish time")
            continue
        took_s = (saga.finished_at - saga.created_at).total_seconds()
        if took_s > evidence.bound_s:
            verdict.fail(f"order {order.order_id} took {took_s:.1f} s > bound {evidence.bound_s:.1f} s")
    orders = {o.order_id for o in evidence.orders}
    for saga in evidence.sagas:
        if saga.saga_id not in orders:
            verdict.fail(f"saga {saga.saga_id} has no order")
    return verdict


def no_double_capture(evidence: Evidence) -> Verdict:
    """From the PSP's own ledger: no order was captured more than once, and every capture belongs
    to an order the shop knows."""
    verdict = Verdict("single_capture", "no order captured twice (PSP ledger)")
    orders = {o.order_id for o in evidence.orders}
    for reference, entries in _by_order(evidence.ledger).items():
        verdict.checked += 1
        captures = [e for e in entries if e.kind == "capture"]
        if len(captures) > 1:
            verdict.fail(f"order {reference} captured {len(captures)} times")
        if captures and reference not in orders:
            verdict.fail(f"capture for unknown order {reference}")
    return verdict


def completed_orders_paid_and_shipped(evidence: Evidence) -> Verdict:
    """A completed order has exactly one capture of its total, not refunded, every other
    authorization voided, and exactly one shipment that is not cancelled."""
    verdict = Verdict("completed_paid_and_shipped", "completed: one capture kept, one active shipment")
    ledger = _by_order(evidence.ledger)
    active = _active_shipments(evidence.shipments)
    for order in evidence.orders:
        if order.status != "completed":
            continue
        verdict.checked += 1
        entries = ledger.get(order.order_id, [])
        captures = [e for e in entries if e.kind == "capture"]
        if len(captures) != 1:
            verdict.fail(f"completed order {order.order_id} has {len(captures)} captures")
        elif _net_captured(entries) != order.total_minor:
            verdict.fail(
                f"completed order {order.order_id}: net captured {_net_captured(entries)} "
                f"!= total {order.total_minor}"
            )
        captured_auths = {e.authorization_id for e in captures}
        voided = {e.authorization_id for e in entries if e.kind == "void"}
        for auth in {e.authorization_id for e in entries if e.kind == "authorization"}:
            if auth not in captured_auths and auth not in voided:
                verdict.fail(f"completed order {order.order_id}: spare authorization {auth} not voided")
        if active[order.order_id] != 1:
            verdict.fail(f"completed order {order.order_id} has {active[order.order_id]} active shipments")
    return verdict


def cancelled_orders_unwound(evidence: Evidence) -> Verdict:
    """A cancelled order keeps no money and ships nothing: captured − refunded = 0, every
    authorization voided or (when captured) refunded, no shipment left active."""
    verdict = Verdict("cancelled_unwound", "cancelled: no net capture, auths voided/refunded, no shipment")
    ledger = _by_order(evidence.ledger)
    active = _active_shipments(evidence.shipments)
    for order in evidence.orders:
        if order.status != "cancelled":
            continue
        verdict.checked += 1
        entries = ledger.get(order.order_id, [])
        net = _net_captured(entries)
        if net != 0:
            verdict.fail(f"cancelled order {order.order_id} keeps {net} captured")
        voided = {e.authorization_id for e in entries if e.kind == "void"}
        captured = {e.authorization_id for e in entries if e.kind == "capture"}
        refunded_auths = {e.authorization_id for e in entries if e.kind == "refund"}
        for auth in sorted({e.authorization_id for e in entries if e.kind == "authorization"}):
            if auth in voided:
                continue
            if auth in captured and auth in refunded_auths:
                continue
            verdict.fail(
                f"cancelled order {order.order_id}: authorization {auth} neither voided nor refunded"
            )
        if active[order.order_id]:
            verdict.fail(f"cancelled order {order.order_id} has {active[order.order_id]} active shipments")
    return verdict


def stock_conserved(evidence: Evidence) -> Verdict:
    """Per SKU: initial = available + reserved + committed; at the end nothing is reserved (every
    reservation released or committed) and committed = the units of completed orders."""
    verdict = Verdict("stock_conserved", "initial = available + reserved + committed; reserved = 0")
    shipped: Counter[str] = Counter()
    for order in evidence.orders:
        if order.status == "completed":
            for sku, quantity in order.lines:
                shipped[sku] += quantity
    for level in evidence.stock:
        verdict.checked += 1
        total = level.available + level.reserved + level.committed
        if total != level.initial:
            verdict.fail(
                f"{level.sku}: {level.available}+{level.reserved}+{level.committed} != {level.initial}"
            )
        if level.reserved != 0:
            verdict.fail(f"{level.sku}: {level.reserved} units still reserved")
        if level.committed != shipped[level.sku]:
            verdict.fail(f"{level.sku}: committed {level.committed} != completed units {shipped[level.sku]}")
    known = {level.sku for level in evidence.stock}
    for sku in sorted(set(shipped) - known):
        verdict.fail(f"{sku}: completed orders but no stock row")
    if evidence.active_reservations:
        verdict.fail(f"{evidence.active_reservations} reservations still active")
    return verdict


ORDER_EVENT_PREFIXES = ("mercato.orders.", "mercato.payments.")


def outbox_delivered_once(evidence: Evidence) -> Verdict:
    """Every outbox row was published and appears exactly once in the stream log and exactly once
    downstream (after inbox dedup); nothing downstream came from nowhere; and each order's events
    match its outcome (order_completed only for completed orders, order_cancelled only for
    cancelled ones, one payment_captured per completed order)."""
    verdict = Verdict("outbox_delivered_once", "every event published, seen downstream exactly once")
    logged = Counter(r.message_id for r in evidence.stream_log)
    outbox_ids = {r.message_id for r in evidence.outbox}
    for row in evidence.outbox:
        verdict.checked += 1
        if not row.published:
            verdict.fail(f"outbox {row.message_id} ({row.type}) never published")
        if logged[row.message_id] != 1:
            verdict.fail(f"outbox {row.message_id} appears {logged[row.message_id]} times in the stream log")
        applied = evidence.downstream_applied.get(row.message_id, 0)
        if applied != 1:
            verdict.fail(f"outbox {row.message_id} applied {applied} times downstream")
    for message_id in sorted(set(logged) - outbox_ids):
        verdict.fail(f"stream message {message_id} has no outbox row")
    for message_id in sorted(set(evidence.downstream_applied) - outbox_ids):
        verdict.fail(f"downstream message {message_id} has no outbox row")
    # Per order: the order and payment contexts' events (the catalog's have a product as subject).
    events: dict[str, Counter[str]] = defaultdict(Counter)
    for row in evidence.outbox:
        if row.type.startswith(ORDER_EVENT_PREFIXES):
            events[row.subject][row.type] += 1
    orders = {o.order_id: o for o in evidence.orders}
    for subject in sorted(set(events) - set(orders)):
        verdict.fail(f"events for unknown order {subject}")
    expected = {
        "completed": {ORDER_COMPLETED: 1, ORDER_CANCELLED: 0, PAYMENT_CAPTURED: 1},
        "cancelled": {ORDER_COMPLETED: 0, ORDER_CANCELLED: 1},
    }
    for order in evidence.orders:
        seen = events[order.order_id]
        for event_type, count in expected.get(order.status, {}).items():
            if seen[event_type] != count:
                verdict.fail(f"{order.status} order {order.order_id}: {seen[event_type]} × {event_type}")
        if seen[PAYMENT_CAPTURED] > 1:
            verdict.fail(f"order {order.order_id}: {seen[PAYMENT_CAPTURED]} × {PAYMENT_CAPTURED}")
    return verdict


def idempotent_checkouts(evidence: Evidence) -> Verdict:
    """Retrying a POST /v1/checkout with the same Idempotency-Key never made a second order: each
    key was answered with one order id, every answered id exists, and the shop holds no more orders
    than answered checkouts plus the ones never answered (whose order may or may not exist)."""
    verdict = Verdict("idempotent_checkout", "one order per Idempotency-Key, however often retried")
    orders = {o.order_id for o in evidence.orders}
    answered: set[str] = set()
    unanswered = 0
    for attempt in evidence.checkouts:
        verdict.checked += 1
        distinct = set(attempt.order_ids)
        if len(distinct) > 1:
            verdict.fail(f"key {attempt.key} answered with {len(distinct)} orders: {sorted(distinct)}")
        for order_id in distinct:
            if order_id not in orders:
                verdict.fail(f"key {attempt.key}: answered order {order_id} does not exist")
            if order_id in answered:
                verdict.fail(f"order {order_id} answered for two keys")
        answered |= distinct
        if not attempt.answered:
            unanswered += 1
    extra = len(orders - answered)
    if extra > unanswered:
        verdict.fail(f"{extra} orders nobody was answered with, but only {unanswered} unanswered checkouts")
    return verdict


INVARIANTS: tuple[Callable[[Evidence], Verdict], ...] = (
    exactly_one_terminal_state,
    no_double_capture,
    completed_orders_paid_and_shipped,
    cancelled_orders_unwound,
    stock_conserved,
    outbox_delivered_once,
    idempotent_checkouts,
)


def check_all(evidence: Evidence) -> list[Verdict]:
    return [invariant(evidence) for invariant in INVARIANTS]
