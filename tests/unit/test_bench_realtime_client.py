"""`mercato bench realtime`'s load generator (ADR 0065): `spread` pacing offsets the rooms' sends
evenly within each interval (the old shape sent every room's message at one instant, and the
client's own queue was most of the latency it measured); `burst` keeps that shape."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from mercato.bench.realtime_client import ClientPlan, _Client


class _Socket:
    def __init__(self, log: list[tuple[float, str]]) -> None:
        self._log = log

    async def send(self, raw: str) -> None:
        self._log.append((time.monotonic(), str(orjson.loads(raw)["room"])))


def _client(pacing: str, rooms: int, log: list[tuple[float, str]]) -> _Client:
    plan = ClientPlan("ws://unused", None, [f"r{i}" for i in range(rooms)], rooms, 1, pacing)
    sent: Any = [0] * rooms
    client = _Client(0, plan, None, None, sent, None)
    client.conns = {i: _Socket(log) for i in range(rooms)}  # type: ignore[misc]
    return client


async def test_spread_pacing_offsets_each_room_within_the_interval() -> None:
    log: list[tuple[float, str]] = []
    rooms, interval = 4, 0.2
    client = _client("spread", rooms, log)
    began = time.monotonic()
    await asyncio.gather(*(client._send_spread(i, began, interval, 1.95 * interval) for i in range(rooms)))
    assert sorted(client.sent) == [2, 2, 2, 2]
    firsts = {room: at - began for at, room in reversed(log)}
    for i in range(rooms):
        assert firsts[f"r{i}"] == pytest.approx(i * interval / rooms, abs=0.03)


async def test_burst_pacing_sends_every_room_at_once() -> None:
    log: list[tuple[float, str]] = []
    client = _client("burst", 4, log)
    began = time.monotonic()
    await client._send_burst(list(range(4)), began, 0.2, 0.1)
    assert [room for _, room in log] == ["r0", "r1", "r2", "r3"]
    assert log[-1][0] - log[0][0] < 0.02


def test_a_plan_refuses_an_unknown_pacing() -> None:
    with pytest.raises(ValueError, match="pacing"):
        ClientPlan("ws://x", None, ["r"], 1, 1, "poisson")
