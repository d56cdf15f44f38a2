"""`mercato bench realtime`: chat fan-out through Mercato's `/v1/ws` vs a bare `websockets` broadcast
server sending the same frames, in the same run.

N connections over M rooms (each connection follows one room), one sender per room sending at
`rate / M` messages per second for `seconds`. Measured per server: deliveries per second, fan-out
latency (the send timestamp carried in the text -> the frame read by a member) p50/p99, server CPU
seconds per delivery, and the server's RSS per idle authenticated connection. Mercato persists every
message (PostgreSQL or SQLite), orders it through the stream partitioned by room and fans it out
through its broker; the bare server only relays: the gap between the two is the cost of durability,
order and backpressure.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect

from mercato.bench.accounts import issue_tokens
from mercato.bench.servers import ServerProcess, _clean_env, free_port, start_mercato, start_server
from mercato.bench.stats import LatencyHistogram
from mercato.kit.storage.migrations import upgrade

__all__ = ["RealtimeResult", "run_realtime_bench", "serve_bare"]

# The token secret of the throwaway server this bench starts (and of the tokens it mints for it).
SECRET = "bench-realtime-secret-0123456789abcdef-0123456789"  # noqa: S105 - a bench-only server


@dataclass(frozen=True)
class RealtimeResult:
    server: str
    connections: int
    rooms: int
    offered_rate: float
    sent: int
    deliveries: int
    deliveries_per_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_1000: float | None
    rss_kib_per_idle_connection: float | None


# -- the bare server -------------------------------------------------------------------------


def serve_bare(port: int) -> None:
    """A plain `websockets` server: `subscribe` joins a room, `send` is broadcast to the room."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    rooms: dict[str, set[ServerConnection]] = {}
    seqs: dict[str, int] = {}

    async def handler(ws: ServerConnection) -> None:
        joined: list[str] = []
        try:
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "subscribe":
                    room = str(frame["channel"]).partition(":")[2]
                    rooms.setdefault(room, set()).add(ws)
                    joined.append(room)
                    await ws.send(orjson.dumps({"type": "subscribed", "channel": frame["channel"]}).decode())
                elif frame.get("type") == "send":
                    room = str(frame["room"])
                    seqs[room] = seqs.get(room, 0) + 1
                    out = {"type": "message", "room": room, "seq": seqs[room], "text": frame["text"]}
                    broadcast(rooms.get(room, ()), orjson.dumps(out).decode())
        finally:
            for room in joined:
                rooms.get(room, set()).discard(ws)

    def health(connection: Any, request: Any) -> Any:
        if request.path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        return None

    async def main() -> None:
        async with serve(handler, "127.0.0.1", port, process_request=health):
            await asyncio.Future()

    asyncio.run(main())


# -- the load ----------------------------------------------------------------------------------


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _measure(
    server: ServerProcess,
    *,
    name: str,
    ws_url: str,
    tokens: list[str] | None,
    room_ids: list[str],
    connections: int,
    rate: float,
    seconds: float,
) -> RealtimeResult:
    rooms = len(room_ids)
    rss_before = _rss_kib(server.proc.pid)

    async def open_one(index: int) -> ClientConnection:
        headers = {"Authorization": f"Bearer {tokens[index]}"} if tokens else None
        ws = await connect(ws_url, additional_headers=headers, max_queue=None)
        if tokens:
            await ws.recv()  # ready
        return ws

    conns: list[ClientConnection] = []
    for start in range(0, connections, 100):
        conns += await asyncio.gather(*(open_one(i) for i in range(start, min(start + 100, connections))))
    await asyncio.sleep(1.0)
    rss_idle = _rss_kib(server.proc.pid)
    for index, ws in enumerate(conns):
        await ws.send(
            orjson.dumps({"type": "subscribe", "channel": f"room:{room_ids[index % rooms]}"}).decode()
        )
    latencies = LatencyHistogram()
    stop = asyncio.Event()

    async def reader(ws: ClientConnection) -> None:
        while not stop.is_set():
            try:
                raw = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - a closed connection just stops counting
                return
            frame = orjson.loads(raw)
            if frame.get("type") == "message":
                latencies.record_s(time.time() - float(str(frame["text"]).split("|", 1)[0]))

    readers = [asyncio.create_task(reader(ws)) for ws in conns]
    await asyncio.sleep(1.0)
    senders = conns[:rooms]
    sent = 0
    cpu_start = server.cpu_s()
    began = time.monotonic()
    interval = rooms / rate
    while time.monotonic() - began < seconds:
        tick = time.monotonic()
        for index, ws in enumerate(senders):
            text = f"{time.time()}|{'x' * 64}"
            body = {"type": "send", "room": room_ids[index], "text": text, "client_msg_id": uuid.uuid4().hex}
            await ws.send(orjson.dumps(body).decode())
            sent += 1
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick)))
    await asyncio.sleep(2.0)  # let the tail arrive
    elapsed = time.monotonic() - began
    cpu_end = server.cpu_s()
    stop.set()
    await asyncio.gather(*readers, return_exceptions=True)
    for ws in conns:
        await ws.close()
    delivered = latencies.count
    cpu = (
        None
        if cpu_start is None or cpu_end is None or not delivered
        else (cpu_end - cpu_start) * 1e6 / delivered
    )
    return RealtimeResult(
        server=name,
        connections=connections,
        rooms=rooms,
        offered_rate=rate,
        sent=sent,
        deliveries=delivered,
        deliveries_per_s=delivered / elapsed,
        p50_ms=latencies.percentile_ms(50),
        p99_ms=latencies.percentile_ms(99),
        cpu_ms_per_1000=cpu,
        rss_kib_per_idle_connection=(rss_idle - rss_before) / connections if connections else None,
    )


