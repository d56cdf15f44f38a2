"""Checkout use cases and the order saga (guide: "Resilient Payment Workflow").

CreateOrder(pending) → ReserveInventory → AuthorizePayment → CreateShipment → CapturePayment →
MarkOrder(complete). On failure the saga runs only the compensations the progress requires,
newest first: Refund (capture), CancelShipment, VoidAuthorization, ReleaseInventory, CancelOrder.

Local steps (reserve, mark complete, cancel, release) run inside the saga's own transaction, so
their effects commit with the saga's progress. Remote steps call the payment provider and the
carrier with an idempotency key derived from the saga id and step, so a retry, a resumed saga
after a crash, or a compensation asking "what did I do?" is applied once by the provider.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.errors import Conflict
from mercato.kit.sagas import (
    EventSink,
    RetrySchedule,
    SagaDefinition,
    SagaStore,
    StagingEventSink,
    Step,
    StepContext,
    StepOutcome,
    StepRejected,
)
from mercato.kit.storage import Database
from mercato.shop.checkout.model import (
    ORDER_SAGA,
    Authorization,
    Capture,
    OrderStep,
    PaymentDeclined,
    PaymentRecord,
    ProviderConflict,
    ProviderRejected,
    Shipment,
    failure_reason,
)
from mercato.shop.orders.contracts import OrderSnapshot


class OrderDesk(Protocol):
    """The orders context, as checkout uses it (implemented by OrdersService)."""

    async def open_from_cart(self, conn: AsyncConnection, customer_id: uuid.UUID) -> OrderSnapshot: ...

    async def move_to(
        self,
        order_id: uuid.UUID,
        status: str,
        *,
        conn: AsyncConnection | None = None,
        at: datetime | None = None,
    ) -> None: ...


class StockDesk(Protocol):
    """The inventory context, as checkout uses it (implemented by InventoryService)."""

    async def reserve(
        self,
        reference: str,
        lines: Sequence[tuple[str, int]],
        *,
        ttl_s: int | None = None,
        conn: AsyncConnection | None = None,
    ) -> object: ...

    async def release_reference(self, reference: str, *, conn: AsyncConnection | None = None) -> bool: ...

    async def commit_reference(self, reference: str, *, conn: AsyncConnection | None = None) -> object: ...

    async def reserve_if_available(
        self, reference: str, lines: Sequence[tuple[str, int]], *, conn: AsyncConnection
    ) -> bool: ...


class PaymentGateway(Protocol):
    """A payment provider. Every call is idempotent on `idempotency_key`."""

    async def authorize(
        self,
        *,
        order_reference: str,
        amount_minor: int,
        currency: str,
        idempotency_key: str,
        card_token: str | None = None,
    ) -> Authorization: ...

    async def capture(self, *, authorization_id: str, amount_minor: int, idempotency_key: str) -> Capture: ...

    async def void(self, *, authorization_id: str, idempotency_key: str) -> None: ...

    async def refund(self, *, capture_id: str, amount_minor: int, idempotency_key: str) -> None: ...

    async def payments_for(self, order_reference: str) -> list[PaymentRecord]:
        """Every authorization the provider holds for the order (a compensation's "what did I do?")."""
        ...


class ShippingCarrier(Protocol):
    """A carrier. Every call is idempotent on `idempotency_key`."""

    async def create_shipment(
        self, *, order_reference: str, items: Sequence[tuple[str, int]], idempotency_key: str
    ) -> Shipment: ...

    async def cancel_shipment(self, *, shipment_id: str, idempotency_key: str) -> None: ...

    async def active_shipments_for(self, order_reference: str) -> list[Shipment]:
        """Shipments the carrier holds for the order that are not cancelled."""
        ...


def _key(ctx: StepContext, step: OrderStep, action: str = "do") -> str:
    """One idempotency key per (saga, step, action): retries and resumes replay, never repeat."""
    return f"{ctx.saga_id}:{step.value}:{action}"


def _items(ctx: StepContext) -> list[tuple[str, int]]:
    return [(str(sku), int(qty)) for sku, qty in ctx.data["items"]]


def _completed_items(ctx: StepContext) -> list[dict[str, Any]]:
    """`order_completed` v2's items: each with its price at purchase. A saga started before prices
    were kept in its data says null (unknown), as the v2 schema allows."""
    prices = ctx.data.get("unit_prices") or [None] * len(ctx.data["items"])
    return [
        {"sku": sku, "quantity": qty, "unit_price_minor": None if price is None else int(price)}
        for (sku, qty), price in zip(_items(ctx), prices, strict=True)
    ]


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def order_saga(
    *,
    orders: OrderDesk,
    stock: StockDesk,
    payments: PaymentGateway,
    carrier: ShippingCarrier,
    reservation_ttl_s: int,
    deadline_s: float = 120.0,
    remote_timeout_s: float = 5.0,
    remote_retry: RetrySchedule = RetrySchedule(max_attempts=4, base_s=0.1, cap_s=2.0),
    clock: Clock | None = None,
) -> SagaDefinition:
    clock = clock or SystemClock()

    async def cancel_order(ctx: StepContext) -> None:
        await orders.move_to(uuid.UUID(ctx.data["order_id"]), "cancelled", conn=ctx.conn)
        ctx.emit(
            "mercato.orders.order_cancelled",
            {
                "order_id": ctx.data["order_id"],
                "customer_id": ctx.data["customer_id"],
                "total_minor": int(ctx.data["amount_minor"]),
                "currency": ctx.data["currency"],
            },
        )

    async def create_order(ctx: StepContext) -> Mapping[str, Any] | None:
        # Done by the checkout request in the transaction that started this saga.
        return None

    async def reserve(ctx: StepContext) -> Mapping[str, Any] | None:
        try:
            await stock.reserve(ctx.data["order_id"], _items(ctx), ttl_s=reservation_ttl_s, conn=ctx.conn)
        except Conflict as exc:  # out of stock: a definite no, nothing was held
            raise StepRejected(str(exc)) from exc
        return None

    async def release(ctx: StepContext) -> None:
        await stock.release_reference(ctx.data["order_id"], conn=ctx.conn)

    async def authorize(ctx: StepContext) -> Mapping[str, Any]:
        auth = await _authorize(ctx)
        if not auth.approved:
            raise StepRejected(f"payment declined: {auth.decline_reason or 'no reason given'}")
        ctx.emit(
            "mercato.payments.payment_authorized",
            {
                "order_id": ctx.data["order_id"],
                "authorization_id": auth.authorization_id,
                "amount_minor": int(ctx.data["amount_minor"]),
                "currency": ctx.data["currency"],
            },
        )
        return {"authorization_id": auth.authorization_id}

    async def _authorize(ctx: StepContext) -> Authorization:
        try:
            return await payments.authorize(
                order_reference=ctx.data["order_id"],
                amount_minor=int(ctx.data["amount_minor"]),
                currency=str(ctx.data["currency"]),
                idempotency_key=_key(ctx, OrderStep.AUTHORIZE_PAYMENT),
                card_token=ctx.data.get("card_token"),
            )
        except PaymentDeclined as exc:
            raise StepRejected(str(exc)) from exc

    async def void(ctx: StepContext) -> None:
        # When the authorization's answer was lost the provider's own records say what exists:
        # asking it is safe even while its write endpoints are failing.
        known = ctx.data.get("authorization_id")
        if known is not None:
            to_void = [str(known)]
        else:
            records = await payments.payments_for(ctx.data["order_id"])
            to_void = [r.authorization_id for r in records if r.status == "authorized"]
        for authorization_id in to_void:
            try:
                await payments.void(
                    authorization_id=authorization_id,
                    idempotency_key=f"{_key(ctx, OrderStep.AUTHORIZE_PAYMENT, 'void')}:{authorization_id}",
                )
            except ProviderConflict:
                continue  # captured (the capture's compensation refunds it) or already voided
            ctx.emit(
                "mercato.payments.payment_voided",
                {"order_id": ctx.data["order_id"], "authorization_id": authorization_id},
            )

    async def ship(ctx: StepContext) -> Mapping[str, Any]:
        shipment = await carrier.create_shipment(
            order_reference=ctx.data["order_id"],
            items=_items(ctx),
            idempotency_key=_key(ctx, OrderStep.CREATE_SHIPMENT),
        )
        return {"shipment_id": shipment.shipment_id}

    async def cancel_shipment(ctx: StepContext) -> None:
        known = ctx.data.get("shipment_id")
        if known is not None:
            to_cancel = [str(known)]
        else:
            to_cancel = [x.shipment_id for x in await carrier.active_shipments_for(ctx.data["order_id"])]
        for shipment_id in to_cancel:
            try:
                await carrier.cancel_shipment(
                    shipment_id=shipment_id,
                    idempotency_key=f"{_key(ctx, OrderStep.CREATE_SHIPMENT, 'cancel')}:{shipment_id}",
                )
            except ProviderConflict:
                continue  # already cancelled

    async def capture(ctx: StepContext) -> Mapping[str, Any]:
        result = await payments.capture(
            authorization_id=str(ctx.data["authorization_id"]),
            amount_minor=int(ctx.data["amount_minor"]),
            idempotency_key=_key(ctx, OrderStep.CAPTURE_PAYMENT),
        )
        ctx.emit(
            "mercato.payments.payment_captured",
            {
                "order_id": ctx.data["order_id"],
                "authorization_id": str(ctx.data["authorization_id"]),
                "capture_id": result.capture_id,
                "amount_minor": int(ctx.data["amount_minor"]),
                "currency": ctx.data["currency"],
            },
        )
        return {"capture_id": result.capture_id}

    async def refund(ctx: StepContext) -> None:
        known = ctx.data.get("capture_id")
        if known is not None:
            to_refund = [str(known)]
        else:
            records = await payments.payments_for(ctx.data["order_id"])
            to_refund = [r.capture_id for r in records if r.capture_id is not None]
        for capture_id in to_refund:
            try:
                await payments.refund(
                    capture_id=capture_id,
                    amount_minor=int(ctx.data["amount_minor"]),
                    idempotency_key=f"{_key(ctx, OrderStep.CAPTURE_PAYMENT, 'refund')}:{capture_id}",
                )
            except ProviderConflict:
                continue  # already refunded
            ctx.emit(
                "mercato.payments.payment_refunded",
                {
                    "order_id": ctx.data["order_id"],
                    "capture_id": capture_id,
                    "amount_minor": int(ctx.data["amount_minor"]),
                    "currency": ctx.data["currency"],
                },
            )

    async def mark_complete(ctx: StepContext) -> Mapping[str, Any] | None:
        await stock.commit_reference(ctx.data["order_id"], conn=ctx.conn)
        # One moment for the order's row and its event (v2 `completed_at`), so the sales read
        # model files the order on the day the write model says it completed.
        completed_at = clock.now()
        await orders.move_to(uuid.UUID(ctx.data["order_id"]), "completed", conn=ctx.conn, at=completed_at)
        ctx.emit(
            "mercato.orders.order_completed",
            {
                "order_id": ctx.data["order_id"],
                "customer_id": ctx.data["customer_id"],
                "total_minor": int(ctx.data["amount_minor"]),
                "currency": ctx.data["currency"],
                "items": _completed_items(ctx),
                "completed_at": _rfc3339(completed_at),
            },
        )
        return None

    def remote(name: OrderStep, action: Any, compensation: Any) -> Step:
        async def definite(ctx: StepContext) -> Mapping[str, Any] | None:
            try:
                result: Mapping[str, Any] | None = await action(ctx)
            except ProviderRejected as exc:
                raise StepRejected(str(exc)) from exc
            return result

        return Step(name.value, definite, compensation, timeout_s=remote_timeout_s, retry=remote_retry)

    return SagaDefinition(
        ORDER_SAGA,
        (
            Step(OrderStep.CREATE_ORDER.value, create_order, cancel_order, local=True),
            Step(OrderStep.RESERVE_INVENTORY.value, reserve, release, local=True),
            remote(OrderStep.AUTHORIZE_PAYMENT, authorize, void),
            remote(OrderStep.CREATE_SHIPMENT, ship, cancel_shipment),
            remote(OrderStep.CAPTURE_PAYMENT, capture, refund),
            Step(OrderStep.MARK_COMPLETE.value, mark_complete, None, local=True),
        ),
        deadline_s=deadline_s,
    )


class CheckoutService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        orders: OrderDesk,
        sagas: SagaStore,
        saga: SagaDefinition,
        events: EventSink | None = None,
        wake_runner: Callable[[], None] | None = None,
        stock: StockDesk | None = None,
    ) -> None:
        self._events = events
        # With `stock`, the order's reservation is made in the transaction that places it when every
        # line is there (the saga starts past ReserveInventory, ADR 0087); else the saga's step does it.
        self._stock = stock
        self._db = db
        self._clock = clock
        self._orders = orders
        self._sagas = sagas
        self._saga = saga
        self._wake = wake_runner

    def on_saga_started(self, wake: Callable[[], None]) -> None:
        """Called after each commit, so an in-process runner starts the saga at once."""
        self._wake = wake

    async def start(
        self, customer_id: uuid.UUID, *, correlation_id: str, card_token: str | None = None
    ) -> OrderSnapshot:
        """CreateOrder(pending) and the saga that drives it, in one transaction: an order never
        exists without the saga that will finish it, nor a saga without its order.

        ReserveInventory too, when every line is in stock: one statement in this transaction, with
        its record in the saga's history, instead of a move of the saga's own (its BEGIN, the
        reservation, the move, COMMIT) once a runner picks it up. A short line leaves nothing
        behind here, and the saga's step then refuses the order as it always did."""
        async with self._db.write() as conn:
            order = await self._orders.open_from_cart(conn, customer_id)
            reserved = await self._reserve(conn, order)
            placed = {
                "type": "mercato.orders.order_placed",
                "saga_id": str(order.id),
                "correlation_id": correlation_id,
                "step": "create_order",
                "data": {
                    "order_id": str(order.id),
                    "customer_id": str(order.customer_id),
                    "total_minor": order.total_minor,
                    "currency": order.currency,
                    "items": [
                        {
                            "sku": item.sku,
                            "product_id": str(item.product_id),
                            "quantity": item.quantity,
                            "unit_price_minor": item.unit_price_minor,
                        }
                        for item in order.items
                    ],
                },
            }
            # The event rides in the saga's insert when the sink can stage it (one statement on
            # PostgreSQL, ADR 0075), as a step's events ride in its move (ADR 0072).
            staged = (
                self._events.stage(conn, [placed]) if isinstance(self._events, StagingEventSink) else None
            )
            await self._sagas.start(
                conn,
                saga_type=ORDER_SAGA,
                saga_id=order.id,
                correlation_id=correlation_id,
                deadline_s=self._saga.deadline_s,
                completed_steps=1 if reserved is None else 2,
                done=reserved,
                data={
                    "order_id": str(order.id),
                    "customer_id": str(order.customer_id),
                    "amount_minor": order.total_minor,
                    "currency": order.currency,
                    "items": [[item.sku, item.quantity] for item in order.items],
                    "unit_prices": [item.unit_price_minor for item in order.items],
                    **({"card_token": card_token} if card_token else {}),
                },
                messages=staged,
            )
            if self._events is not None and staged is None:
                await self._events.add(conn, [placed])
        if self._wake is not None:
            self._wake()
        return order

    async def _reserve(self, conn: AsyncConnection, order: OrderSnapshot) -> StepOutcome | None:
        """ReserveInventory's record when this transaction made the order's reservation, else None."""
        if self._stock is None or self._saga.steps[1].name != OrderStep.RESERVE_INVENTORY.value:
            return None
        started = time.perf_counter()
        lines = [(item.sku, item.quantity) for item in order.items]
        if not await self._stock.reserve_if_available(str(order.id), lines, conn=conn):
            return None
        elapsed_ms = round((time.perf_counter() - started) * 1000)
        return StepOutcome(OrderStep.RESERVE_INVENTORY.value, "forward", 1, "succeeded", elapsed_ms)

    async def progress(self, order_id: uuid.UUID, *, internal: bool = False) -> dict[str, Any] | None:
        """The saga's state and step history for an order (shown by GET /v1/orders/{id}).

        Customers see a public `reason` code when it failed; the internal failure text and each
        attempt's error (exception names, provider messages) only with `internal` (staff).
        """
        saga = await self._sagas.get(order_id)
        if saga is None:
            return None
        history = await self._sagas.history(order_id)
        reason = failure_reason(
            saga.failure, ((h.step, h.outcome) for h in history if h.direction == "forward")
        )
        return {
            "saga_status": saga.status.value,
            "reason": None if reason is None else reason.value,
            "failure": saga.failure if internal else None,
            "steps": [
                {
                    "step": h.step,
                    "direction": h.direction,
                    "attempt": h.attempt,
                    "outcome": h.outcome,
                    "error": h.error if internal else None,
                    "duration_ms": h.duration_ms,
                    "recorded_at": h.recorded_at.isoformat().replace("+00:00", "Z"),
                }
                for h in history
            ],
        }
