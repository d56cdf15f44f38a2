"""Operator routes over the chat shards: messages across every shard (scatter-gather) and the
shard map's status (ADR 0043)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel

from mercato.kit.auth import Principal
from mercato.kit.web import Cursor, CursorError, InvalidCursor, Page, problem_responses, require_scopes
from mercato.kit.web.private import PrivateRoute
from mercato.shop.chat.api import MessageOut
from mercato.shop.chat.rebalance import shard_status
from mercato.shop.chat.service import ChatService
from mercato.shop.chat.shards import Position

__all__ = ["admin_router"]

CURSOR_SORT = "-sent_at"

admin_router = APIRouter(prefix="/admin/chat", tags=["chat", "admin"], route_class=PrivateRoute)
Operator = Annotated[Principal, Depends(require_scopes("orders:read_all"))]


def _service(request: Request) -> ChatService:
    return cast(ChatService, request.app.state.chat)


Service = Annotated[ChatService, Depends(_service)]


class ShardOut(BaseModel):
    shard: str
    url: str
    role: str
    messages: int
    rooms: int
    fences: int


class ShardStatusOut(BaseModel):
    epoch: int
    algorithm: str
    vnodes: int
    members: list[str]
    overrides: dict[str, str]
    rebalancing_to: list[str] | None
    switched_rooms: int
    skew: float
    shards: list[ShardOut]


def _position(cursor: str) -> Position:
    try:
        found = Cursor.decode(cursor, expected_sort=CURSOR_SORT)
        room, seq = found.id.split(":", 1)
        return datetime.fromisoformat(str(found.value)), uuid.UUID(room), int(seq)
    except (CursorError, ValueError) as exc:
        raise InvalidCursor(str(exc)) from exc


@admin_router.get(
    "/messages",
    response_model=Page[MessageOut],
    summary="Messages across all shards",
    description="The newest chat messages of every room (one sender's, if given), gathered from every "
    "shard in parallel and merged, newest first; keyset-paginated.",
    responses=problem_responses(400, 401, 403, 422),
)
async def list_messages(
    service: Service,
    _operator: Operator,
    sender: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=512, pattern=r"^[A-Za-z0-9_-]+$")] = None,
) -> Page[MessageOut]:
    before = _position(cursor) if cursor is not None else None
    found = await service.recent_messages(sender=sender, limit=limit + 1, before=before)
    items = [
        MessageOut(
            room=str(m.room_id),
            seq=m.seq,
            sender=m.sender,
            text=m.text,
            client_msg_id=m.client_msg_id,
            sent_at=m.sent_at.isoformat(),
        )
        for m in found[:limit]
    ]
    next_cursor = None
    if len(found) > limit:
        last = found[limit - 1]
        next_cursor = Cursor(CURSOR_SORT, last.sent_at.isoformat(), f"{last.room_id}:{last.seq}").encode()
    return Page[MessageOut](items=items, next_cursor=next_cursor)


@admin_router.get(
    "/shards",
    response_model=ShardStatusOut,
    summary="Chat shard map and per-shard load",
    responses=problem_responses(401, 403),
)
async def shards(service: Service, _operator: Operator) -> dict[str, Any]:
    return await shard_status(service.shards)
