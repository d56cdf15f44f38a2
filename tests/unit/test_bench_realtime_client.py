"""`mercato bench realtime`'s load generator (ADR 0065): `spread` pacing offsets the rooms' sends
evenly within each interval (the old shape sent every room's message at one instant, and the
client's own queue was most of the latency it measured); `burst` keeps that shape. And the
`--find-max` ramp's criterion, with `--max-p99-ms` (ADR 0070)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest

from mercato.bench.realtime import RealtimeResult, realtime_verdict, step_kept_up
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


def test_a_find_max_step_keeps_up_on_throughput_and_with_a_bound_also_on_p99() -> None:
    # The default criterion (the headline): late deliveries still count as kept up.
    assert step_kept_up(delivered_in_time=True, achieved=200, offered=202, p99_ms=1400, max_p99_ms=None)
    assert not step_kept_up(delivered_in_time=False, achieved=200, offered=202, p99_ms=40, max_p99_ms=None)
    assert not step_kept_up(delivered_in_time=True, achieved=150, offered=202, p99_ms=40, max_p99_ms=None)
    # `--max-p99-ms`: a step over the bound ends the ramp, one within it keeps up.
    assert not step_kept_up(delivered_in_time=True, achieved=200, offered=202, p99_ms=1400, max_p99_ms=250)
    assert step_kept_up(delivered_in_time=True, achieved=200, offered=202, p99_ms=240, max_p99_ms=250)


def test_the_verdict_names_the_find_max_criterion_it_used() -> None:
    def result(server: str, rate: float, p99: float, kept_up: bool | None = None) -> RealtimeResult:
        return RealtimeResult(server, 1000, 50, rate, 100, 2000, 200.0, 5.0, p99, 50.0, None, 1.0, kept_up)

    results = [
        result("mercato ramp", 40, 30, True),
        result("mercato ramp", 60, 400, False),
        result("mercato", 20, 20),
        result("bare websockets", 20, 3),
    ]
    default = "\n".join(realtime_verdict(results, None))
    bounded = "\n".join(realtime_verdict(results, None, max_p99_ms=250))
    assert "98 % of deliveries within 2 s)" in default
    assert "98 % within 2 s and p99 <= 250 ms" in bounded
    assert "maximum rate found: ~40 msgs/s" in bounded


def test_a_ramp_whose_every_step_kept_up_reports_a_floor_not_a_maximum() -> None:
    def step(rate: float, kept_up: bool) -> RealtimeResult:
        return RealtimeResult(
            "mercato ramp", 1000, 50, rate, 100, 2000, 200.0, 5.0, 30, 50.0, None, 1.0, kept_up
        )

    final = RealtimeResult("mercato", 1000, 50, 90, 100, 2000, 200.0, 5.0, 20, 50.0, None, 1.0)
    bare = RealtimeResult("bare websockets", 1000, 50, 90, 100, 2000, 200.0, 5.0, 3, 50.0, None, 1.0)
    ran_out = "\n".join(realtime_verdict([step(100, True), step(150, True), final, bare], None))
    assert "maximum rate found: not reached (>= 150 msgs/s kept up)" in ran_out
    stopped = "\n".join(realtime_verdict([step(100, True), step(150, False), final, bare], None))
    assert "maximum rate found: ~100 msgs/s" in stopped
    none_kept = "\n".join(realtime_verdict([step(100, False), final, bare], None))
    assert "maximum rate found: below the first step's 100 msgs/s" in none_kept
