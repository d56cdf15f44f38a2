"""Payments use cases: keep each order's ledger from the payment events, and read it back.

The ledger consumer is a kit `Consumer` on `mercato.payments`: each delivery runs in one write
transaction with its inbox record, so a redelivered message finds the record and changes nothing.
Inside that transaction a concurrent writer of the same ledger (another consumer instance during a
rebalance) loses the append with a `ConcurrencyConflict`; the handler reloads and decides again
rather than failing the whole delivery (the failed append left the transaction intact).

A pass's whole batch goes through `handle_batch` first (ADR 0073): every ledger of the batch loaded
in one statement that also takes the event store's append lock, the commands applied in delivery
order in memory, every new event appended in one statement. A ledger whose stream moved on since
the load is reloaded (under the lock, so current) and decided again; the others are written. A
batch with an event that breaks a ledger rule rolls back and the consumer redoes it one event at a
time through `handle`, which dead-letters the culprit alone.

An event that breaks a ledger rule (a refund of a capture the ledger never saw) fails the delivery:
after the stream's attempts it is dead-lettered for a person to look at, never silently applied.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.eventstore import AggregateRepository, ConcurrencyConflict, EventStore, RecordedEvent
from mercato.kit.messaging import Consumer, Message, MessagingHook, Stream
from mercato.kit.observability import get_logger
from mercato.kit.storage import Database
from mercato.schemas import read_message
from mercato.shop.payments.contracts import (
    PAYMENT_AUTHORIZED,
    PAYMENT_CAPTURED,
    PAYMENT_REFUNDED,
    PAYMENT_VOIDED,
    PAYMENTS_TOPIC,
)
from mercato.shop.payments.model import PaymentLedger, PaymentLedgerNotFound

__all__ = ["LEDGER_GROUP", "LedgerView", "PaymentsService"]

LEDGER_GROUP = "payments-ledger"
# The losers of a race wait a full-jitter `uniform(0, base * 2**attempt)` before deciding again.
CONFLICT_BASE_DELAY_S = 0.005

_log = get_logger("mercato.payments")


@dataclass(frozen=True, slots=True)
class LedgerView:
    ledger: PaymentLedger
    history: list[RecordedEvent]


class PaymentsService:
    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        store: EventStore | None = None,
        snapshot_every: int = 20,
        conflict_attempts: int = 5,
    ) -> None:
        self._db = db
        self._clock = clock
        self.ledgers = AggregateRepository(
            store or EventStore(clock=clock), PaymentLedger, snapshot_every=snapshot_every
        )
        self._conflict_attempts = max(1, conflict_attempts)
        self._rng = random.Random()

    async def handle(self, conn: AsyncConnection, message: Message) -> None:
        """The `mercato.payments` handler: one ledger command per payment event (a kit `Handler`)."""
        data = message.data
        order_id = _order_id(message)

        # Not `retry_on_conflict(conn=...)`: its savepoint per attempt (SAVEPOINT + RELEASE, two
        # of the ~10 statements of an event) guards writes made before the conflict, and here the
        # only write is the append, which raises `ConcurrencyConflict` before writing or inside
        # its own savepoint: after a conflict the consumer's transaction is intact (ADR 0055).
        for attempt in range(self._conflict_attempts):
            ledger = await self.ledgers.load(conn, order_id)
            if not _apply_command(ledger, message.type, data):
                return
            try:
                await self.ledgers.save(conn, ledger, metadata=_metadata(message))
            except ConcurrencyConflict:
                if attempt == self._conflict_attempts - 1:
                    raise
                await asyncio.sleep(self._rng.uniform(0, CONFLICT_BASE_DELAY_S * 2**attempt))
                continue
            return

    async def handle_batch(self, conn: AsyncConnection, messages: Sequence[Message]) -> None:
        """`handle` of each message in turn, with the same effect, in two statements for the batch
        on PostgreSQL (a kit `BatchHandler`): load every ledger, append every new event. Whatever
        raises (a broken rule) is left to the consumer, which then runs `handle` one at a time."""
        remaining = list(messages)
        for _attempt in range(self._conflict_attempts):
            order_ids = [_order_id(m) for m in remaining]
            ledgers = await self.ledgers.load_many(conn, order_ids, lock_for_append=True)
            metadata: dict[str, list[dict[str, Any]]] = {order_id: [] for order_id in ledgers}
            for message, order_id in zip(remaining, order_ids, strict=True):
                ledger = ledgers[order_id]
                before = len(ledger.pending)
                if _apply_command(ledger, message.type, message.data):
                    recorded = len(ledger.pending) - before
                    metadata[order_id].extend(_metadata(message) for _ in range(recorded))
            conflicted = await self.ledgers.save_many(
                conn,
                [(ledger, metadata[order_id]) for order_id, ledger in ledgers.items()],
                now=self._clock.now(),
                locked=True,
            )
            if not conflicted:
                return
            # Reloaded under the append lock, taken by the first load: no lock-taking writer can
            # move these streams again before this transaction ends, so no jittered wait.
            remaining = [
                m for m, order_id in zip(remaining, order_ids, strict=True) if order_id in conflicted
            ]
        raise ConcurrencyConflict(
            f"{PaymentLedger.category}-{_order_id(remaining[0])}", expected_version=-1, actual_version=None
        )

    async def ledger(self, order_id: str) -> LedgerView:
        """The order's ledger and every event in it, oldest first."""
        async with self._db.read() as conn:
            ledger = await self.ledgers.load(conn, order_id)
            if ledger.version == 0:
                raise PaymentLedgerNotFound(f"no payment recorded for order {order_id}")
            history = await self.ledgers.history(conn, order_id)
        return LedgerView(ledger, history)

    def consumer(
        self,
        stream: Stream,
        *,
        name: str | None = None,
        max_messages: int = 100,
        hook: MessagingHook | None = None,
    ) -> Consumer:
        """The ledger's consumer on `mercato.payments`; run `run_once` as a periodic job.

        The member name defaults to host + pid: each worker process is its own group member, so the
        stream's ownership of a delivered batch never confuses two processes.
        """
        return Consumer(
            self._db,
            stream,
            topic=PAYMENTS_TOPIC,
            group=LEDGER_GROUP,
            name=name or f"payments-ledger-{socket.gethostname()}-{os.getpid()}",
            handler=self.handle,
            max_messages=max_messages,
            hook=hook,
            # Payment events are BACKWARD_TRANSITIVE: every version ever written, read as the current.
            reader=read_message,
            batch_handler=self.handle_batch,
        )


