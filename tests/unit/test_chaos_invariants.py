"""The chaos run's invariants over hand-made evidence: a clean run passes, each kind of damage fails."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from mercato.lab.chaos_invariants import (
    CheckoutAttempt,
    Evidence,
    LedgerEntry,
    OrderRecord,
    OutboxRecord,
    SagaRecord,
    ShipmentRecord,
    StockRecord,
    StreamRecord,
    cancelled_orders_unwound,
    check_all,
    completed_orders_paid_and_shipped,
    exactly_one_terminal_state,
    idempotent_checkouts,
    no_double_capture,
    outbox_delivered_once,
    stock_conserved,
)

T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
DONE, UNDONE, REFUNDED = "o-done", "o-undone", "o-refunded"


def clean() -> Evidence:
    """Three orders: one completed, one cancelled after a void, one cancelled after a refund."""
    events = [
        OutboxRecord("m1", "mercato.payments.payment_captured", DONE, True),
        OutboxRecord("m2", "mercato.orders.order_completed", DONE, True),
        OutboxRecord("m3", "mercato.orders.order_cancelled", UNDONE, True),
        OutboxRecord("m4", "mercato.payments.payment_captured", REFUNDED, True),
        OutboxRecord("m5", "mercato.orders.order_cancelled", REFUNDED, True),
    ]
    return Evidence(
        orders=[
            OrderRecord(DONE, "completed", 500, (("SKU-1", 2),)),
            OrderRecord(UNDONE, "cancelled", 300, (("SKU-1", 1), ("SKU-2", 1))),
            OrderRecord(REFUNDED, "cancelled", 200, (("SKU-2", 1),)),
        ],
        sagas=[
            SagaRecord(DONE, "completed", None, T0, T0 + timedelta(seconds=3)),
            SagaRecord(UNDONE, "compensated", "create_shipment failed", T0, T0 + timedelta(seconds=9)),
            SagaRecord(REFUNDED, "compensated", "mark_complete failed", T0, T0 + timedelta(seconds=5)),
        ],
        ledger=[
            LedgerEntry("authorization", DONE, "a1", None, 500),
            LedgerEntry("capture", DONE, "a1", "c1", 500),
            LedgerEntry("authorization", UNDONE, "a2", None, 300),
            LedgerEntry("void", UNDONE, "a2", None, 300),
            LedgerEntry("authorization", REFUNDED, "a3", None, 200),
            LedgerEntry("capture", REFUNDED, "a3", "c3", 200),
            LedgerEntry("refund", REFUNDED, "a3", "c3", 200),
        ],
        shipments=[
            ShipmentRecord("s1", DONE, "created"),
            ShipmentRecord("s2", UNDONE, "cancelled"),
            ShipmentRecord("s3", REFUNDED, "cancelled"),
        ],
        stock=[StockRecord("SKU-1", 10, 8, 0, 2), StockRecord("SKU-2", 5, 5, 0, 0)],
        outbox=events,
        stream_log=[StreamRecord(e.message_id, e.type, e.subject) for e in events],
        downstream_applied={e.message_id: 1 for e in events},
        checkouts=[
            CheckoutAttempt("k1", (DONE, DONE), answered=True, posts=2),
            CheckoutAttempt("k2", (UNDONE,), answered=True, posts=1),
            CheckoutAttempt("k3", (REFUNDED,), answered=True, posts=3),
        ],
        active_reservations=0,
        bound_s=60.0,
    )


def test_a_clean_run_passes_every_invariant() -> None:
    verdicts = check_all(clean())
    assert [(v.name, v.ok, v.violations) for v in verdicts] == [
        ("terminal_state", True, 0),
        ("single_capture", True, 0),
        ("completed_paid_and_shipped", True, 0),
        ("cancelled_unwound", True, 0),
        ("stock_conserved", True, 0),
        ("outbox_delivered_once", True, 0),
        ("idempotent_checkout", True, 0),
    ]
    assert [v.checked for v in verdicts] == [3, 3, 1, 2, 2, 5, 3]


def test_a_failed_saga_is_reported_with_its_failure() -> None:
    evidence = clean()
    sagas = list(evidence.sagas)
    sagas[1] = replace(sagas[1], status="failed", failure="compensation authorize_payment failed")
    verdict = exactly_one_terminal_state(replace(evidence, sagas=sagas))
    assert not verdict.ok
    assert verdict.details == [f"order {UNDONE}: saga failed: compensation authorize_payment failed"]


def test_a_pending_order_a_mismatched_saga_or_a_slow_one_is_not_terminal_once() -> None:
    evidence = clean()
    orders = list(evidence.orders)
    orders[0] = replace(orders[0], status="pending")
    assert exactly_one_terminal_state(replace(evidence, orders=orders)).violations == 1
    sagas = list(evidence.sagas)
    sagas[0] = replace(sagas[0], status="compensated")
    assert exactly_one_terminal_state(replace(evidence, sagas=sagas)).violations == 1
    sagas = list(evidence.sagas)
    sagas[1] = replace(sagas[1], finished_at=T0 + timedelta(seconds=61))
    slow = exactly_one_terminal_state(replace(evidence, sagas=sagas))
    assert slow.violations == 1
    assert "bound" in slow.details[0]
    orphan = [*evidence.sagas, SagaRecord("o-ghost", "completed", None, T0, T0)]
    assert exactly_one_terminal_state(replace(evidence, sagas=orphan)).details == [
        "saga o-ghost has no order"
    ]


def test_a_second_capture_fails_single_capture_and_completed_paid() -> None:
    evidence = clean()
    ledger = [*evidence.ledger, LedgerEntry("capture", DONE, "a1", "c9", 500)]
    damaged = replace(evidence, ledger=ledger)
    assert no_double_capture(damaged).details == [f"order {DONE} captured 2 times"]
    assert not completed_orders_paid_and_shipped(damaged).ok


def test_a_completed_order_without_shipment_or_with_its_capture_refunded_fails() -> None:
    evidence = clean()
    unshipped = replace(
        evidence, shipments=[replace(evidence.shipments[0], status="cancelled"), *evidence.shipments[1:]]
    )
    assert completed_orders_paid_and_shipped(unshipped).details == [
        f"completed order {DONE} has 0 active shipments"
    ]
    refunded = replace(evidence, ledger=[*evidence.ledger, LedgerEntry("refund", DONE, "a1", "c1", 500)])
    assert not completed_orders_paid_and_shipped(refunded).ok
    spare = replace(evidence, ledger=[*evidence.ledger, LedgerEntry("authorization", DONE, "a7", None, 500)])
    assert completed_orders_paid_and_shipped(spare).details == [
        f"completed order {DONE}: spare authorization a7 not voided"
    ]


def test_a_cancelled_order_that_keeps_money_an_authorization_or_a_shipment_fails() -> None:
    evidence = clean()
    kept = replace(evidence, ledger=[e for e in evidence.ledger if e.kind != "refund"])
    assert cancelled_orders_unwound(kept).details == [
        f"cancelled order {REFUNDED} keeps 200 captured",
        f"cancelled order {REFUNDED}: authorization a3 neither voided nor refunded",
    ]
    held = replace(evidence, ledger=[e for e in evidence.ledger if e.kind != "void"])
    assert cancelled_orders_unwound(held).details == [
        f"cancelled order {UNDONE}: authorization a2 neither voided nor refunded"
    ]
    shipped = replace(evidence, shipments=[*evidence.shipments, ShipmentRecord("s4", UNDONE, "created")])
    assert cancelled_orders_unwound(shipped).details == [f"cancelled order {UNDONE} has 1 active shipments"]


def test_lost_leaked_or_miscounted_stock_fails_conservation() -> None:
    evidence = clean()
    lost = replace(evidence, stock=[StockRecord("SKU-1", 10, 7, 0, 2), evidence.stock[1]])
    assert lost.stock[0].available + 2 != 10
    assert stock_conserved(lost).details == ["SKU-1: 7+0+2 != 10"]
    leaked = replace(
        evidence, stock=[StockRecord("SKU-1", 10, 7, 1, 2), evidence.stock[1]], active_reservations=1
    )
    assert stock_conserved(leaked).details == ["SKU-1: 1 units still reserved", "1 reservations still active"]
    miscounted = replace(evidence, stock=[StockRecord("SKU-1", 10, 7, 0, 3), evidence.stock[1]])
    assert stock_conserved(miscounted).details == ["SKU-1: committed 3 != completed units 2"]


def test_unpublished_duplicated_or_inconsistent_events_fail_delivery() -> None:
    evidence = clean()
    unpublished = replace(
        evidence, outbox=[replace(evidence.outbox[0], published=False), *evidence.outbox[1:]]
    )
    assert outbox_delivered_once(unpublished).details == [
        "outbox m1 (mercato.payments.payment_captured) never published"
    ]
    twice_logged = replace(evidence, stream_log=[*evidence.stream_log, evidence.stream_log[1]])
    assert outbox_delivered_once(twice_logged).details == ["outbox m2 appears 2 times in the stream log"]
    lost_downstream = replace(evidence, downstream_applied={**evidence.downstream_applied, "m3": 0})
    assert outbox_delivered_once(lost_downstream).details == ["outbox m3 applied 0 times downstream"]
    applied_twice = replace(evidence, downstream_applied={**evidence.downstream_applied, "m3": 2})
    assert not outbox_delivered_once(applied_twice).ok
    wrong = OutboxRecord("m6", "mercato.orders.order_completed", UNDONE, True)
    inconsistent = replace(
        evidence,
        outbox=[*evidence.outbox, wrong],
        stream_log=[*evidence.stream_log, StreamRecord("m6", wrong.type, UNDONE)],
        downstream_applied={**evidence.downstream_applied, "m6": 1},
    )
    assert outbox_delivered_once(inconsistent).details == [
        f"cancelled order {UNDONE}: 1 × mercato.orders.order_completed"
    ]
    stray = replace(evidence, stream_log=[*evidence.stream_log, StreamRecord("m9", "x.y.z", DONE)])
    assert outbox_delivered_once(stray).details == ["stream message m9 has no outbox row"]


def test_a_retried_checkout_that_made_a_second_order_fails_idempotency() -> None:
    evidence = clean()
    second = OrderRecord("o-dup", "completed", 500, (("SKU-1", 2),))
    attempts = [CheckoutAttempt("k1", (DONE, "o-dup"), answered=True, posts=2), *evidence.checkouts[1:]]
    verdict = idempotent_checkouts(replace(evidence, orders=[*evidence.orders, second], checkouts=attempts))
    assert verdict.details == [f"key k1 answered with 2 orders: ['{DONE}', 'o-dup']"]
    # An order nobody was answered with is allowed only for a checkout that was never answered.
    orphan = replace(evidence, orders=[*evidence.orders, second])
    assert not idempotent_checkouts(orphan).ok
    gave_up = [*evidence.checkouts, CheckoutAttempt("k4", (), answered=False, posts=12)]
    assert idempotent_checkouts(replace(orphan, checkouts=gave_up)).ok
