"""Live order status: the order and payment events of the outbox stream, as a sequenced channel.

`OrderFeed` consumes `mercato.orders` and `mercato.payments` (a consumer group of its own, so it
sees every event whichever process ran the saga), appends each one to the `order:<id>` channel's
history (a per-order seq, dedup by message id: a redelivery gets its first seq again), and
publishes it for live fan-out. `GET /v1/orders/{id}/events` streams that channel over SSE.

A pass appends all of its events at once (one statement on PostgreSQL) and publishes them in one
broker call (a checkout makes four or five of these events, and a transaction plus a broker round
trip per event was most of the feed's cost in the API process: ADR 0071). If that fails, the pass
falls back to one event at a time, where a failing order's events are nacked and redelivered in
order, as before.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from mercato.kit.messaging import Delivery, LagReporter, Message, MessagingHook, Stream
from mercato.kit.observability import get_logger
from mercato.kit.realtime import ChannelEvent, SqlChannelHistory
from mercato.kit.realtime.history import HistoryItem

__all__ = ["ORDER_FEED_GROUP", "ORDER_FEED_TOPICS", "OrderFeed", "order_channel"]

_log = get_logger("mercato.orders.live")

ORDER_FEED_GROUP = "mercato.realtime.order-feed"
ORDER_FEED_TOPICS = ("mercato.orders", "mercato.payments")
# The order's status after each order event; the last two end the stream.
_STATUS = {
    "mercato.orders.order_placed": "pending",
    "mercato.orders.order_completed": "completed",
    "mercato.orders.order_cancelled": "cancelled",
}
_TERMINAL = frozenset({"completed", "cancelled", "failed"})


def order_channel(order_id: str | uuid.UUID) -> str:
    return f"order:{order_id}"


def live_event(message: Message) -> tuple[str, str, dict[str, Any]] | None:
    """(channel, SSE event name, data) for an order or payment event; None for anything else."""
    order_id = message.data.get("order_id") or message.subject
    try:
        uuid.UUID(str(order_id))
    except ValueError:
        return None
    short = message.type.rsplit(".", 1)[-1]
    data: dict[str, Any] = {"order_id": str(order_id), "step": short, "at": message.time.isoformat()}
    status = _STATUS.get(message.type)
    if status is not None:
        data["status"] = status
        data["terminal"] = status in _TERMINAL
        return order_channel(order_id), "status", data
    for key in ("amount_minor", "currency", "authorization_id", "capture_id"):
        if key in message.data:
            data[key] = message.data[key]
    return order_channel(order_id), "step", data


class OrderFeed:
    def __init__(
        self,
        stream: Stream,
        history: SqlChannelHistory,
        publish_many: Callable[[list[ChannelEvent]], Awaitable[None]],
        *,
        consumer: str,
        batch: int = 100,
        hook: MessagingHook | None = None,
    ) -> None:
        self._lag = LagReporter(stream, hook)
        self._stream = stream
        self._history = history
        self._publish_many = publish_many
        self._consumer = consumer
        self._batch = batch

    async def run_once(self) -> int:
        """One pass over both topics, handled in creation order (time, then UUIDv7 id) so a
        payment step is not sequenced after the order's terminal status read in the same pass."""
        deliveries: list[Delivery] = []
        for topic in ORDER_FEED_TOPICS:
            read = await self._stream.read(
                topic, ORDER_FEED_GROUP, self._consumer, max_messages=self._batch, block_s=0
            )
            deliveries += read
            await self._lag.report(topic, ORDER_FEED_GROUP, busy=bool(read))
        deliveries.sort(key=lambda d: (d.message.time, d.message.id))
        if not deliveries:
            return 0
        try:
            await self._handle_all(deliveries)
        except Exception as exc:  # noqa: BLE001 - one at a time: only the failing order's events wait
            _log.warning("order_feed_batch_failed", error=str(exc), deliveries=len(deliveries))
            return await self._one_by_one(deliveries)
        await self._stream.ack_many(deliveries)
        return len(deliveries)

    async def _handle_all(self, deliveries: list[Delivery]) -> None:
        """Every delivery's event appended at once (in the pass's order, so the seqs are those
        one-by-one handling gives; one statement on PostgreSQL), then published in one call."""
        items: list[HistoryItem] = []
        for delivery in deliveries:
            found = live_event(delivery.message)
            if found is not None:
                channel, name, data = found
                items.append((channel, name, data, str(delivery.message.id)))
        events = await self._history.append_many(items)
        # Published even when not new: a lost publish after a crash is repeated; connections dedup by seq.
        if events:
            await self._publish_many(events)

    async def _one_by_one(self, deliveries: list[Delivery]) -> int:
        handled = 0
        failed: set[str] = set()
        for delivery in deliveries:
            if delivery.message.key in failed:
                # A later event of an order whose earlier one failed waits for it (per-order order).
                await self._stream.nack(delivery, error="an earlier event of this order failed")
                continue
            try:
                await self._handle_all([delivery])
            except Exception as exc:  # noqa: BLE001 - nack: redelivered, in order, later
                _log.warning("order_feed_failed", error=str(exc))
                failed.add(delivery.message.key)
                await self._stream.nack(delivery, error=str(exc)[:500])
                continue
            await self._stream.ack(delivery)
            handled += 1
        return handled