def _order_id(message: Message) -> str:
    return str(message.data.get("order_id") or message.subject)


def _apply_command(ledger: PaymentLedger, event_type: str, data: dict[str, Any]) -> bool:
    """Run the ledger command for one payment event; False for a type the ledger does not keep."""
    if event_type == PAYMENT_AUTHORIZED:
        ledger.authorize(
            authorization_id=str(data["authorization_id"]),
            amount_minor=int(data["amount_minor"]),
            currency=str(data["currency"]),
        )
    elif event_type == PAYMENT_CAPTURED:
        ledger.capture(
            authorization_id=str(data["authorization_id"]),
            capture_id=str(data["capture_id"]),
            amount_minor=int(data["amount_minor"]),
            currency=str(data["currency"]),
        )
    elif event_type == PAYMENT_VOIDED:
        ledger.void(authorization_id=str(data["authorization_id"]))
    elif event_type == PAYMENT_REFUNDED:
        ledger.refund(
            capture_id=str(data["capture_id"]),
            amount_minor=int(data["amount_minor"]),
            currency=str(data["currency"]),
        )
    else:
        # A newer event type on the topic: acknowledged (recorded in the inbox) and left alone.
        _log.info("payment_event_ignored", type=event_type)
        return False
    return True


def _metadata(message: Message) -> dict[str, Any]:
    """Where each ledger event came from: the integration event id is its causation."""
    return {
        "message_id": str(message.id),
        "message_type": message.type,
        "source": message.source,
        "correlation_id": message.correlation_id,
        "occurred_at": message.time.isoformat(),
    }
