"""ADR 0056: the hub's one slow-consumer sweep (instead of a watchdog task per connection) refuses a
connection that stays over its caps for its `slow_consumer_s`, and only that one; a revocation
(ACCESS_REVOKED) takes the user's connections out of the channel at once and tells the listeners."""

from __future__ import annotations

import asyncio
import time

import orjson

from mercato.kit.realtime import ChannelEvent, Hub
from mercato.kit.realtime.hub import ACCESS_REVOKED


class _History:
    async def head(self, channel: str) -> int:
        return 0

    async def after(self, channel: str, seq: int, *, limit: int) -> list[ChannelEvent]:
        return []


class _Broker:
    def __init__(self) -> None:
        self.published: list[ChannelEvent] = []

    async def publish(self, event: ChannelEvent) -> None:
        self.published.append(event)

    async def publish_many(self, events: list[ChannelEvent]) -> None:
        self.published += events

    async def subscribe(self) -> object:
        from mercato.kit.realtime.broker import Subscription

        return Subscription()

    async def unsubscribe(self, subscription: object) -> None:
        pass


async def test_the_sweep_refuses_only_a_connection_over_its_caps_for_its_deadline() -> None:
    hub = Hub(_Broker(), _History(), node_id="n1", max_messages=2)  # type: ignore[arg-type]
    await hub.start()
    try:
        refused: list[str] = []
        slow = hub.connect("u1", kind="ws", on_refused=lambda: refused.append("slow"), slow_consumer_s=0.3)
        fine = hub.connect("u2", kind="ws", on_refused=lambda: refused.append("fine"), slow_consumer_s=0.3)
        for conn in (slow, fine):
            await hub.subscribe(conn, "room:a", since=None)
        began = time.monotonic()
        for seq in range(1, 4):  # 3 essential frames over a cap of 2: overflow, not refusal
            hub.fan_out(ChannelEvent("room:a", "message", {}, seq=seq))
        await fine.queue.get()  # `fine` drains back under its caps; `slow` does not
        assert not fine.queue.over_cap
        assert slow.queue.over_cap
        await asyncio.sleep(0.15)
        assert refused == []  # not before its deadline
        while not refused and time.monotonic() - began < 3:  # noqa: ASYNC110 - polling a list
            await asyncio.sleep(0.02)
        assert refused == ["slow"]
        assert 0.3 <= time.monotonic() - began < 2.0
        assert slow.refused
        assert not fine.refused
    finally:
        await hub.stop()


def test_a_websocket_session_adds_one_task_beyond_its_own() -> None:
    """Each open session: the ASGI task running it plus its writer (was: plus a reader, a watchdog
    and a close waiter)."""
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket

    from mercato.kit.auth import Principal
    from mercato.kit.realtime import WebSocketSession

    hub = Hub(_Broker(), _History(), node_id="n1")  # type: ignore[arg-type]

    async def count(session: WebSocketSession, frame: dict[str, object]) -> None:
        assert session.conn is not None
        session.conn.send_frame({"type": "count", "tasks": len(asyncio.all_tasks())})

    async def allow(principal: Principal, channel: str) -> bool:
        return True

    async def endpoint(websocket: WebSocket) -> None:
        session = WebSocketSession(
            websocket,
            hub,
            authenticate=lambda token: Principal(token),
            authorize=allow,
            handlers={"count": count},
        )
        await session.run()

    app = Starlette(routes=[WebSocketRoute("/ws", endpoint)])
    with TestClient(app) as client:
        headers = {"Authorization": "Bearer u1"}
        with client.websocket_connect("/ws", headers=headers) as first:
            assert first.receive_json()["type"] == "ready"
            first.send_json({"type": "count"})
            alone = first.receive_json()["tasks"]
            with (
                client.websocket_connect("/ws", headers=headers) as second,
                client.websocket_connect("/ws", headers=headers) as third,
            ):
                for ws in (second, third):
                    assert ws.receive_json()["type"] == "ready"
                first.send_json({"type": "count"})
                three = first.receive_json()["tasks"]
    assert (three - alone) / 2 <= 2, (alone, three)


async def test_a_revocation_unsubscribes_the_users_connections_and_tells_the_listeners() -> None:
    hub = Hub(_Broker(), _History(), node_id="n1")  # type: ignore[arg-type]
    heard: list[tuple[str, str]] = []
    hub.on_revoked(lambda channel, user: heard.append((channel, user)))
    gone = hub.connect("u1", kind="ws", on_refused=lambda: None)
    other_device = hub.connect("u1", kind="ws", on_refused=lambda: None)
    stays = hub.connect("u2", kind="ws", on_refused=lambda: None)
    for conn in (gone, other_device, stays):
        await hub.subscribe(conn, "room:a", since=None, presence=True)
        await hub.subscribe(conn, "room:b", since=None)
    hub.fan_out(ChannelEvent("room:a", ACCESS_REVOKED, {"user": "u1"}))
    hub.fan_out(ChannelEvent("room:a", "message", {"n": 1}, seq=1))  # right after: not to u1
    await asyncio.sleep(0.01)
    assert heard == [("room:a", "u1")]
    for conn in (gone, other_device):
        frames = [orjson.loads((await conn.queue.get())[0]) for _ in range(len(conn.queue))]
        assert frames == [{"type": "unsubscribed", "channel": "room:a", "reason": "revoked"}]
        assert conn.channels == ["room:b"]
    assert [orjson.loads((await stays.queue.get())[0])["type"] for _ in range(len(stays.queue))] == [
        "message"
    ]


async def test_the_presence_heartbeat_announces_every_channel_in_one_broker_call() -> None:
    class _Calls(_Broker):
        def __init__(self) -> None:
            super().__init__()
            self.batches: list[list[str]] = []

        async def publish_many(self, events: list[ChannelEvent]) -> None:
            self.batches.append([event.channel for event in events])
            await super().publish_many(events)

    broker = _Calls()
    hub = Hub(broker, _History(), node_id="n1", presence_interval_s=0.05)  # type: ignore[arg-type]
    await hub.start()
    try:
        for channel in ("room:a", "room:b", "room:c"):
            conn = hub.connect(f"u-{channel}", kind="ws", on_refused=lambda: None)
            await hub.subscribe(conn, channel, since=None, presence=True)
        joins = len(broker.published)
        await asyncio.sleep(0.18)
    finally:
        await hub.stop()
    assert len(broker.batches) >= 2
    assert all(sorted(batch) == ["room:a", "room:b", "room:c"] for batch in broker.batches)
    assert len(broker.published) == joins + 3 * len(broker.batches)  # nothing announced one by one
