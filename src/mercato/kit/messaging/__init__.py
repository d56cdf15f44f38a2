"""Reliable messaging: transactional outbox, relay, streams, inbox dedup and dead letters.

Producer: `Outbox.add(conn, message)` in the transaction that changes state; `OutboxRelay` moves
committed messages to a `Stream`. Consumer: `Consumer` reads the stream and applies each message
once in effect, recording it in the `Inbox` in the same transaction. `SqlLogStream` is the
embedded stream backend; broker backends implement the same `Stream` protocol.
"""

from mercato.kit.messaging.hooks import LagReporter, MessagingHook, NullMessagingHook, PrometheusMessagingHook
from mercato.kit.messaging.inbox import Consumer, Handler, Inbox
from mercato.kit.messaging.message import InvalidMessage, Message, MessageReader, partition_for
from mercato.kit.messaging.nats_jetstream import JetStreamStream
from mercato.kit.messaging.outbox import (
    MAX_STAGED_ROWS,
    OUTBOX_CHANNEL,
    Outbox,
    OutboxBacklog,
    OutboxRelay,
    StagedRows,
)
from mercato.kit.messaging.redis_streams import RedisStream
from mercato.kit.messaging.sql_log import SqlLogStream
from mercato.kit.messaging.stream import (
    STREAM_CHANNEL,
    DeadLetter,
    DeadLetterStatus,
    Delivery,
    Publisher,
    Stream,
)

__all__ = [
    "MAX_STAGED_ROWS",
    "OUTBOX_CHANNEL",
    "STREAM_CHANNEL",
    "Consumer",
    "DeadLetter",
    "DeadLetterStatus",
    "Delivery",
    "Handler",
    "Inbox",
    "InvalidMessage",
    "JetStreamStream",
    "LagReporter",
    "Message",
    "MessageReader",
    "MessagingHook",
    "NullMessagingHook",
    "Outbox",
    "OutboxBacklog",
    "OutboxRelay",
    "PrometheusMessagingHook",
    "Publisher",
    "RedisStream",
    "SqlLogStream",
    "StagedRows",
    "Stream",
    "partition_for",
]
