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
import os
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import httpx
import orjson

from mercato.bench.accounts import issue_tokens
from mercato.bench.realtime_client import ClientPlan, ClientPool
from mercato.bench.realtime_idle import IdleResult, raise_fd_limit, run_idle_bench
from mercato.bench.realtime_trace import PhaseTrace, trace_dir
from mercato.bench.servers import ServerProcess, _clean_env, free_port, start_mercato, start_server
from mercato.kit.storage.migrations import upgrade

__all__ = [
    "IdleResult",
    "RealtimeResult",
    "realtime_table",
    "realtime_verdict",
    "run_idle_bench",
    "run_realtime_bench",
    "serve_bare",
    "step_kept_up",
]

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
    # The server's CPU per second with every connection subscribed and nothing sent (timers, polls,
    # presence, keepalive): the part of `cpu_ms_per_1000` that does not depend on the deliveries.
    idle_cpu_ms_per_s: float | None = None
    # A `--find-max` ramp step: did it keep up (None for a phase that is not a ramp step).
    kept_up: bool | None = None

    @property
    def marginal_us_per_delivery(self) -> float | None:
        """CPU per delivery once the idle CPU over the same time is taken out."""
        if self.cpu_ms_per_1000 is None or self.idle_cpu_ms_per_s is None or not self.deliveries:
            return None
        elapsed = self.deliveries / self.deliveries_per_s
        idle_us = self.idle_cpu_ms_per_s * 1000 * elapsed / self.deliveries
        return max(0.0, self.cpu_ms_per_1000 - idle_us)

    @property
    def deliveries_per_cpu_s(self) -> float | None:
        """Deliveries per second of one core (the server's CPU time over the run)."""
        return 1e6 / self.cpu_ms_per_1000 if self.cpu_ms_per_1000 else None


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


# The ramp of `--find-max`: each step offers this much more than the last, at most this many steps.
_RAMP_FACTOR = 1.5
_RAMP_STEPS = 10
# How long the server's idle CPU (all subscribed, nothing sent) is measured before the first phase.
_IDLE_CPU_S = 5.0


def step_kept_up(
    *, delivered_in_time: bool, achieved: float, offered: float, p99_ms: float, max_p99_ms: float | None
) -> bool:
    """Whether a `--find-max` step kept up: its deliveries arrived in time (98 % within 2 s of the
    step's end), the client sent >= 90 % of the offered rate (a client that could not send at
    `offered` ends the ramp too) and, with `max_p99_ms`, its p99 was within that bound."""
    within = max_p99_ms is None or p99_ms <= max_p99_ms
    return delivered_in_time and achieved >= 0.9 * offered and within


# `MERCATO_BENCH_PROFILE_DIR=<dir>`: each of the server's sending phases is sampled by py-spy
# (`--nonblocking`, so the server is never paused) into `<dir>/<server>-<rate>.folded`: what the
# server spent its CPU on while sending, without the connect and subscribe storms around it.
_PROFILE_DIR_ENV = "MERCATO_BENCH_PROFILE_DIR"


def _profile_phase(
    server: ServerProcess, label: str, offered: float, seconds: float
) -> subprocess.Popen[bytes] | None:
    folder, spy = os.environ.get(_PROFILE_DIR_ENV), shutil.which("py-spy")
    if not folder or spy is None:
        return None
    out = Path(folder) / f"{label.replace(' ', '-')}-{offered:g}.folded"
    out.parent.mkdir(parents=True, exist_ok=True)
    args = [spy, "record", "--nonblocking", "-r", "250", "-f", "raw", "-d", f"{max(1, int(seconds))}"]
    args += ["-p", str(server.proc.pid), "-o", str(out)]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: S603