def run_realtime_bench(
    *, connections: int, rooms: int, rate: float, seconds: float, workdir: Path, database_url: str | None
) -> list[RealtimeResult]:
    workdir.mkdir(parents=True, exist_ok=True)
    url = database_url or f"sqlite+aiosqlite:///{workdir}/realtime.db"
    _migrate(url)
    users = [str(uuid.uuid4()) for _ in range(connections)]
    *tokens, staff = issue_tokens(
        url, SECRET, [*((u, "customer") for u in users), (str(uuid.uuid4()), "admin")]
    )
    results: list[RealtimeResult] = []
    ours = start_mercato(
        database_url=url,
        workdir=workdir,
        workers=1,
        settings_env={
            "MERCATO_AUTH_SECRET": SECRET,
            "MERCATO_BACKPRESSURE_ENABLED": "false",
            "MERCATO_REALTIME_SEND_RATE_PER_S": "100000",
            "MERCATO_REALTIME_SEND_BURST": "100000",
            "MERCATO_REALTIME_ROOM_RATE_PER_S": "100000",
        },
    )
    try:
        room_ids = []
        for r in range(rooms):
            members = users[r::rooms]
            created = httpx.post(
                f"{ours.base_url}/v1/chat/rooms",
                json={"name": f"bench {r}", "members": members},
                headers={"Authorization": f"Bearer {staff}"},
                timeout=30,
            )
            created.raise_for_status()
            room_ids.append(str(created.json()["id"]))
        ws_url = ours.base_url.replace("http://", "ws://") + "/v1/ws"
        results.append(
            asyncio.run(
                _measure(
                    ours,
                    name="mercato",
                    ws_url=ws_url,
                    tokens=tokens,
                    room_ids=room_ids,
                    connections=connections,
                    rate=rate,
                    seconds=seconds,
                )
            )
        )
    finally:
        ours.stop()
    port = free_port()
    bare = start_server(
        "bare-websockets",
        ["-c", f"from mercato.bench.realtime import serve_bare; serve_bare({port})"],
        port=port,
        workdir=workdir,
        env=_clean_env({}),
        ready_path="/healthz",
    )
    try:
        results.append(
            asyncio.run(
                _measure(
                    bare,
                    name="bare websockets",
                    ws_url=f"ws://127.0.0.1:{port}/",
                    tokens=None,
                    room_ids=[f"r{r}" for r in range(rooms)],
                    connections=connections,
                    rate=rate,
                    seconds=seconds,
                )
            )
        )
    finally:
        bare.stop()
    (workdir / "realtime.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    return results


def _migrate(url: str) -> None:
    from mercato.migrations import SCRIPT_LOCATION

    upgrade(SCRIPT_LOCATION, url)


if __name__ == "__main__":  # pragma: no cover
    serve_bare(int(sys.argv[1]))
