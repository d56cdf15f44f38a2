"""The `Stream` port: a partitioned, replayable log with consumer groups (Kafka's shape).

Every backend (the embedded SQL log today; Redis Streams and NATS JetStream next) gives the same
guarantees, checked by one contract test suite:

- `publish` is idempotent on `Message.id`: publishing a message twice stores it once.
- A topic has N partitions; a message goes to `partition_for(message.key)`. Within a partition a
  group sees messages in publish order, one outstanding batch at a time, so per-key order holds
  even across redeliveries.
- Delivery is at-least-once: a delivery not acknowledged within the visibility timeout (consumer
  crashed) is delivered again, to any consumer of the group. Handlers dedup with the inbox.
- A message that fails `max_attempts` times (nacks, or visibility timeouts while it was the first
  unacknowledged message of its partition) moves to the group's dead-letter queue with its last
  error, and the partition moves on.
- `replay` rewinds a group to an offset or a time; `replay_dead_letters` hands dead letters back
  to their group; `lag` counts what the group has not yet acknowledged.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Protocol, runtime_checkable

from mercato.kit.messaging.message import Message

__all__ = ["STREAM_CHANNEL", "DeadLetter", "DeadLetterStatus", "Delivery", "Publisher", "Stream"]

# The work signal (kit/storage/signals.py) fired when messages reach the stream: consumers wait on it.
STREAM_CHANNEL = "stream"


@dataclass(frozen=True, slots=True)
class Delivery:
    """One message handed to one consumer of a group.

    `attempt` is 1 on first delivery and grows with each failure. `receipt` is the backend's
    opaque acknowledgement handle (a NATS reply subject, a Redis entry id, a dead-letter id, the
    SQL log's batch lease); only the backend that made the delivery reads it.
    """

    message: Message
    topic: str
    group: str
    consumer: str
    partition: int
    offset: int
    attempt: int
    receipt: str = ""

    @property
    def from_dead_letters(self) -> bool:
        """A replayed dead letter: outside its partition's order, so one failing does not block it."""
        return self.receipt.startswith(DEAD_LETTER_RECEIPT_PREFIX)


# Every backend marks deliveries of replayed dead letters with receipts starting with this.
DEAD_LETTER_RECEIPT_PREFIX = "dlq:"


class DeadLetterStatus(StrEnum):
    DEAD = "dead"
    REPLAYING = "replaying"
    REPLAYED = "replayed"


@dataclass(frozen=True, slots=True)
class DeadLetter:
    id: uuid.UUID
    group: str
    topic: str
    partition: int
    offset: int
    message: Message
    attempts: int
    last_error: str | None
    dead_at: datetime
    status: DeadLetterStatus
    replayed_at: datetime | None


class Publisher(Protocol):
    """The producing half of a `Stream`: all the outbox relay needs."""

    async def publish(self, messages: Sequence[Message]) -> None: ...


@runtime_checkable
class Stream(Protocol):
    async def publish(self, messages: Sequence[Message]) -> None:
        """Append `messages` durably; a message id already in the stream is skipped."""
        ...

    async def read(
        self, topic: str, group: str, consumer: str, *, max_messages: int, block_s: float
    ) -> list[Delivery]:
        """Up to `max_messages` deliveries for `consumer` of `group`, waiting up to `block_s`
        seconds when none is ready. A group that never read a topic starts at its beginning."""
        ...

    async def ack(self, delivery: Delivery) -> None:
        """The message was handled; it is not delivered to this group again."""
        ...

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """`ack` each of `deliveries` (one read's, in the order read), in as few round trips as the
        backend allows: the SQL log moves a partition's watermark over a run in one statement."""
        ...

    async def nack(self, delivery: Delivery, *, error: str) -> None:
        """Handling failed: count an attempt, dead-letter at the limit, else redeliver later.

        Later deliveries of the same partition from the same read are revoked (delivered again
        after this one) so the partition's order holds."""
        ...

    async def dead_letters(
        self, *, topic: str | None = None, group: str | None = None, limit: int = 100
    ) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally for one topic and/or group."""
        ...

    async def dead_letter(self, dead_letter_id: uuid.UUID) -> DeadLetter | None: ...

    async def replay_dead_letters(
        self, *, ids: Sequence[uuid.UUID] | None = None, topic: str | None = None
    ) -> int:
        """Queue dead letters (these `ids`, or every dead one, optionally of one topic) for
        delivery to their group again; returns how many were queued."""
        ...

    async def replay(
        self,
        topic: str,
        group: str,
        *,
        from_offset: int | None = None,
        from_time: datetime | None = None,
        partition: int | None = None,
    ) -> None:
        """Rewind `group` on `topic` (every partition, or one) to `from_offset`, or to the first
        message appended at or after `from_time`; the group receives those messages again."""
        ...

    async def lag(self, topic: str, group: str) -> int:
        """Messages on `topic` that `group` has not acknowledged yet, over all partitions."""
        ...


async def ack_each(stream: Stream, deliveries: Sequence[Delivery]) -> None:
    """`Stream.ack_many` for a backend with no cheaper way than one `ack` per delivery."""
    for delivery in deliveries:
        await stream.ack(delivery)


async def poll_read(
    read_once: Callable[[], Awaitable[list[Delivery]]],
    *,
    max_messages: int,
    block_s: float,
    poll_interval_s: float,
) -> list[Delivery]:
    """`Stream.read` semantics over a non-blocking `read_once`: poll until something arrives or
    `block_s` has passed. Shared by the backends whose read must stay one atomic step (a SQL
    transaction, a Lua script, a per-partition pull) and so cannot block inside the server."""
    if max_messages < 1:
        raise ValueError("max_messages must be at least 1")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + block_s
    while True:
        deliveries = await read_once()
        remaining = deadline - loop.time()
        if deliveries or remaining <= 0:
            return deliveries
        await asyncio.sleep(min(poll_interval_s, remaining))


def check_replay_start(from_offset: int | None, from_time: datetime | None) -> None:
    """`Stream.replay` takes exactly one start: an offset (not negative) or a time."""
    if (from_offset is None) == (from_time is None):
        raise ValueError("give exactly one of from_offset and from_time")
    if from_offset is not None and from_offset < 0:
        raise ValueError("from_offset must not be negative")
