"""Real clients against a real `mercato up`: SSE order status over a real checkout, and the chat
WebSocket protocol (auth, membership, send -> ack -> message, dedup, resume, bad frames)."""

from __future__ import annotations

import asyncio
import base64
import uuid
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.e2e.conftest import RunningShop, demo_token


def login(client: httpx.Client, role: str) -> tuple[str, str]:
    """(access token, user id) of the demo account with `role`."""
    token = demo_token(str(client.base_url).rstrip("/"), role)
    me = client.get("/v1/users/me", headers={"Authorization": f"Bearer {token}"})
    return token, str(me.json()["id"]) if me.status_code == 200 else ""


def checkout(client: httpx.Client, customer: dict[str, str], admin: dict[str, str]) -> str:
    products = client.get("/v1/products", params={"limit": 100, "category": "books"}).json()["items"]
    sku = next(
        p["sku"] for p in products if client.get(f"/v1/inventory/{p['sku']}/availability").json()["in_stock"]
    )
    assert client.put(f"/v1/carts/me/items/{sku}", json={"quantity": 1}, headers=customer).status_code == 200
    accepted = client.post("/v1/checkout", headers={**customer, "Idempotency-Key": f"rt-{uuid.uuid4()}"})
    assert accepted.status_code == 202, accepted.text
    return str(accepted.headers["location"]).rsplit("/", 1)[-1]