def _measure(
    server: ServerProcess,
    *,
    name: str,
    plan: ClientPlan,
    rate: float,
    seconds: float,
    find_max: bool = False,
    max_p99_ms: float | None = None,
) -> list[RealtimeResult]:
    """One connection set (held by `plan.processes` client processes), then one sending phase at
    `rate` or, with `find_max`, a ramp from `rate` up (x1.5 per step) until a step does not keep up,
    then a phase at half the highest rate that did: the rate goal (c) asks p99 at. A step keeps up
    when 98 % of its deliveries arrived within 2 s of its end and the client sent >= 90 % of the
    offered rate (a throughput: deliveries may be late); with `max_p99_ms`, also only when its p99
    was within that bound (a rate served at a stated latency)."""
    connections, rooms = plan.connections, len(plan.room_ids)
    rss_before = _rss_kib(server.proc.pid)
    pool = ClientPool(plan)
    try:
        pool.open()
        time.sleep(1.0)
        rss_idle = _rss_kib(server.proc.pid)
        idle_kib = (rss_idle - rss_before) / connections if connections else None
        pool.subscribe()
        time.sleep(1.0)
        # The server's own CPU with nothing sent, over `_IDLE_CPU_S` (the readers keep reading).
        idle_start = server.cpu_s()
        time.sleep(_IDLE_CPU_S)
        idle_end = server.cpu_s()
        idle_cpu = None
        if idle_start is not None and idle_end is not None:
            idle_cpu = (idle_end - idle_start) * 1000 / _IDLE_CPU_S

        def phase(label: str, offered: float) -> tuple[RealtimeResult, bool]:
            """Send at `offered` msgs/s for `seconds`; (result, whether it kept up)."""
            profiler = _profile_phase(server, label, offered, seconds)
            traces = trace_dir()
            tracer = None
            if traces is not None and label.startswith("mercato"):
                tracer = PhaseTrace(server.proc.pid, traces / f"{label.replace(' ', '-')}-{offered:g}.strace")
            cpu_start = server.cpu_s()
            outcome = pool.phase(offered, seconds)
            cpu_end = server.cpu_s()
            if profiler is not None:
                profiler.wait(timeout=30)
            if tracer is not None:
                writes = tracer.finish()
                per = ", ".join(
                    f"{peer} {n / max(1, outcome.sent):.2f}" for peer, n in sorted(writes.items())
                )
                print(f"{label} at {offered:g} msgs/s: server writes per message sent (strace): {per}")
            delivered = outcome.hist.count
            cpu = (
                None
                if cpu_start is None or cpu_end is None or not delivered
                else (cpu_end - cpu_start) * 1e6 / delivered
            )
            # The achieved rate: what was sent, if it was delivered (the client may not reach `offered`).
            achieved = outcome.sent / outcome.sending_s
            result = RealtimeResult(
                server=label,
                connections=connections,
                rooms=rooms,
                offered_rate=round(achieved, 1),
                sent=outcome.sent,
                deliveries=delivered,
                deliveries_per_s=delivered / outcome.elapsed_s,
                p50_ms=outcome.hist.percentile_ms(50),
                p99_ms=outcome.hist.percentile_ms(99),
                cpu_ms_per_1000=cpu,
                rss_kib_per_idle_connection=idle_kib,
                idle_cpu_ms_per_s=idle_cpu,
            )
            time.sleep(1.0)
            kept_up = step_kept_up(
                delivered_in_time=outcome.kept_up,
                achieved=achieved,
                offered=offered,
                p99_ms=result.p99_ms,
                max_p99_ms=max_p99_ms,
            )
            return replace(result, kept_up=kept_up), kept_up

        results: list[RealtimeResult] = []
        if find_max:
            best: float | None = None
            offered = rate
            for _step in range(_RAMP_STEPS):
                result, kept_up = phase(f"{name} ramp", offered)
                results.append(result)
                if not kept_up:
                    break
                best = result.offered_rate
                offered *= _RAMP_FACTOR
            half = (best if best is not None else results[0].offered_rate / _RAMP_FACTOR) / 2
            final, _ = phase(name, half)
            results.append(final)
        else:
            results.append(phase(name, rate)[0])
        return results
    finally:
        pool.close()


