"""The load side of `mercato bench realtime`: the WebSocket clients, in one or more processes.

One client process topped out near 87 msgs/s sent with 1,000 connections (ADR 0063's ramp stopped
there), and its own event loop's lag was in every latency it measured: the bare relay's p50 was
50-240 ms at 40 msgs/s. `processes` client processes each hold every `processes`-th connection
(and the senders among them) and time what they read; the coordinator only steers phases,
merges the histograms and reads the server's CPU.

Pacing: `spread` (the default) sends each room's messages every `rooms / rate` seconds, the rooms
evenly offset within that interval, so the offered rate is a rate; `burst` sends one message to
every room at once each interval (the shape of the runs before session 9: the whole interval's
fan-out lands on the client at one instant, and its p99 measures the client's queue).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue as queue_module
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import uvloop
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from mercato.bench.realtime_idle import raise_fd_limit
from mercato.bench.stats import LatencyHistogram

__all__ = ["ClientPlan", "ClientPool", "PhaseOutcome"]

_Payload = bytes | bytearray | memoryview

PACINGS = ("spread", "burst")
# A step keeps up when this share of its deliveries arrived within `KEEP_UP_TAIL_S` of its end.
KEEP_UP_SHARE = 0.98
KEEP_UP_TAIL_S = 2.0
_READY_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class ClientPlan:
    ws_url: str
    tokens: list[str] | None  # one per connection (None: the bare relay needs none)
    room_ids: list[str]
    connections: int
    processes: int = 1
    pacing: str = "spread"

    def __post_init__(self) -> None:
        if self.pacing not in PACINGS:
            raise ValueError(f"pacing is one of {PACINGS}")
        if self.processes < 1:
            raise ValueError("processes must be at least 1")


@dataclass(frozen=True)
class PhaseOutcome:
    hist: LatencyHistogram
    sent: int
    sending_s: float
    elapsed_s: float
    kept_up: bool


class _Connection(asyncio.Protocol):
    """One client WebSocket on `websockets`' sans-I/O protocol, its frames handled as they arrive.

    `websockets`' asyncio client hands every frame through a queue to a `recv()` future: at 850
    msgs/s (17,000 deliveries/s) the two client processes took 0.7 of the machine's 2 cores, and
    before that, with a `wait_for` timer per `recv()` and no uvloop, 1.1; the servers' latencies
    measured the wait for a core as much as the server. Here `data_received` parses the frames and
    calls `on_text` for each text frame, in place: no task, queue or future per delivery."""

    def __init__(self, url: str, headers: dict[str, str], on_text: Callable[[_Payload], None]) -> None:
        # No compression offered (no extensions), to either server: the same frames on the wire.
        self._protocol = ClientProtocol(parse_uri(url), max_size=None)
        self._headers = headers
        self._on_text = on_text
        self._transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.opened: asyncio.Future[None] = loop.create_future()
        self.first_text: asyncio.Future[None] = loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        request = self._protocol.connect()
        for name, value in self._headers.items():
            request.headers[name] = value
        self._protocol.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._protocol.receive_data(data)
        for event in self._protocol.events_received():
            if isinstance(event, Response):
                if self._protocol.handshake_exc is not None:
                    _settle(self.opened, self._protocol.handshake_exc)
                else:
                    _settle(self.opened, None)
            elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                _settle(self.first_text, None)
                self._on_text(event.data)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        lost = ConnectionError(f"connection lost: {exc!r}")
        _settle(self.opened, lost)
        _settle(self.first_text, lost)
        self._transport = None

    async def send(self, raw: str) -> None:
        self.send_now(raw)

    def send_now(self, raw: str) -> None:
        if self._transport is None:
            return
        self._protocol.send_text(raw.encode())
        self._flush()

    def close(self) -> None:
        if self._transport is None:
            return
        with contextlib.suppress(Exception):
            self._protocol.send_close()
            self._flush()
        if self._transport is not None:
            self._transport.close()

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for data in self._protocol.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()  # the protocol's end of its side of the closing handshake


def _settle(future: asyncio.Future[None], outcome: BaseException | None) -> None:
    if future.done():
        return
    if outcome is None:
        future.set_result(None)
    else:
        future.set_exception(outcome)
        future.exception()  # retrieved: a connection nobody waits on any more logs nothing


class ClientPool:
    """The client processes of one server's measurement: `open` (connections opened, then
    `subscribe`), `phase` as many times as needed, `close`."""

    def __init__(self, plan: ClientPlan) -> None:
        self.plan = plan
        ctx = mp.get_context("spawn")
        self._results: Any = ctx.Queue()
        self._commands: list[Any] = [ctx.Queue() for _ in range(plan.processes)]
        self._sent: Any = ctx.Array("q", len(plan.room_ids), lock=False)
        self._barrier: Any = ctx.Barrier(plan.processes + 1)
        self._procs = [
            ctx.Process(
                target=_worker,
                args=(w, plan, self._commands[w], self._results, self._sent, self._barrier),
                daemon=True,
            )
            for w in range(plan.processes)
        ]

    def _gather(self, kind: str) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while len(out) < self.plan.processes:
            try:
                item = self._results.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue_module.Empty as exc:
                raise RuntimeError(f"client processes did not report {kind!r} in time") from exc
            if item[0] == "error":
                raise RuntimeError(f"client process {item[1]} failed: {item[2]}")
            if item[0] == kind:
                out.append(item)
        return out

    def open(self) -> None:
        for proc in self._procs:
            proc.start()
        self._gather("opened")

    def subscribe(self) -> None:
        for commands in self._commands:
            commands.put(("subscribe",))
        self._gather("subscribed")

    def phase(self, offered: float, seconds: float) -> PhaseOutcome:
        for w in range(len(self.plan.room_ids)):
            self._sent[w] = 0
        for commands in self._commands:
            commands.put(("phase", offered, seconds))
        self._barrier.wait()  # every client starts sending together
        self._barrier.wait()  # every client has sent: the per-room counts are final
        parts = self._gather("phase")
        hist = LatencyHistogram.merged([p[2] for p in parts])
        sending_s = max(p[4] for p in parts)
        reached = [p[5] for p in parts]
        kept_up = all(r is not None and r <= sending_s + KEEP_UP_TAIL_S for r in reached)
        return PhaseOutcome(
            hist=hist,
            sent=sum(p[3] for p in parts),
            sending_s=sending_s,
            elapsed_s=max(p[6] for p in parts),
            kept_up=kept_up,
        )

    def close(self) -> None:
        for commands in self._commands:
            commands.put(None)
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


def _worker(w: int, plan: ClientPlan, commands: Any, results: Any, sent: Any, barrier: Any) -> None:
    try:
        # On uvloop, as the server is: at 850 msgs/s the two client processes' default loops took
        # 1.1 of the machine's 2 cores, and the server's latency measured the queue for a core.
        uvloop.run(_Client(w, plan, commands, results, sent, barrier).run())
    except Exception as exc:  # noqa: BLE001 - reported to the coordinator, which fails the run
        results.put(("error", w, repr(exc)))


class _Client:
    def __init__(
        self, w: int, plan: ClientPlan, commands: Any, results: Any, sent: Any, barrier: Any
    ) -> None:
        self.w, self.plan = w, plan
        self.commands, self.results, self.sent, self.barrier = commands, results, sent, barrier
        self.rooms = len(plan.room_ids)
        self.mine = list(range(w, plan.connections, plan.processes))
        self.conns: dict[int, _Connection] = {}
        self.hist = LatencyHistogram()
        self.subscribed = 0

    async def run(self) -> None:
        raise_fd_limit()
        for start in range(0, len(self.mine), 100):
            chunk = self.mine[start : start + 100]
            opened = await asyncio.gather(*(self._open(i) for i in chunk))
            self.conns.update(zip(chunk, opened, strict=True))
        self.results.put(("opened", self.w))
        while True:
            command = await asyncio.to_thread(self.commands.get)
            if command is None:
                break
            if command[0] == "subscribe":
                await self._subscribe_all()
                self.results.put(("subscribed", self.w))
            else:
                await self._phase(float(command[1]), float(command[2]))
        for ws in self.conns.values():
            ws.close()
        await asyncio.sleep(0.1)  # the close frames out before the loop ends

    async def _open(self, index: int) -> _Connection:
        tokens = self.plan.tokens
        headers = {"Authorization": f"Bearer {tokens[index]}"} if tokens else {}
        uri = parse_uri(self.plan.ws_url)
        _, ws = await asyncio.get_running_loop().create_connection(
            lambda: _Connection(self.plan.ws_url, headers, lambda raw: self._on_frame(index, raw)),
            uri.host,
            uri.port,
        )
        await ws.opened
        if tokens:
            await ws.first_text  # ready
        return ws

    def _subscribe_frame(self, index: int) -> str:
        channel = f"room:{self.plan.room_ids[index % self.rooms]}"
        return orjson.dumps({"type": "subscribe", "channel": channel}).decode()

    def _on_frame(self, index: int, raw: _Payload) -> None:
        frame = orjson.loads(raw)
        kind = frame.get("type")
        if kind == "message":
            self.hist.record_s(time.time() - float(str(frame["text"]).split("|", 1)[0]))
        elif kind == "subscribed":
            self.subscribed += 1
        elif kind == "error" and frame.get("code") in ("unavailable", "try_again"):
            # The protocol's answer to a server too busy to subscribe now (ADR 0078: `try_again`,
            # with `retry_after_s`): subscribe again after that.
            asyncio.get_running_loop().call_later(
                float(frame.get("retry_after_s", 0.5)),
                lambda: self.conns[index].send_now(self._subscribe_frame(index)),
            )

    async def _subscribe_all(self) -> None:
        # In waves of 200, every subscription confirmed before the next wave.
        order = list(self.conns)
        for start in range(0, len(order), 200):
            wave = order[start : start + 200]
            for index in wave:
                await self.conns[index].send(self._subscribe_frame(index))
            deadline = time.monotonic() + 120
            while self.subscribed < start + len(wave) and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

    async def _phase(self, offered: float, seconds: float) -> None:
        self.hist = hist = LatencyHistogram()
        senders = [i for i in self.conns if i < self.rooms]
        interval = self.rooms / offered
        await asyncio.to_thread(self.barrier.wait)
        began = time.monotonic()
        if self.plan.pacing == "spread":
            await asyncio.gather(*(self._send_spread(i, began, interval, seconds) for i in senders))
        else:
            await self._send_burst(senders, began, interval, seconds)
        sending_s = time.monotonic() - began
        await asyncio.to_thread(self.barrier.wait)
        mine_sent = sum(self.sent[i] for i in senders)
        expected = sum(self.sent[i % self.rooms] for i in self.conns)
        # The tail: until every expected delivery arrived, or nothing more came for 3 s (max 30 s).
        last_count, last_change = hist.count, time.monotonic()
        reached = time.monotonic() - began if hist.count >= KEEP_UP_SHARE * expected else None
        while (
            hist.count < expected
            and time.monotonic() - last_change < 3
            and time.monotonic() - began < sending_s + 30
        ):
            await asyncio.sleep(0.1)
            if hist.count != last_count:
                last_count, last_change = hist.count, time.monotonic()
            if reached is None and hist.count >= KEEP_UP_SHARE * expected:
                reached = time.monotonic() - began
        elapsed = time.monotonic() - began
        self.results.put(("phase", self.w, hist.encode(), mine_sent, sending_s, reached, elapsed))

    async def _send_one(self, index: int) -> None:
        body = {
            "type": "send",
            "room": self.plan.room_ids[index],
            "text": f"{time.time()}|{'x' * 64}",
            "client_msg_id": uuid.uuid4().hex,
        }
        await self.conns[index].send(orjson.dumps(body).decode())
        self.sent[index] += 1  # only this process writes this room's count

    async def _send_spread(self, index: int, began: float, interval: float, seconds: float) -> None:
        due = began + interval * index / self.rooms
        while due - began < seconds:
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._send_one(index)
            due += interval

    async def _send_burst(self, senders: list[int], began: float, interval: float, seconds: float) -> None:
        while time.monotonic() - began < seconds:
            tick = time.monotonic()
            for index in senders:
                await self._send_one(index)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