def read_sse(client: httpx.Client, url: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with client.stream(
        "GET", url, headers={**headers, "Accept": "text/event-stream"}, timeout=30
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        current: dict[str, Any] = {}
        for line in response.iter_lines():
            if not line:
                if current:
                    events.append(current)
                current = {}
            elif line.startswith(":"):
                continue
            else:
                field, _, value = line.partition(":")
                current[field] = value.strip()
    return events


def test_sse_follows_a_real_checkout_and_resumes_by_last_event_id(shop: RunningShop) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        customer = {"Authorization": f"Bearer {login(client, 'customer')[0]}"}
        admin = {"Authorization": f"Bearer {login(client, 'admin')[0]}"}
        order_id = checkout(client, customer, admin)
        url = f"/v1/orders/{order_id}/events"
        assert client.get(url).status_code == 401
        events = read_sse(client, url, customer)
        ids = [int(e["id"]) for e in events]
        assert ids == list(range(1, len(ids) + 1))
        body = [orjson.loads(e["data"]) for e in events]
        statuses = [b["status"] for b in body if b["type"] == "status"]
        assert statuses[0] == "pending"
        assert statuses[-1] == "completed"
        steps = [b["step"] for b in body if b["type"] == "step"]
        assert "payment_authorized" in steps
        assert "payment_captured" in steps
        # Resume after event 2: exactly the rest, no gap, no duplicate; staff may follow too.
        resumed = read_sse(client, url, {**admin, "Last-Event-ID": "2"})
        assert [int(e["id"]) for e in resumed] == ids[2:]
        # Already at the terminal event: 204, the client stops reconnecting.
        done = client.get(url, headers={**customer, "Last-Event-ID": str(ids[-1])})
        assert done.status_code == 204


def ws_url(shop: RunningShop) -> str:
    return shop.base_url.replace("http://", "ws://") + "/v1/ws"


async def frames_until(
    ws: ClientConnection, predicate: Any, *, timeout_s: float = 10
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def read() -> None:
        while True:
            frame = orjson.loads(await ws.recv())
            got.append(frame)
            if predicate(frame):
                return

    await asyncio.wait_for(read(), timeout_s)
    return got


async def open_ws(shop: RunningShop, token: str, *, header: bool = True) -> ClientConnection:
    if header:
        ws = await connect(ws_url(shop), additional_headers={"Authorization": f"Bearer {token}"})
    else:
        ws = await connect(ws_url(shop))
        await ws.send(orjson.dumps({"type": "auth", "token": token}).decode())
    await frames_until(ws, lambda f: f["type"] == "ready")
    return ws


async def test_websocket_refuses_unauthenticated_clients(shop: RunningShop) -> None:
    async with connect(ws_url(shop)) as ws:
        await ws.send(orjson.dumps({"type": "auth", "token": "nope"}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4401
    async with connect(ws_url(shop)) as ws:
        await ws.send(orjson.dumps({"type": "subscribe", "channel": "room:x"}).decode())
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1008


def make_rooms(shop: RunningShop) -> tuple[str, str, str, str]:
    """(admin token, customer token, the customer's order support room, a staff-only room)."""
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        admin_token, _ = login(client, "admin")
        customer_token, _ = login(client, "customer")
        admin = {"Authorization": f"Bearer {admin_token}"}
        customer = {"Authorization": f"Bearer {customer_token}"}
        order_id = checkout(client, customer, admin)
        # The customer opens its order's support room; staff may read and write every room.
        room = client.post("/v1/chat/rooms", json={"order_id": order_id}, headers=customer)
        assert room.status_code == 201, room.text
        private = client.post("/v1/chat/rooms", json={"name": "staff only", "members": []}, headers=admin)
        assert private.status_code == 201, private.text
        assert (
            client.post("/v1/chat/rooms", json={"name": "x", "members": []}, headers=customer).status_code
            == 403
        )
        return admin_token, customer_token, room.json()["id"], private.json()["id"]


def room_history(shop: RunningShop, token: str, room_id: str) -> list[int]:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        found = client.get(
            f"/v1/chat/rooms/{room_id}/messages",
            params={"after": 0},
            headers={"Authorization": f"Bearer {token}"},
        )
        return [m["seq"] for m in found.json()]


async def test_chat_send_ack_message_dedup_resume_and_bad_frames(shop: RunningShop) -> None:
    admin_token, customer_token, room_id, private_id = await asyncio.to_thread(make_rooms, shop)
    staff_ws = await open_ws(shop, admin_token)
    customer_ws = await open_ws(shop, customer_token, header=False)
    try:
        for ws in (staff_ws, customer_ws):
            await ws.send(orjson.dumps({"type": "subscribe", "channel": f"room:{room_id}"}).decode())
            await frames_until(ws, lambda f: f["type"] == "subscribed")
        # Non-member subscription refused with an error frame, the socket stays open.
        await customer_ws.send(orjson.dumps({"type": "subscribe", "channel": f"room:{private_id}"}).decode())
        [*_, refused] = await frames_until(customer_ws, lambda f: f["type"] == "error")
        assert refused["code"] == "forbidden"

        send = {"type": "send", "room": room_id, "text": "hello", "client_msg_id": "m-1"}
        await staff_ws.send(orjson.dumps(send).decode())
        staff_frames = await frames_until(staff_ws, lambda f: f["type"] == "ack")
        ack = staff_frames[-1]
        assert ack["client_msg_id"] == "m-1"
        seq = ack["seq"]
        [*_, message] = await frames_until(customer_ws, lambda f: f["type"] == "message")
        assert message["seq"] == seq
        assert message["text"] == "hello"
        # A re-send (lost ack) is acknowledged with the first seq and not delivered twice.
        await staff_ws.send(orjson.dumps(send).decode())
        [*_, again] = await frames_until(staff_ws, lambda f: f["type"] == "ack")
        assert again["seq"] == seq

        # Bad frames: an error frame each, never a crash or a close.
        await customer_ws.send("{not json")
        await customer_ws.send(orjson.dumps({"type": "teleport"}).decode())
        await customer_ws.send(orjson.dumps({"type": "send", "room": room_id, "text": "x" * 20_000}).decode())
        errors = await frames_until(customer_ws, lambda f: f.get("code") == "too_large")
        codes = [f["code"] for f in errors if f["type"] == "error"]
        assert codes == ["malformed", "unknown_type", "too_large"]
        assert not [f for f in errors if f["type"] == "message"]  # the re-send was not delivered again

        # Resume: the customer drops, three messages are sent, it comes back with `since`.
        await customer_ws.close()
        for n in range(3):
            body = {"type": "send", "room": room_id, "text": f"while away {n}", "client_msg_id": f"a-{n}"}
            await staff_ws.send(orjson.dumps(body).decode())
        acks = await frames_until(staff_ws, lambda f: f["type"] == "ack" and f["client_msg_id"] == "a-2")
        assert [f["seq"] for f in acks if f["type"] == "ack"] == [seq + 1, seq + 2, seq + 3]
        customer_ws = await open_ws(shop, customer_token)
        await customer_ws.send(
            orjson.dumps({"type": "subscribe", "channel": f"room:{room_id}", "since": seq}).decode()
        )
        got = await frames_until(customer_ws, lambda f: f.get("seq") == seq + 3 and f["type"] == "message")
        assert [f["seq"] for f in got if f["type"] == "message"] == [seq + 1, seq + 2, seq + 3]
    finally:
        await staff_ws.close()
        await customer_ws.close()

    history = await asyncio.to_thread(room_history, shop, customer_token, room_id)
    assert history == [seq, seq + 1, seq + 2, seq + 3]


def make_group_room(shop: RunningShop) -> tuple[str, str, str, str]:
    """(admin token, customer token, customer id, a group room with the customer as a member)."""
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        admin_token, _ = login(client, "admin")
        customer_token, _ = login(client, "customer")
        # The member id is the token's subject (what the WebSocket session checks membership by).
        claims = customer_token.split(".")[1]
        customer_id = str(orjson.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))["sub"])
        room = client.post(
            "/v1/chat/rooms",
            json={"name": "revocation", "members": [customer_id]},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        assert room.status_code == 201, room.text
        return admin_token, customer_token, customer_id, room.json()["id"]


def remove_member(shop: RunningShop, admin_token: str, room_id: str, user_id: str) -> None:
    with httpx.Client(base_url=shop.base_url, timeout=10) as client:
        removed = client.delete(
            f"/v1/chat/rooms/{room_id}/members/{user_id}", headers={"Authorization": f"Bearer {admin_token}"}
        )
        assert removed.status_code == 204, removed.text


async def test_a_removed_member_stops_receiving_and_sending_at_once(shop: RunningShop) -> None:
    """ADR 0056: `send` authorization is cached, so a removal must reach the cache and the member's
    open subscriptions: within 2 s here (the revocation goes through the broker, SQL on `mercato up`)."""
    admin_token, customer_token, customer_id, room_id = await asyncio.to_thread(make_group_room, shop)
    staff_ws = await open_ws(shop, admin_token)
    customer_ws = await open_ws(shop, customer_token)
    channel = f"room:{room_id}"
    try:
        for ws in (staff_ws, customer_ws):
            await ws.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
            await frames_until(ws, lambda f: f["type"] == "subscribed")
        # The member sends (its membership is now cached) and receives.
        body = {"type": "send", "room": room_id, "text": "member", "client_msg_id": "r-1"}
        await customer_ws.send(orjson.dumps(body).decode())
        await frames_until(customer_ws, lambda f: f["type"] == "ack")
        await frames_until(staff_ws, lambda f: f["type"] == "message" and f["text"] == "member")

        await asyncio.to_thread(remove_member, shop, admin_token, room_id, customer_id)
        [*_, revoked] = await frames_until(customer_ws, lambda f: f["type"] == "unsubscribed", timeout_s=2)
        assert revoked == {"type": "unsubscribed", "channel": channel, "reason": "revoked"}
        # Receiving: a message sent after the removal does not reach it.
        after = {"type": "send", "room": room_id, "text": "after removal", "client_msg_id": "r-2"}
        await staff_ws.send(orjson.dumps(after).decode())
        await frames_until(staff_ws, lambda f: f["type"] == "message" and f["text"] == "after removal")
        # Sending: refused (the cached "yes" is gone), the socket stays open.
        again = {"type": "send", "room": room_id, "text": "still here?", "client_msg_id": "r-3"}
        await customer_ws.send(orjson.dumps(again).decode())
        got = await frames_until(customer_ws, lambda f: f["type"] == "error")
        assert got[-1]["code"] == "forbidden"
        assert not [f for f in got if f["type"] == "message"]
        # Nor may it subscribe again.
        await customer_ws.send(orjson.dumps({"type": "subscribe", "channel": channel}).decode())
        [*_, refused] = await frames_until(customer_ws, lambda f: f["type"] == "error")
        assert refused["code"] == "forbidden"
    finally:
        await staff_ws.close()
        await customer_ws.close()