def run_realtime_bench(
    *,
    connections: int,
    rooms: int,
    rate: float,
    seconds: float,
    workdir: Path,
    database_url: str | None,
    find_max: bool = False,
    settings_env: dict[str, str] | None = None,
    client_processes: int = 1,
    pacing: str = "spread",
    max_p99_ms: float | None = None,
) -> list[RealtimeResult]:
    """Mercato (with `find_max`: its ramp, then half its maximum), then the bare relay at the rate
    Mercato's last phase ran at, so the per-core comparison is at one offered rate."""
    raise_fd_limit()  # 5,000 connections are 5,000 descriptors in this process and in the server
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
            **(settings_env or {}),
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
        plan = ClientPlan(ws_url, tokens, room_ids, connections, client_processes, pacing)
        results += _measure(
            ours,
            name="mercato",
            plan=plan,
            rate=rate,
            seconds=seconds,
            find_max=find_max,
            max_p99_ms=max_p99_ms,
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
        plan = ClientPlan(
            f"ws://127.0.0.1:{port}/",
            None,
            [f"r{r}" for r in range(rooms)],
            connections,
            client_processes,
            pacing,
        )
        results += _measure(
            bare,
            name="bare websockets",
            plan=plan,
            rate=results[-1].offered_rate if find_max else rate,
            seconds=seconds,
        )
    finally:
        bare.stop()
    return results


def _migrate(url: str) -> None:
    from mercato.migrations import SCRIPT_LOCATION

    upgrade(SCRIPT_LOCATION, url)


# -- report ----------------------------------------------------------------------------------------


def realtime_table(results: list[RealtimeResult], idle: IdleResult | None, *, title: str) -> list[Any]:
    from rich.table import Table

    tables: list[Any] = []
    if results:
        table = Table(title=title)
        for column in (
            "server",
            "msgs/s sent",
            "sent",
            "deliveries",
            "deliveries/s",
            "p50 ms",
            "p99 ms",
            "CPU ms/1000 deliveries",
            "idle CPU ms/s",
            "marginal µs/delivery",
            "deliveries per core-s",
            "KiB/idle conn",
        ):
            table.add_column(column, justify="left" if column == "server" else "right")
        for r in results:
            per_core = r.deliveries_per_cpu_s
            table.add_row(
                r.server,
                f"{r.offered_rate:g}",
                f"{r.sent:,}",
                f"{r.deliveries:,}",
                f"{r.deliveries_per_s:,.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                "-" if r.cpu_ms_per_1000 is None else f"{r.cpu_ms_per_1000:.0f}",
                "-" if r.idle_cpu_ms_per_s is None else f"{r.idle_cpu_ms_per_s:.1f}",
                "-" if r.marginal_us_per_delivery is None else f"{r.marginal_us_per_delivery:.0f}",
                "-" if per_core is None else f"{per_core:,.0f}",
                "-" if r.rss_kib_per_idle_connection is None else f"{r.rss_kib_per_idle_connection:.1f}",
            )
        tables.append(table)
    if idle is not None:
        table = Table(title=f"{idle.connections:,} idle authenticated connections on one process")
        for column in ("opened", "alive after hold", "hold s", "server RSS MiB", "KiB/conn", "server fds"):
            table.add_column(column, justify="right")
        table.add_row(
            f"{idle.opened:,}",
            f"{idle.alive_after_hold:,}",
            f"{idle.hold_s:g}",
            f"{idle.server_rss_before_kib / 1024:.0f} -> {idle.server_rss_after_kib / 1024:.0f}",
            f"{idle.kib_per_connection:.1f}",
            f"{idle.server_open_fds:,}",
        )
        tables.append(table)
    return tables


def realtime_verdict(
    results: list[RealtimeResult], idle: IdleResult | None, *, max_p99_ms: float | None = None
) -> list[str]:
    lines: list[str] = []
    by = {r.server: r for r in results}
    ours, bare = by.get("mercato"), by.get("bare websockets")
    if ours and bare and ours.deliveries_per_cpu_s and bare.deliveries_per_cpu_s:
        ratio = ours.deliveries_per_cpu_s / bare.deliveries_per_cpu_s
        lines.append(
            f"deliveries per core-second: Mercato {ours.deliveries_per_cpu_s:,.0f}, bare "
            f"{bare.deliveries_per_cpu_s:,.0f} = {ratio:.0%} (goal >= 50 %): "
            f"{'met' if ratio >= 0.5 else 'not met'}"
        )
        if ours.marginal_us_per_delivery is not None and bare.marginal_us_per_delivery is not None:
            lines.append(
                "marginal CPU per delivery (idle CPU taken out): "
                f"Mercato {ours.marginal_us_per_delivery:.0f} µs "
                f"(idle {ours.idle_cpu_ms_per_s:.1f} ms/s), bare {bare.marginal_us_per_delivery:.0f} µs "
                f"(idle {bare.idle_cpu_ms_per_s:.1f} ms/s)"
            )
        lines.append(
            f"fan-out latency p50/p99: Mercato {ours.p50_ms:.0f}/{ours.p99_ms:.0f} ms, bare "
            f"{bare.p50_ms:.0f}/{bare.p99_ms:.0f} ms at {ours.offered_rate:g} msgs/s sent"
        )
        ramp = [r for r in results if r.server == "mercato ramp"]
        if ramp:
            kept = [r.offered_rate for r in ramp if r.kept_up]
            # Every step kept up: the ramp ran out of steps below the maximum, which is only a floor.
            found = (
                f"~{max(kept):g} msgs/s"
                if not ramp[-1].kept_up and kept
                else f"not reached (>= {max(kept):g} msgs/s kept up)"
                if kept
                else f"below the first step's {ramp[0].offered_rate:g} msgs/s"
            )
            criterion = (
                "98 % of deliveries within 2 s"
                if max_p99_ms is None
                else f"98 % within 2 s and p99 <= {max_p99_ms:g} ms"
            )
            lines.append(
                f"maximum rate found: {found} ({len(ramp)} ramp steps; a step kept up "
                f"when {criterion}); at half of it p99 {ours.p99_ms:.0f} ms "
                f"(goal < 50 ms: {'met' if ours.p99_ms < 50 else 'not met'})"
            )
    if ours and ours.rss_kib_per_idle_connection is not None:
        lines.append(f"idle connection ({ours.connections} open): {ours.rss_kib_per_idle_connection:.1f} KiB")
    if idle is not None:
        held = idle.alive_after_hold == idle.connections
        lines.append(
            f"{idle.connections:,} idle authenticated connections on one process: {idle.opened:,} opened, "
            f"{idle.alive_after_hold:,} alive after {idle.hold_s:g} s ({'held' if held else 'not held'}); "
            f"{idle.kib_per_connection:.1f} KiB each (goal <= 30 KiB: "
            f"{'met' if idle.kib_per_connection <= 30 else 'not met'})"
        )
    return lines
