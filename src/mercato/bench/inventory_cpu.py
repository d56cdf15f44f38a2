"""PostgreSQL's own CPU, and this process's, per reservation and commit of the order saga's two
inventory steps: the server side of a checkout that a process's CPU time never shows.

`python src/mercato/bench/inventory_cpu.py DATABASE N LINES` (PostgreSQL at 127.0.0.1:5432, user
postgres): creates DATABASE anew and migrates it, stocks 200 SKUs, then runs N times what the saga's
local steps run, each in its own write transaction as the runner does: `InventoryService.reserve`
of LINES lines, then `commit_reference` (100 more first, not measured). It prints the CPU time
(user + system, from /proc) of the PostgreSQL backends serving DATABASE over the N, and this
process's, per reserve + commit. Both are CPU time, not wall time, so they hold
better than timings on a shared machine. It imports only long-standing APIs, so an older `src/` can
be measured with this file through `PYTHONPATH` (docs/benchmarks.md, "Session 11: h-saga3").
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Iterable

import asyncpg

from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.config import AuthSettings, DatabaseSettings, Environment, Settings
from mercato.kit.storage.migrations import upgrade

_ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
_SKUS = [f"INV-{i:04d}" for i in range(200)]
_WARM_UP = 100


def _backend_cpu_s(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes (fields 14 and 15 of /proc/<pid>/stat)."""
    ticks = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a backend that ended
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


async def _backends(admin: asyncpg.Connection, database: str) -> set[int]:
    rows = await admin.fetch("SELECT pid FROM pg_stat_activity WHERE datname = $1", database)
    return {int(row[0]) for row in rows}


async def main(database: str, count: int, lines: int) -> None:
    admin = await asyncpg.connect(_ADMIN_DSN)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{database}"')
        await admin.execute(f'CREATE DATABASE "{database}"')
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{database}"
        await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url)
        settings = Settings(
            env=Environment.TEST,
            database=DatabaseSettings(url=url, pool_size=4, max_overflow=0, probe_interval_s=0),
            auth=AuthSettings(secret="x" * 40, argon2_time_cost=1, argon2_memory_kib=8192),  # type: ignore[arg-type]
        )
        container = build_container(settings)
        inventory = container.inventory
        await inventory.set_available_many([(sku, 10_000_000) for sku in _SKUS])

        async def reserve_and_commit(n: int) -> None:
            picked = [(_SKUS[(n * 7 + k * 13) % len(_SKUS)], 1 + k) for k in range(lines)]
            async with container.db.write() as conn:
                await inventory.reserve(f"ref-{n}", picked, conn=conn)
            async with container.db.write() as conn:
                await inventory.commit_reference(f"ref-{n}", conn=conn)

        for n in range(_WARM_UP):
            await reserve_and_commit(-1 - n)
        before = await _backends(admin, database)
        server0, client0, wall0 = _backend_cpu_s(before), time.process_time(), time.perf_counter()
        for n in range(count):
            await reserve_and_commit(n)
        after = await _backends(admin, database)
        server1, client1, wall1 = _backend_cpu_s(before | after), time.process_time(), time.perf_counter()
        await container.close()
        print(
            f"{database}: {lines} line(s), {count} reserve+commit: PostgreSQL backends "
            f"{1000 * (server1 - server0) / count:.3f} ms CPU each, this process "
            f"{1000 * (client1 - client0) / count:.3f} ms CPU, wall {1000 * (wall1 - wall0) / count:.3f} ms; "
            f"backends opened meanwhile {len(after - before)}; load {os.getloadavg()[0]:.1f}"
        )
    finally:
        await admin.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
