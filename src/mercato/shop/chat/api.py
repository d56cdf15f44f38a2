"""Chat HTTP routes: create rooms, manage members, read history. Live messages go over `GET /v1/ws`."""

from __future__ import annotations

import uuid
from typing import Annotated, cast

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, Field

from mercato.kit.auth import Principal
from mercato.kit.web import authenticated, problem_responses
from mercato.kit.web.private import PrivateRoute
from mercato.kit.web.security import InsufficientScope
from mercato.shop.chat.model import InvalidRoom, NotAMember, Room
from mercato.shop.chat.service import ChatService

router = APIRouter(prefix="/v1/chat", tags=["chat"], route_class=PrivateRoute)

Caller = Annotated[Principal, Depends(authenticated)]
RoomId = Annotated[uuid.UUID, Path()]


def chat_service(request: Request) -> ChatService:
    return cast(ChatService, request.app.state.chat)


Service = Annotated[ChatService, Depends(chat_service)]


def _staff(principal: Principal) -> bool:
    return principal.has_role("admin")


class RoomIn(BaseModel):
    name: str | None = Field(default=None, min_length=1, max_length=200)
    members: list[Annotated[str, Field(min_length=1, max_length=64)]] = Field(
        default_factory=list, max_length=1000
    )
    order_id: uuid.UUID | None = Field(
        default=None, description="Open this order's support room instead (give `name` or this, not both)"
    )


class RoomOut(BaseModel):
    id: str
    name: str
    kind: str
    order_id: str | None
    members: list[str]


class MessageOut(BaseModel):
    room: str
    seq: int
    sender: str
    text: str
    client_msg_id: str
    sent_at: str


async def _room_out(service: ChatService, room: Room) -> RoomOut:
    return RoomOut(
        id=str(room.id),
        name=room.name,
        kind=room.kind,
        order_id=str(room.order_id) if room.order_id else None,
        members=await service.members(room.id),
    )


@router.post(
    "/rooms",
    status_code=201,
    response_model=RoomOut,
    summary="Create a room",
    description="Staff create rooms with `name` and `members`; a customer opens its own order's support "
    "room with `order_id` (the order's customer + staff). Opening a support room again returns it.",
    responses=problem_responses(401, 403, 404, 422),
)
async def create_room(body: RoomIn, service: Service, principal: Caller) -> RoomOut:
    # Schema-valid either way, so a rule: 422, not 400 (ADR 0028).
    if (body.order_id is None) == (body.name is None):
        raise InvalidRoom("give either `name` (a staff room) or `order_id` (an order's support room)")
    if body.order_id is not None:
        room = await service.support_room(body.order_id, caller=principal.subject, staff=_staff(principal))
    else:
        if not _staff(principal):
            raise InsufficientScope("only staff create rooms; customers open their order's support room")
        room = await service.create_room(body.name or "", body.members, created_by=principal.subject)
    return await _room_out(service, room)


async def _readable(service: ChatService, room_id: uuid.UUID, principal: Principal) -> None:
    if not await service.may_read(room_id, principal.subject, staff=_staff(principal)):
        raise NotAMember(f"not a member of room {room_id}")


@router.get(
    "/rooms/{room_id}/messages",
    response_model=list[MessageOut],
    summary="Room history",
    description="Messages with seq > `after`, oldest first (the offline queue: a reconnecting member "
    "reads what it missed, back to the configured TTL). Members and staff only.",
    responses=problem_responses(401, 403),
)
async def room_messages(
    room_id: RoomId,
    service: Service,
    principal: Caller,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> list[MessageOut]:
    await _readable(service, room_id, principal)
    found = await service.history(room_id, after=after, limit=limit)
    return [
        MessageOut(
            room=str(m.room_id),
            seq=m.seq,
            sender=m.sender,
            text=m.text,
            client_msg_id=m.client_msg_id,
            sent_at=m.sent_at.isoformat(),
        )
        for m in found
    ]


@router.get(
    "/rooms/{room_id}/members",
    response_model=list[str],
    summary="Room members",
    responses=problem_responses(401, 403),
)
async def room_members(room_id: RoomId, service: Service, principal: Caller) -> list[str]:
    await _readable(service, room_id, principal)
    return await service.members(room_id)


@router.put(
    "/rooms/{room_id}/members/{user_id}",
    status_code=204,
    summary="Add a member (staff)",
    responses=problem_responses(401, 403, 404),
)
async def add_member(
    room_id: RoomId,
    user_id: Annotated[str, Path(min_length=1, max_length=64)],
    service: Service,
    principal: Caller,
) -> Response:
    if not _staff(principal):
        raise InsufficientScope("only staff manage members")
    await service.add_member(room_id, user_id)
    return Response(status_code=204)


@router.delete(
    "/rooms/{room_id}/members/{user_id}",
    status_code=204,
    summary="Remove a member (staff, or a member leaving)",
    responses=problem_responses(401, 403),
)
async def remove_member(
    room_id: RoomId,
    user_id: Annotated[str, Path(min_length=1, max_length=64)],
    service: Service,
    principal: Caller,
) -> Response:
    if not _staff(principal) and user_id != principal.subject:
        raise InsufficientScope("only staff remove other members")
    await service.remove_member(room_id, user_id)
    return Response(status_code=204)
