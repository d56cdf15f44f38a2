"""The message envelope: a CloudEvents 1.0 event plus the routing facts a stream needs.

`to_cloudevent()` / `from_cloudevent()` use the JSON structured mode (one JSON object carries the
attributes and the data), so a message stored in the outbox, the SQL log, Redis or NATS is the same
bytes, and any CloudEvents SDK can read it.
"""

from __future__ import annotations

import re
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

__all__ = ["InvalidMessage", "Message", "MessageReader", "partition_for"]

SPEC_VERSION = "1.0"
CONTENT_TYPE = "application/json"

# CloudEvents extension attribute names: lower-case ASCII letters and digits, at most 20 characters.
_EXTENSION_NAME = re.compile(r"^[a-z0-9]{1,20}$")
# `partitionkey` is the CloudEvents partitioning extension; the rest are ours.
_EXT_KEY = "partitionkey"
_EXT_TOPIC = "topic"
_EXT_CORRELATION = "correlationid"
_EXT_CAUSATION = "causationid"
_CONTEXT_ATTRIBUTES = frozenset(
    {"specversion", "id", "source", "type", "subject", "time", "datacontenttype", "dataschema", "data"}
)
_RESERVED = _CONTEXT_ATTRIBUTES | {_EXT_KEY, _EXT_TOPIC, _EXT_CORRELATION, _EXT_CAUSATION, "data_base64"}


class InvalidMessage(ValueError):
    """A message or CloudEvent that breaks the envelope's rules."""


def partition_for(key: str, *, partitions: int) -> int:
    """The partition of `key`: `crc32(utf-8 key) mod partitions`.

    CRC-32 rather than `hash()`: it is the same in every process and every language, so a Go or
    Java consumer (or another broker adapter) computes the same partition for the same key.
    """
    if partitions < 1:
        raise ValueError("partitions must be at least 1")
    return zlib.crc32(key.encode()) % partitions


@dataclass(frozen=True, slots=True)
class Message:
    """One integration event. `id` is the dedup key end to end: outbox row, broker message, inbox.

    `subject` is the aggregate id; `key` (the partition key) defaults to it, so every event of one
    aggregate lands in one partition and keeps its order.
    """

    id: uuid.UUID
    source: str
    type: str
    subject: str
    time: datetime
    data: dict[str, Any]
    topic: str
    key: str = ""
    dataschema: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.subject)
        for name in ("source", "type", "subject", "topic"):
            if not getattr(self, name):
                raise InvalidMessage(f"message {name} must not be empty")
        if self.time.tzinfo is None:
            raise InvalidMessage("message time must be timezone-aware")
        for name in self.headers:
            if not _EXTENSION_NAME.match(name) or name in _RESERVED:
                raise InvalidMessage(
                    f"header {name!r} is not a usable CloudEvents extension name "
                    "(lower-case letters and digits, at most 20, not a reserved attribute)"
                )

    def to_cloudevent(self) -> dict[str, Any]:
        """The CloudEvents 1.0 JSON structured-mode object for this message."""
        event: dict[str, Any] = {
            "specversion": SPEC_VERSION,
            "id": str(self.id),
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": _rfc3339(self.time),
            "datacontenttype": CONTENT_TYPE,
            _EXT_TOPIC: self.topic,
            _EXT_KEY: self.key,
        }
        if self.dataschema is not None:
            event["dataschema"] = self.dataschema
        if self.correlation_id is not None:
            event[_EXT_CORRELATION] = self.correlation_id
        if self.causation_id is not None:
            event[_EXT_CAUSATION] = self.causation_id
        event.update(self.headers)
        event["data"] = self.data
        return event

    @classmethod
    def from_cloudevent(cls, event: dict[str, Any]) -> Message:
        """Parse a JSON structured-mode CloudEvent; unknown extensions become `headers`."""
        if event.get("specversion") != SPEC_VERSION:
            raise InvalidMessage(f"unsupported specversion {event.get('specversion')!r}")
        content_type = event.get("datacontenttype", CONTENT_TYPE)
        data = event.get("data", {})
        if content_type != CONTENT_TYPE or not isinstance(data, dict):
            raise InvalidMessage("only application/json object data is supported")
        try:
            message_id = uuid.UUID(str(event["id"]))
            moment = datetime.fromisoformat(str(event["time"]).replace("Z", "+00:00"))
            subject = str(event["subject"])
            return cls(
                id=message_id,
                source=str(event["source"]),
                type=str(event["type"]),
                subject=subject,
                time=moment,
                data=data,
                topic=str(event[_EXT_TOPIC]),
                key=str(event.get(_EXT_KEY) or subject),
                dataschema=event.get("dataschema"),
                correlation_id=event.get(_EXT_CORRELATION),
                causation_id=event.get(_EXT_CAUSATION),
                headers={k: str(v) for k, v in event.items() if k not in _RESERVED},
            )
        except (KeyError, ValueError) as exc:
            raise InvalidMessage(f"not a valid Mercato CloudEvent: {exc}") from exc

    def to_json(self) -> str:
        return orjson.dumps(self.to_cloudevent()).decode()

    @classmethod
    def from_json(cls, payload: str | bytes) -> Message:
        return cls.from_cloudevent(orjson.loads(payload))


MessageReader = Callable[[Message], Message]
"""A consumer's view of a stored message: the same envelope with `data` upcast to the current
schema version (see `mercato.schemas.read_message`). Injected, so the kit knows no schema files."""


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")
