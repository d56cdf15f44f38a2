"""Chat entities and rules: pure, no I/O."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from mercato.kit.errors import Forbidden, NotFound, RuleViolated

__all__ = ["ChatMessage", "NotAMember", "Room", "RoomNotFound", "room_channel", "room_from_channel"]

ROOM_PREFIX = "room:"


class RoomNotFound(NotFound):
    slug = "chat-room-not-found"
    title = "Chat room not found"


class NotAMember(Forbidden):
    slug = "chat-not-a-member"
    title = "Not a member of this room"


class InvalidRoom(RuleViolated):
    slug = "chat-invalid-room"
    title = "Invalid chat room"


@dataclass(frozen=True, slots=True)
class Room:
    id: uuid.UUID
    name: str
    kind: str
    order_id: uuid.UUID | None
    created_by: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ChatMessage:
    room_id: uuid.UUID
    seq: int
    sender: str
    text: str
    client_msg_id: str
    sent_at: datetime

    def as_data(self) -> dict[str, object]:
        return {
            "room": str(self.room_id),
            "seq": self.seq,
            "sender": self.sender,
            "text": self.text,
            "client_msg_id": self.client_msg_id,
            "sent_at": self.sent_at.isoformat(),
        }


def room_channel(room_id: uuid.UUID | str) -> str:
    return f"{ROOM_PREFIX}{room_id}"


def room_from_channel(channel: str) -> uuid.UUID | None:
    if not channel.startswith(ROOM_PREFIX):
        return None
    try:
        return uuid.UUID(channel[len(ROOM_PREFIX) :])
    except ValueError:
        return None
