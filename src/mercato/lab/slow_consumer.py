"""`mercato lab slow-consumer`: 10 % of a room's members stop reading mid-run.

Two variants of one `mercato api` (SQLite, embedded broker), same load: **bounded** (the outbound
queue's caps and the slow-consumer deadline, as shipped) and **unbounded** (caps and deadline so large
they never act). Per variant: the server's RSS over time, the healthy members' fan-out lag p99, how
the stuck members ended (close code), and the events dropped by class (from the server's metrics).
The claim: bounded buffers keep the server and everyone else healthy, and the slow ones lose only
non-essential events (their essential ones come back on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from websockets.asyncio.client import ClientConnection, connect

from mercato.bench.accounts import issue_tokens
from mercato.bench.harness import OutOption, RunFolder
from mercato.bench.realtime import SECRET, _migrate, _rss_kib
from mercato.bench.servers import ServerProcess, start_mercato
from mercato.bench.stats import LatencyHistogram

__all__ = ["SlowConsumerRun", "run_slow_consumer", "slow_consumer_command"]

VARIANTS = {
    "bounded": {
        "MERCATO_REALTIME_QUEUE_MAX_MESSAGES": "200",
        "MERCATO_REALTIME_QUEUE_MAX_BYTES": "1048576",
        "MERCATO_REALTIME_SLOW_CONSUMER_S": "3",
    },
    "unbounded": {
        "MERCATO_REALTIME_QUEUE_MAX_MESSAGES": "1000000",
        "MERCATO_REALTIME_QUEUE_MAX_BYTES": "1073741824",
        "MERCATO_REALTIME_SLOW_CONSUMER_S": "600",
    },
}


@dataclass
class SlowConsumerRun:
    variant: str
    sent: int
    healthy_p99_ms: float
    healthy_received_min: int
    stuck_close_codes: list[int | None]
    dropped: dict[str, float]
    rss_kib: list[tuple[float, int]] = field(default_factory=list)

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_kib[-1][1] - self.rss_kib[0][1] if self.rss_kib else 0


async def _run_variant(
    server: ServerProcess,
    tokens: dict[str, str],
    staff: str,
    *,
    members: int,
    seconds: float,
    rate: float,
    variant: str,
) -> SlowConsumerRun:
    users = list(tokens)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as http:
        created = await http.post(
            "/v1/chat/rooms",
            json={"name": "lab", "members": users},
            headers={"Authorization": f"Bearer {staff}"},
        )
        created.raise_for_status()
        room = str(created.json()["id"])
    ws_url = server.base_url.replace("http://", "ws://") + "/v1/ws"
    stuck_count = max(1, members // 10)

    async def open_one(user: str, **kwargs: Any) -> ClientConnection:
        token = tokens[user]
        ws = await connect(ws_url, additional_headers={"Authorization": f"Bearer {token}"}, **kwargs)
        await ws.recv()
        await ws.send(orjson.dumps({"type": "subscribe", "channel": f"room:{room}"}).decode())
        return ws

    stuck = [await open_one(u, max_queue=1) for u in users[:stuck_count]]
    healthy = [await open_one(u) for u in users[stuck_count:members]]
    sender = await open_one(users[members])
    lag = LatencyHistogram()
    received = [0] * len(healthy)
    stop = asyncio.Event()

    async def read(index: int, ws: ClientConnection) -> None:
        while not stop.is_set():
            try:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 1.0))
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - closed: stop counting
                return
            if frame.get("type") == "message":
                received[index] += 1
                lag.record_s(time.time() - datetime.fromisoformat(frame["sent_at"]).timestamp())

    async def drain_sender() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(sender.recv(), 1.0)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001
                return

    readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(healthy)]
    readers.append(asyncio.create_task(drain_sender()))
    rss: list[tuple[float, int]] = []
    began = time.monotonic()
    sent = 0
    text = "x" * 60_000
    while time.monotonic() - began < seconds:
        tick = time.monotonic()
        for _ in range(max(1, round(rate / 10))):
            body = {"type": "send", "room": room, "text": text, "client_msg_id": f"s{sent}"}
            await sender.send(orjson.dumps(body).decode())
            await sender.send(orjson.dumps({"type": "typing", "room": room}).decode())
            sent += 1
        rss.append((round(time.monotonic() - began, 2), _rss_kib(server.proc.pid)))
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    for _ in range(30):  # the tail, still sampling memory
        await asyncio.sleep(0.2)
        rss.append((round(time.monotonic() - began, 2), _rss_kib(server.proc.pid)))
    stop.set()
    await asyncio.gather(*readers, return_exceptions=True)
    codes: list[int | None] = []
    for ws in stuck:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(ws.close(), 5)
        codes.append(ws.close_code)
    for ws in [*healthy, sender]:
        await ws.close()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        metrics = (await http.get("/metrics")).text
    dropped = {
        line.split('reason="', 1)[1].split('"', 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mercato_realtime_dropped_total{")
    }
    dropped["slow_consumer_closes"] = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mercato_realtime_slow_consumer_closes_total ")
    )
    return SlowConsumerRun(
        variant=variant,
        sent=sent,
        healthy_p99_ms=lag.percentile_ms(99),
        healthy_received_min=min(received) if received else 0,
        stuck_close_codes=codes,
        dropped=dropped,
        rss_kib=rss,
    )


def run_slow_consumer(*, members: int, seconds: float, rate: float, out: Path) -> list[SlowConsumerRun]:
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for variant, env in VARIANTS.items():
        url = f"sqlite+aiosqlite:///{out}/{variant}.db"
        _migrate(url)
        users = [str(uuid.uuid4()) for _ in range(members + 1)]
        *issued, staff = issue_tokens(
            url, SECRET, [*((u, "customer") for u in users), (str(uuid.uuid4()), "admin")]
        )
        tokens = dict(zip(users, issued, strict=True))
        server = start_mercato(
            database_url=url,
            workdir=out,
            workers=1,
            name=f"mercato-{variant}",
            settings_env={
                "MERCATO_AUTH_SECRET": SECRET,
                "MERCATO_BACKPRESSURE_ENABLED": "false",
                "MERCATO_REALTIME_SEND_RATE_PER_S": "100000",
                "MERCATO_REALTIME_SEND_BURST": "100000",
                "MERCATO_REALTIME_ROOM_RATE_PER_S": "100000",
                # Large messages: a stuck client must outgrow the kernel's socket buffers (~10 MB on
                # loopback) before the server's own queue fills, with few persists on a busy machine.
                "MERCATO_REALTIME_MAX_FRAME_BYTES": "65536",
                "MERCATO_REALTIME_MAX_TEXT_CHARS": "60000",
                **env,
            },
        )
        try:
            runs.append(
                asyncio.run(
                    _run_variant(
                        server, tokens, staff, members=members, seconds=seconds, rate=rate, variant=variant
                    )
                )
            )
        finally:
            server.stop()
    (out / "slow-consumer.json").write_text(json.dumps([asdict(r) for r in runs], indent=2))
    _plot(runs, out / "slow-consumer.png")
    return runs


def _plot(runs: list[SlowConsumerRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for run in runs:
        start = run.rss_kib[0][1] if run.rss_kib else 0
        ax.plot(
            [t for t, _ in run.rss_kib],
            [(kib - start) / 1024 for _, kib in run.rss_kib],
            label=f"{run.variant}: healthy p99 {run.healthy_p99_ms:.0f} ms",
        )
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS growth (MiB)")
    ax.set_title("10 % of members stop reading: server memory, bounded vs unbounded outbound queues")
    ax.legend()
    fig.savefig(path, dpi=110)


def slow_consumer_command(
    members: Annotated[int, typer.Option(help="Room members (10 % never read)", min=10)] = 50,
    seconds: Annotated[float, typer.Option(help="Sending time per variant", min=1)] = 15,
    rate: Annotated[float, typer.Option(help="Messages per second (60 KB each, plus a typing event)")] = 20,
    out: OutOption = None,
) -> None:
    """Bounded vs unbounded per-connection buffers while 10 % of clients stop reading."""
    from rich.console import Console
    from rich.table import Table

    folder = RunFolder.open("slow-consumer", out)
    runs = run_slow_consumer(members=members, seconds=seconds, rate=rate, out=folder.path)
    table = Table(title=f"{members} members, 10 % stuck, {rate:g} msgs/s for {seconds:g} s")
    for column in ("variant", "sent", "RSS growth MiB", "healthy p99 ms", "stuck closes", "dropped"):
        table.add_column(column)
    for run in runs:
        table.add_row(
            run.variant,
            str(run.sent),
            f"{run.rss_growth_kib / 1024:.1f}",
            f"{run.healthy_p99_ms:.0f}",
            ", ".join(str(c) for c in run.stuck_close_codes),
            ", ".join(f"{k}={v:g}" for k, v in run.dropped.items()),
        )
    Console().print(table)
    folder.write_table(table)
    folder.write_result(
        verdict=[
            f"{run.variant}: RSS growth {run.rss_growth_kib / 1024:.1f} MiB, healthy p99 "
            f"{run.healthy_p99_ms:.0f} ms, stuck closes {len(run.stuck_close_codes)}"
            for run in runs
        ]
    )
    Console(stderr=True).print(f"run folder: {folder.path}")
