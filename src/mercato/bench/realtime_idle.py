"""`mercato bench realtime --idle N`: N idle authenticated WebSocket connections held by one Mercato
process, opened by several client processes; the server's RSS per connection (goal <= 30 KiB)."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from mercato.bench.accounts import issue_tokens
from mercato.bench.servers import ServerProcess, start_mercato

__all__ = ["IdleResult", "measure_idle", "raise_fd_limit", "run_idle_bench"]


@dataclass(frozen=True)
class IdleResult:
    connections: int
    client_processes: int
    opened: int
    alive_after_hold: int
    hold_s: float
    server_rss_before_kib: int
    server_rss_after_kib: int
    kib_per_connection: float
    server_open_fds: int


def raise_fd_limit() -> int:
    """Raise this process's open-file limit to its hard limit (the servers started after inherit it)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _idle_client(ws_url: str, tokens: list[str], count: int, report: Any, release: Any) -> None:
    """One client process: open `count` authenticated connections, report, hold until released,
    report how many are still open, close."""
    from websockets.protocol import State

    raise_fd_limit()

    async def main() -> None:
        conns: list[ClientConnection] = []
        failed = 0

        async def open_one(index: int) -> None:
            nonlocal failed
            try:
                ws = await connect(
                    ws_url,
                    additional_headers={"Authorization": f"Bearer {tokens[index % len(tokens)]}"},
                    open_timeout=60,
                    ping_interval=None,
                    compression=None,
                )
                await asyncio.wait_for(ws.recv(), 60)  # ready: authenticated
                conns.append(ws)
            except Exception:  # noqa: BLE001 - counted, the bench reports how many opened
                failed += 1

        for start in range(0, count, 100):
            await asyncio.gather(*(open_one(i) for i in range(start, min(start + 100, count))))
        report.put(("opened", len(conns), failed))
        await asyncio.to_thread(release.wait)
        report.put(("alive", sum(ws.state is State.OPEN for ws in conns), 0))
        await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

    asyncio.run(main())


def measure_idle(
    server: ServerProcess, *, ws_url: str, tokens: list[str], connections: int, processes: int, hold_s: float
) -> IdleResult:
    """`connections` idle authenticated WebSocket connections to one server process, opened by
    `processes` client processes: the server's RSS per connection, and whether it holds them all."""
    import multiprocessing

    from mercato.bench.realtime import _rss_kib

    ctx = multiprocessing.get_context("spawn")
    report = ctx.Queue()
    release = ctx.Event()
    share = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
    time.sleep(1.0)
    rss_before = _rss_kib(server.proc.pid)
    children = [
        ctx.Process(target=_idle_client, args=(ws_url, tokens, n, report, release), daemon=True)
        for n in share
        if n
    ]
    for child in children:
        child.start()
    opened = sum(report.get(timeout=600)[1] for _ in children)
    time.sleep(2.0)
    rss_after = _rss_kib(server.proc.pid)
    fds = len(list(Path(f"/proc/{server.proc.pid}/fd").iterdir()))
    time.sleep(max(0.0, hold_s - 2.0))
    release.set()
    alive = sum(report.get(timeout=120)[1] for _ in children)
    for child in children:
        child.join(timeout=60)
    return IdleResult(
        connections=connections,
        client_processes=len(children),
        opened=opened,
        alive_after_hold=alive,
        hold_s=hold_s,
        server_rss_before_kib=rss_before,
        server_rss_after_kib=rss_after,
        kib_per_connection=(rss_after - rss_before) / opened if opened else 0.0,
        server_open_fds=fds,
    )


def run_idle_bench(*, connections: int, processes: int, hold_s: float, workdir: Path) -> IdleResult:
    from mercato.bench.realtime import SECRET, _migrate

    raise_fd_limit()
    workdir.mkdir(parents=True, exist_ok=True)
    url = f"sqlite+aiosqlite:///{workdir}/idle.db"
    _migrate(url)
    # 100 accounts, each holding many connections: every connection is authenticated all the same.
    tokens = issue_tokens(url, SECRET, [(str(uuid.uuid4()), "customer") for _ in range(100)])
    server = start_mercato(
        database_url=url,
        workdir=workdir,
        workers=1,
        name="mercato-idle",
        settings_env={"MERCATO_AUTH_SECRET": SECRET, "MERCATO_BACKPRESSURE_ENABLED": "false"},
    )
    try:
        ws_url = server.base_url.replace("http://", "ws://") + "/v1/ws"
        return measure_idle(
            server, ws_url=ws_url, tokens=tokens, connections=connections, processes=processes, hold_s=hold_s
        )
    finally:
        server.stop()
