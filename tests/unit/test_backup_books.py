"""The restored copy's invariants (`mercato backup verify --cluster`) as pure functions: books that
balance pass; each kind of break is named."""

from __future__ import annotations

from dataclasses import replace

from mercato.lab.backup_verify import Books, Order, Reservation, Saga, check_books

PAID = "o-paid"
CANCELLED = "o-cancelled"
PENDING = "o-pending"


def _books() -> Books:
    return Books(
        stock={"SKU-1": (1, 2)},
        reservations=[
            Reservation(PAID, "committed", {"SKU-1": 2}),
            Reservation(CANCELLED, "released", {"SKU-1": 3}),
            Reservation(PENDING, "active", {"SKU-1": 1}),
        ],
        orders=[
            Order(PAID, "completed", 500, {"SKU-1": 2}),
            Order(CANCELLED, "cancelled", 700, {"SKU-1": 3}),
            Order(PENDING, "pending", 250, {"SKU-1": 1}),  # in flight when the backup was taken
        ],
        sagas={
            PAID: Saga(PAID, "completed", {"amount_minor": 500, "capture_id": "c1", "shipment_id": "s1"}),
            CANCELLED: Saga(CANCELLED, "compensated", {"amount_minor": 700}),
            PENDING: Saga(PENDING, "running", {"amount_minor": 250}),
        },
        steps={
            (PAID, "capture_payment", "forward"),
            (PAID, "create_shipment", "forward"),
        },
        captured_events=[PAID],
    )


def _problems(books: Books) -> list[str]:
    return [f"{v.name}: {d}" for v in check_books(books) for d in v.details]


def test_balanced_books_pass_including_an_order_in_flight() -> None:
    verdicts = check_books(_books())
    assert all(v.ok for v in verdicts), [v.details for v in verdicts]
    assert all(v.checked for v in verdicts)


def test_a_lost_shipment_record_is_named() -> None:
    books = _books()
    books = replace(books, steps=books.steps - {(PAID, "create_shipment", "forward")})
    assert _problems(books) == [
        f"completed_paid_and_shipped: completed order {PAID}: no shipment recorded (create_shipment step)"
    ]


def test_stock_that_does_not_match_the_reservations_is_named() -> None:
    problems = _problems(replace(_books(), stock={"SKU-1": (0, 2)}))
    assert problems == ["stock_conserved: SKU-1: reserved 0 != 1 units in active reservations"]


def test_a_completed_order_whose_reservation_was_not_committed_is_named() -> None:
    books = _books()
    reservations = [Reservation(PAID, "active", {"SKU-1": 2}), *books.reservations[1:]]
    problems = _problems(replace(books, reservations=reservations, stock={"SKU-1": (3, 0)}))
    assert problems == [f"stock_conserved: completed order {PAID}: reservation active, not committed"]


def test_a_capture_without_an_order_is_named() -> None:
    problems = _problems(replace(_books(), captured_events=[PAID, "o-ghost"]))
    assert problems == ["no_capture_without_order: capture for order o-ghost, which does not exist"]


def test_a_captured_cancelled_order_must_have_been_refunded() -> None:
    books = _books()
    captured = replace(books, steps=books.steps | {(CANCELLED, "capture_payment", "forward")})
    assert _problems(captured) == [
        f"no_capture_without_order: cancelled order {CANCELLED} was captured and not refunded"
    ]
    refunded = replace(captured, steps=captured.steps | {(CANCELLED, "capture_payment", "compensate")})
    assert _problems(refunded) == []


def test_an_order_without_its_saga_is_named() -> None:
    books = _books()
    sagas = {k: v for k, v in books.sagas.items() if k != PENDING}
    assert _problems(replace(books, sagas=sagas)) == [
        f"orders_and_sagas_agree: order {PENDING} (pending) has no saga"
    ]
