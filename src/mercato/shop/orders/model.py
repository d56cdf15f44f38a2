"""Order entities and rules. Pure: no I/O.

An order is a record of what was sold: each line copies the SKU, name and unit price at the
moment of ordering, so later catalog changes never rewrite history. Money is integer minor units.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from mercato.kit.errors import NotFound, RuleViolated

MAX_ORDER_LINES = 500


class OrderNotFound(NotFound):
    slug = "order-not-found"
    title = "Order not found"
    description = "No order with this id exists, or it belongs to another customer."


class EmptyCart(RuleViolated):
    slug = "empty-cart"
    title = "Cart is empty"
    description = "An order is made from the cart, and the cart has no lines."


class UnavailableItems(RuleViolated):
    slug = "cart-has-unavailable-items"
    title = "Cart has unavailable items"
    description = (
        "Some cart lines can no longer be ordered (archived product or changed currency); "
        "`skus` lists them. Remove them and retry."
    )


class InvalidOrder(RuleViolated):
    slug = "invalid-order"
    title = "Invalid order"
    description = "The order's lines break a rule (currencies, quantities, prices or line count)."


class OrderStatus(StrEnum):
    PENDING = "pending"
    CONFIRMED = "confirmed"
    COMPLETED = "completed"
    CANCELLED = "cancelled"
    FAILED = "failed"

    @property
    def terminal(self) -> bool:
        return self in (OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED)


# The order's life: checkout drives it from pending to exactly one terminal state.
ALLOWED_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    OrderStatus.PENDING: frozenset(
        {OrderStatus.CONFIRMED, OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED}
    ),
    OrderStatus.CONFIRMED: frozenset({OrderStatus.COMPLETED, OrderStatus.CANCELLED, OrderStatus.FAILED}),
    OrderStatus.COMPLETED: frozenset(),
    OrderStatus.CANCELLED: frozenset(),
    OrderStatus.FAILED: frozenset(),
}


def sources_of(target: OrderStatus) -> tuple[OrderStatus, ...]:
    """The states that may move to `target` (not `target` itself)."""
    return tuple(source for source, targets in ALLOWED_TRANSITIONS.items() if target in targets)


class IllegalTransition(RuleViolated):
    slug = "illegal-order-transition"
    title = "Illegal order state change"
    description = "The order cannot move from its current state to the requested one."


@dataclass(frozen=True, slots=True)
class OrderLine:
    line_no: int
    product_id: uuid.UUID
    sku: str
    name: str
    unit_price_minor: int
    quantity: int
    line_total_minor: int


@dataclass(frozen=True, slots=True)
class Order:
    id: uuid.UUID
    customer_id: uuid.UUID
    status: OrderStatus
    currency: str
    total_minor: int
    item_count: int
    version: int
    created_at: datetime
    updated_at: datetime
    # Empty in list views, which never load lines.
    lines: tuple[OrderLine, ...] = ()

    def visible_to(self, customer_id: uuid.UUID | None, *, read_all: bool) -> bool:
        return read_all or self.customer_id == customer_id

    def can_become(self, target: OrderStatus) -> bool:
        """True when `target` is reachable now; moving to the state it is already in is a no-op."""
        return target is self.status or target in ALLOWED_TRANSITIONS[self.status]


@dataclass(frozen=True, slots=True)
class LineDraft:
    """A priced line about to become an order line."""

    product_id: uuid.UUID
    sku: str
    name: str
    unit_price_minor: int
    quantity: int
    currency: str


def place_order(
    *, order_id: uuid.UUID, customer_id: uuid.UUID, lines: Sequence[LineDraft], now: datetime
) -> Order:
    """A new pending order with totals computed from the lines."""
    if not lines:
        raise EmptyCart("the cart is empty")
    if len(lines) > MAX_ORDER_LINES:
        raise InvalidOrder(f"an order has at most {MAX_ORDER_LINES} lines")
    currencies = {line.currency for line in lines}
    if len(currencies) != 1:
        raise InvalidOrder("an order is paid in one currency, got " + ", ".join(sorted(currencies)))
    if len({line.sku for line in lines}) != len(lines):
        raise InvalidOrder("each SKU appears once in an order")
    order_lines = []
    for number, draft in enumerate(lines, start=1):
        if draft.quantity <= 0:
            raise InvalidOrder(f"quantity of {draft.sku} must be positive")
        if draft.unit_price_minor < 0:
            raise InvalidOrder(f"price of {draft.sku} must not be negative")
        order_lines.append(
            OrderLine(
                line_no=number,
                product_id=draft.product_id,
                sku=draft.sku,
                name=draft.name,
                unit_price_minor=draft.unit_price_minor,
                quantity=draft.quantity,
                line_total_minor=draft.unit_price_minor * draft.quantity,
            )
        )
    return Order(
        id=order_id,
        customer_id=customer_id,
        status=OrderStatus.PENDING,
        currency=currencies.pop(),
        total_minor=sum(line.line_total_minor for line in order_lines),
        item_count=sum(line.quantity for line in order_lines),
        version=1,
        created_at=now,
        updated_at=now,
        lines=tuple(order_lines),
    )
