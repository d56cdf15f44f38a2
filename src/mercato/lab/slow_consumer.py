"""`mercato lab slow-consumer`: 10 % of a room's members stop reading mid-run.

One `mercato api` (SQLite, embedded broker) per variant, same load: **caps** (the per-connection
outbound queue's message and byte caps, dropping the oldest non-essential frames, pausing reads and
the 1013 slow-consumer deadline, as shipped) and **no caps** (`MERCATO_REALTIME_BACKPRESSURE=false`:
the same server with unbounded outbound queues). One sender posts chat messages (essential, persisted,
sequenced) each followed by a typing event (non-essential) into one room; after `stop_at` of the run
the stuck members stop reading their socket (their receive buffer is 4 KiB, so TCP pushes back on the
server within a few MB rather than loopback's autotuned ~10 MB).

Measured per variant: the server's RSS over time; the healthy members' fan-out lag (message sent ->
read) p99 before and after the stop; what each class of member lost, by class of event (essential:
chat messages missing after the stuck member reads what it was sent and resumes from its last seq;
non-essential: typing events it never saw); the server's own drop and slow-consumer counters.

The claim: bounded buffers keep the server and everyone else healthy while the slow ones lose only
non-essential events (their essential ones come back on resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import orjson
import typer
from rich.console import Console
from rich.table import Table
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mercato.bench.accounts import issue_tokens
from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.bench.realtime import SECRET, _migrate, _rss_kib
from mercato.bench.servers import ServerProcess, start_mercato
from mercato.bench.stats import LatencyHistogram
from mercato.lab.stuck_client import StuckClient

__all__ = [
    "SlowConsumerRun",
    "StuckClient",
    "run_slow_consumer",
    "slow_consumer_command",
    "verdict",
]

# The caps of the "caps" variant (100 KB messages: ~10 fit the byte cap, 2x that is the hard cap).
QUEUE_MAX_MESSAGES = 200
QUEUE_MAX_BYTES = 1 << 20
SLOW_CONSUMER_S = 3.0
VARIANTS = {"caps": "true", "no caps": "false"}


@dataclass
class Loss:
    """What one class of members (healthy / stuck) missed, summed over its members."""

    members: int
    essential_sent: int = 0
    essential_lost: int = 0
    non_essential_sent: int = 0
    non_essential_lost: int = 0


@dataclass
class SlowConsumerRun:
    variant: str
    members: int
    stuck: int
    sent: int
    stop_at_s: float
    # Bytes the stuck members were sent after they stopped reading (what no caps must hold).
    backlog_mib: float
    healthy_p99_before_ms: float
    healthy_p99_after_ms: float
    healthy: Loss
    slow: Loss
    stuck_close_codes: list[int | None]
    # Per stuck member: messages read before it stopped, read from the pipe after, whether the server
    # had closed it, and the messages its resume brought back.
    stuck_reads: list[dict[str, Any]]
    server_counters: dict[str, float]
    rss_kib: list[tuple[float, int]] = field(default_factory=list)
    # The server's mercato_realtime_queued_bytes gauge over time (sampled every 0.5 s).
    queued_bytes: list[tuple[float, int]] = field(default_factory=list)
    lag_p99_ms: list[tuple[float, float]] = field(default_factory=list)

    @property
    def peak_queued_mib(self) -> float:
        return max((b for _, b in self.queued_bytes), default=0) / (1 << 20)

    @property
    def rss_growth_mib(self) -> float:
        """Peak RSS over the run minus the RSS when sending started."""
        if not self.rss_kib:
            return 0.0
        return (max(kib for _, kib in self.rss_kib) - self.rss_kib[0][1]) / 1024


class Member:
    """One room member: a normal client (`ws`) or, for the 10 % that stop reading, a `StuckClient`."""

    def __init__(self, user: str, ws: ClientConnection | None = None, raw: StuckClient | None = None) -> None:
        self.user = user
        self.ws = ws
        self.raw = raw
        self.seqs: list[int] = []
        self.typing = 0
        self.stopped = asyncio.Event()
        self.close_code: int | None = None
        self.closed = False
        self.read_at_stop = 0
        self.read_in_pipe = 0
        self.resumed = 0

    def take(self, frame: dict[str, Any]) -> dict[str, Any]:
        if frame.get("type") == "message":
            self.seqs.append(int(frame["seq"]))
        elif frame.get("type") == "typing":
            self.typing += 1
        return frame

    async def next_frames(self, timeout_s: float) -> list[dict[str, Any]]:
        """The next frames ([] after `timeout_s`); EOFError once the server closed the connection."""
        if self.raw is not None:
            try:
                return [self.take(f) for f in await self.raw.recv(timeout_s)]
            except EOFError:
                self.closed, self.close_code = True, self.raw.close_code
                raise
        assert self.ws is not None
        try:
            return [self.take(orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout_s)))]
        except TimeoutError:
            return []
        except ConnectionClosed as closed:
            self.closed = True
            self.close_code = closed.rcvd.code if closed.rcvd is not None else None
            raise EOFError("closed") from closed

    async def read_rest(self, idle_s: float) -> None:
        """Read what the socket still holds until the server closed it or nothing came for `idle_s`."""
        with contextlib.suppress(EOFError):
            while await self.next_frames(idle_s):
                pass

    async def close(self) -> None:
        if self.raw is not None:
            self.raw.close()
        if self.ws is not None:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                await asyncio.wait_for(self.ws.close(), 2)


async def _run_variant(
    server: ServerProcess,
    tokens: dict[str, str],
    staff: str,
    *,
    variant: str,
    members: int,
    seconds: float,
    rate: float,
    size: int,
    stop_at: float,
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

    subscribe: dict[str, Any] = {"type": "subscribe", "channel": f"room:{room}"}

    async def open_one(user: str, *, since: int | None = None) -> ClientConnection:
        ws = await connect(
            ws_url, additional_headers={"Authorization": f"Bearer {tokens[user]}"}, max_queue=64
        )
        await ws.recv()  # ready
        await ws.send(orjson.dumps({**subscribe, **({"since": since} if since is not None else {})}).decode())
        return ws

    async def open_stuck(user: str) -> StuckClient:
        # Our own client, no keepalive: a client that does not read never sees the pongs. The server's
        # pings are off too (see run_slow_consumer): what cuts a stuck client off is the caps only.
        raw = await StuckClient.open(ws_url, tokens[user])
        await raw.send(subscribe)
        return raw

    stuck = [Member(u, raw=await open_stuck(u)) for u in users[:stuck_count]]
    healthy = [Member(u, ws=await open_one(u)) for u in users[stuck_count:members]]
    sender = await open_one(users[members])
    lag_before, lag_after = LatencyHistogram(), LatencyHistogram()
    windows: dict[int, LatencyHistogram] = {}
    began = time.monotonic()
    stop_s = seconds * stop_at
    done = asyncio.Event()

    async def read(member: Member, *, measure: bool) -> None:
        while not done.is_set() and not member.stopped.is_set():
            try:
                frames = await member.next_frames(0.5)
            except EOFError:
                return
            for frame in frames:
                if measure and frame.get("type") == "message":
                    lag = time.time() - datetime.fromisoformat(frame["sent_at"]).timestamp()
                    at = time.monotonic() - began
                    (lag_before if at < stop_s else lag_after).record_s(lag)
                    windows.setdefault(int(at // 2) * 2, LatencyHistogram()).record_s(lag)

    head = 0
    head_at_stop = 0

    async def read_acks() -> None:
        nonlocal head
        while not done.is_set():
            try:
                frame = orjson.loads(await asyncio.wait_for(sender.recv(), 0.5))
            except TimeoutError:
                continue
            except ConnectionClosed:
                return
            if frame.get("type") == "ack":
                head = max(head, int(frame["seq"]))

    queued: list[tuple[float, int]] = []

    async def sample_queues() -> None:
        """The server's own figure: bytes waiting in its outbound queues (not the kernel's buffers)."""
        async with httpx.AsyncClient(base_url=server.base_url, timeout=5) as http:
            while not done.is_set():
                with contextlib.suppress(httpx.HTTPError):
                    text = (await http.get("/metrics")).text
                    value = next(
                        (
                            float(line.rsplit(" ", 1)[1])
                            for line in text.splitlines()
                            if line.startswith("mercato_realtime_queued_bytes ")
                        ),
                        0.0,
                    )
                    queued.append((round(time.monotonic() - began, 2), int(value)))
                await asyncio.sleep(0.5)

    tasks = [asyncio.create_task(read(m, measure=True)) for m in healthy]
    tasks.append(asyncio.create_task(sample_queues()))
    tasks += [asyncio.create_task(read(m, measure=False)) for m in stuck]
    tasks.append(asyncio.create_task(read_acks()))
    rss: list[tuple[float, int]] = []
    sent = typing = 0
    text = "x" * size
    while (now := time.monotonic() - began) < seconds:
        if now >= stop_s and not stuck[0].stopped.is_set():
            head_at_stop = head
            for member in stuck:
                member.stopped.set()
        tick = time.monotonic()
        for _ in range(max(1, round(rate / 10))):
            body = {"type": "send", "room": room, "text": text, "client_msg_id": f"s{sent}"}
            await sender.send(orjson.dumps(body).decode())
            await sender.send(orjson.dumps({"type": "typing", "room": room}).decode())
            sent += 1
            typing += 1
        rss.append((round(now, 2), _rss_kib(server.proc.pid)))
        await asyncio.sleep(max(0.0, 0.1 - (time.monotonic() - tick)))
    # The tail: healthy members catch up to the last ack (or 20 s pass); memory still sampled.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and (head < sent or min(len(m.seqs) for m in healthy) < head):
        await asyncio.sleep(0.2)
        rss.append((round(time.monotonic() - began, 2), _rss_kib(server.proc.pid)))
    for _ in range(5):
        await asyncio.sleep(0.2)
        rss.append((round(time.monotonic() - began, 2), _rss_kib(server.proc.pid)))
    done.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    # The stuck members come back: read what their socket holds, then resume from their last seq.
    for member in stuck:
        member.read_at_stop = len(member.seqs)
        await member.read_rest(idle_s=2.0)
        member.read_in_pipe = len(member.seqs) - member.read_at_stop
        missing = head - len(set(member.seqs))
        if missing > 0:
            await member.close()
            member.raw = None
            member.ws = await open_one(member.user, since=max(member.seqs, default=0))
            deadline = time.monotonic() + 60
            with contextlib.suppress(EOFError):
                while len(set(member.seqs)) < head and time.monotonic() < deadline:
                    await member.next_frames(2)
            member.resumed = len(member.seqs) - member.read_at_stop - member.read_in_pipe
    for member in [*stuck, *healthy]:
        await member.close()
    await sender.close()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        metrics = (await http.get("/metrics")).text
    return SlowConsumerRun(
        variant=variant,
        members=members,
        stuck=stuck_count,
        sent=head,
        stop_at_s=round(stop_s, 1),
        backlog_mib=round(stuck_count * (head - head_at_stop) * size / (1 << 20), 1),
        healthy_p99_before_ms=lag_before.percentile_ms(99),
        healthy_p99_after_ms=lag_after.percentile_ms(99),
        healthy=_loss(healthy, head, typing),
        slow=_loss(stuck, head, typing),
        stuck_close_codes=[m.close_code if m.closed else None for m in stuck],
        stuck_reads=[
            {
                "before_stop": m.read_at_stop,
                "in_pipe": m.read_in_pipe,
                "closed": m.closed,
                "resumed": m.resumed,
            }
            for m in stuck
        ],
        server_counters=_counters(metrics),
        rss_kib=rss,
        queued_bytes=queued,
        lag_p99_ms=[(t, w.percentile_ms(99)) for t, w in sorted(windows.items())],
    )


def _loss(members: list[Member], head: int, typing: int) -> Loss:
    loss = Loss(members=len(members))
    for member in members:
        got = {s for s in member.seqs if s <= head}
        loss.essential_sent += head
        loss.essential_lost += head - len(got)
        loss.non_essential_sent += typing
        loss.non_essential_lost += max(0, typing - member.typing)
    return loss


def _counters(metrics: str) -> dict[str, float]:
    counters: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith("mercato_realtime_dropped_total{"):
            counters["dropped:" + line.split('reason="', 1)[1].split('"', 1)[0]] = float(
                line.rsplit(" ", 1)[1]
            )
        elif line.startswith("mercato_realtime_slow_consumer_closes_total "):
            counters["slow_consumer_closes"] = float(line.rsplit(" ", 1)[1])
    return counters


def run_slow_consumer(
    *, members: int, seconds: float, rate: float, size: int, stop_at: float, out: Path
) -> list[SlowConsumerRun]:
    runs = []
    for variant, backpressure in VARIANTS.items():
        slug = variant.replace(" ", "-")
        url = f"sqlite+aiosqlite:///{out}/{slug}.db"
        _migrate(url)
        users = [str(uuid.uuid4()) for _ in range(members + 1)]
        *issued, staff = issue_tokens(
            url, SECRET, [*((u, "customer") for u in users), (str(uuid.uuid4()), "admin")]
        )
        server = start_mercato(
            database_url=url,
            workdir=out,
            workers=1,
            name=f"mercato-{slug}",
            settings_env={
                "MERCATO_AUTH_SECRET": SECRET,
                "MERCATO_BACKPRESSURE_ENABLED": "false",
                "MERCATO_REALTIME_SEND_RATE_PER_S": "100000",
                "MERCATO_REALTIME_SEND_BURST": "100000",
                "MERCATO_REALTIME_ROOM_RATE_PER_S": "100000",
                "MERCATO_REALTIME_MAX_FRAME_BYTES": str(size + 4096),
                "MERCATO_REALTIME_MAX_TEXT_CHARS": str(size),
                "MERCATO_REALTIME_QUEUE_MAX_MESSAGES": str(QUEUE_MAX_MESSAGES),
                "MERCATO_REALTIME_QUEUE_MAX_BYTES": str(QUEUE_MAX_BYTES),
                "MERCATO_REALTIME_SLOW_CONSUMER_S": str(SLOW_CONSUMER_S),
                "MERCATO_REALTIME_BACKPRESSURE": backpressure,
                # The protocol-ping timeout would close a stuck client in both variants (40-60 s):
                # off, so the comparison is caps against no caps.
                "MERCATO_REALTIME_WS_PING_INTERVAL_S": "300",
                "MERCATO_REALTIME_WS_PING_TIMEOUT_S": "600",
            },
        )
        try:
            runs.append(
                asyncio.run(
                    _run_variant(
                        server,
                        dict(zip(users, issued, strict=True)),
                        staff,
                        variant=variant,
                        members=members,
                        seconds=seconds,
                        rate=rate,
                        size=size,
                        stop_at=stop_at,
                    )
                )
            )
        finally:
            server.stop()
    return runs


def verdict(runs: list[SlowConsumerRun]) -> list[str]:
    by = {r.variant: r for r in runs}
    caps, free = by["caps"], by["no caps"]
    bound = caps.members * 2 * QUEUE_MAX_BYTES / (1 << 20)
    checks = [
        (
            f"server memory bounded: peak bytes in the outbound queues {caps.peak_queued_mib:.1f} MiB with "
            f"caps (bound: members x 2 x byte cap = {bound:.0f} MiB) vs {free.peak_queued_mib:.1f} MiB "
            f"without (the stuck members were sent {free.backlog_mib:.1f} MiB after stopping); RSS growth "
            f"{caps.rss_growth_mib:.1f} vs {free.rss_growth_mib:.1f} MiB",
            caps.peak_queued_mib <= bound and caps.peak_queued_mib < free.peak_queued_mib / 2,
        ),
        (
            f"healthy members unaffected: p99 lag {caps.healthy_p99_before_ms:.0f} ms before the stop, "
            f"{caps.healthy_p99_after_ms:.0f} ms after (<= 2x + 250 ms: a shared box's noise); "
            f"essential lost {caps.healthy.essential_lost}/{caps.healthy.essential_sent}",
            caps.healthy_p99_after_ms <= 2 * caps.healthy_p99_before_ms + 250
            and caps.healthy.essential_lost == 0,
        ),
        (
            f"slow members lose only non-essential events: essential lost after resume "
            f"{caps.slow.essential_lost}/{caps.slow.essential_sent}, non-essential lost "
            f"{caps.slow.non_essential_lost}/{caps.slow.non_essential_sent}; closed "
            f"{caps.stuck_close_codes}",
            caps.slow.essential_lost == 0,
        ),
    ]
    held = all(ok for _, ok in checks)
    lines = [
        "claim: bounded per-connection buffers keep the server and everyone else healthy while the "
        "slow ones lose only non-essential events",
        *(f"[{'ok' if ok else 'FAILED'}] {text}" for text, ok in checks),
        f"control (no caps): RSS growth {free.rss_growth_mib:.1f} MiB, healthy p99 "
        f"{free.healthy_p99_before_ms:.0f} -> {free.healthy_p99_after_ms:.0f} ms",
        f"verdict: {'held' if held else 'did not hold'}",
    ]
    return lines


def table(runs: list[SlowConsumerRun]) -> Table:
    first = runs[0]
    out = Table(
        title=f"{first.members} members, {first.stuck} stop reading at {first.stop_at_s:g} s, "
        f"{first.sent} messages + as many typing events"
    )
    for column in (
        "variant",
        "RSS growth MiB",
        "peak queued MiB",
        "healthy p99 before/after ms",
        "healthy lost ess/non-ess",
        "slow lost ess/non-ess",
        "slow closes",
        "server counters",
    ):
        out.add_column(column)
    for run in runs:
        out.add_row(
            run.variant,
            f"{run.rss_growth_mib:.1f}",
            f"{run.peak_queued_mib:.1f}",
            f"{run.healthy_p99_before_ms:.0f} / {run.healthy_p99_after_ms:.0f}",
            f"{run.healthy.essential_lost} / {run.healthy.non_essential_lost}",
            f"{run.slow.essential_lost} / {run.slow.non_essential_lost}",
            ", ".join(str(c) for c in run.stuck_close_codes),
            ", ".join(f"{k}={v:g}" for k, v in run.server_counters.items()),
        )
    return out


def plot(runs: list[SlowConsumerRun], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (mem, lag) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for run in runs:
        start = run.rss_kib[0][1] if run.rss_kib else 0
        mem.plot(
            [t for t, _ in run.rss_kib],
            [(kib - start) / 1024 for _, kib in run.rss_kib],
            label=f"{run.variant}: RSS growth (slow lost {run.slow.essential_lost} essential, "
            f"{run.slow.non_essential_lost} non-essential)",
        )
        mem.plot(
            [t for t, _ in run.queued_bytes],
            [b / (1 << 20) for _, b in run.queued_bytes],
            linestyle="--",
            label=f"{run.variant}: bytes in outbound queues",
        )
        lag.plot(
            [t for t, _ in run.lag_p99_ms], [p for _, p in run.lag_p99_ms], marker=".", label=run.variant
        )
    for ax in (mem, lag):
        ax.axvline(runs[0].stop_at_s, color="grey", linestyle=":", label="10 % stop reading")
        ax.set_xlabel("seconds")
        ax.legend(fontsize=8)
    mem.set_ylabel("MiB")
    mem.set_title("server memory")
    lag.set_ylabel("healthy members' fan-out lag p99 per 2 s (ms)")
    lag.set_title("everyone else")
    fig.suptitle("10 % of a room's members stop reading: caps + pausing vs no caps")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slow_consumer_command(
    members: Annotated[int, typer.Option(help="Room members (10 % stop reading)", min=10, max=2000)] = 20,
    seconds: Annotated[float, typer.Option(help="Sending time per variant", min=2)] = 60,
    rate: Annotated[float, typer.Option(help="Messages per second (each plus a typing event)", min=1)] = 10,
    size: Annotated[int, typer.Option(help="Characters per message", min=100, max=100_000)] = 100_000,
    stop_at: Annotated[
        float, typer.Option(help="Fraction of the run after which they stop", min=0, max=0.9)
    ] = 0.2,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Caps + pausing vs no caps while 10 % of a room's members stop reading mid-run."""
    if update_docs:
        check_docs_target("slow-consumer")
    folder = RunFolder.open("slow-consumer", out)
    runs = run_slow_consumer(
        members=members, seconds=seconds, rate=rate, size=size, stop_at=stop_at, out=folder.path
    )
    plot(runs, folder.figure)
    lines = verdict(runs)
    Console(width=200).print(table(runs))
    Console().print("\n".join(lines))
    data = [
        {**asdict(r), "rss_growth_mib": r.rss_growth_mib, "peak_queued_mib": r.peak_queued_mib} for r in runs
    ]
    folder.record(
        data={"runs": data, "load_average": Path("/proc/loadavg").read_text().split()[:3]},
        tables=[table(runs)],
        verdict=lines,
        update_docs=update_docs,
        console=Console(stderr=True),
    )
