"""The online shard move, driven and checked: writers keep writing chat messages from several
"processes" (each its own shard-map cache and pools) while a shard is added; afterwards every room's
history is read back and every shard counted (ADR 0043).

Used by `mercato lab rebalance` (figures) and by the integration test (asserts). PostgreSQL databases
are made on the given server under a unique prefix and dropped at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry
from sqlalchemy import func, select

from mercato.kit.clock import SystemClock
from mercato.kit.partitioning import Algorithm
from mercato.kit.storage import Database, create_database
from mercato.shop.chat.rebalance import ChatRebalancer, RebalanceReport
from mercato.shop.chat.shardmap import MAIN, ShardMap
from mercato.shop.chat.shards import ChatShardMetrics, ChatShards, ShardUnavailable
from mercato.shop.chat.tables import messages, shard_fences, shard_map

__all__ = ["OnlineMoveResult", "run_online_move", "scratch_databases"]


@asynccontextmanager
async def scratch_databases(admin_dsn: str, prefix: str, count: int) -> AsyncIterator[list[str]]:
    """`count` empty PostgreSQL databases (SQLAlchemy asyncpg URLs), dropped afterwards."""
    names = [f"{prefix}_{uuid.uuid4().hex[:8]}_{i}" for i in range(count)]
    host = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    conn = await asyncpg.connect(admin_dsn)
    try:
        for name in names:
            await conn.execute(f'CREATE DATABASE "{name}"')
        yield [f"postgresql+asyncpg://{host}/{name}" for name in names]
    finally:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def _add_shard_in_a_process(
    main_url: str, urls: list[str], new_url: str, refresh_s: float, algorithm: str
) -> RebalanceReport:
    """`mercato shards add` as the operator runs it: a process of its own, configured like the API."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(
        MERCATO_DATABASE_URL=main_url,
        MERCATO_CHAT_SHARD_URLS=",".join(urls),
        MERCATO_CHAT_SHARD_ALGORITHM=algorithm,
        MERCATO_CHAT_SHARD_MAP_REFRESH_S=str(refresh_s),
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mercato.cli.main",
        "shards",
        "add",
        new_url,
        "--json",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"mercato shards add failed ({proc.returncode}): {err.decode()[-2000:]}")
    return RebalanceReport(**json.loads(out))


@dataclass
class OnlineMoveResult:
    rooms: int
    processes: int
    shards_before: int
    sent: int
    stored: int
    lost: int
    duplicated: int
    rooms_out_of_order: int
    rooms_on_wrong_shard: int
    owner_changes: int
    report: RebalanceReport
    write_retries: int
    stale_map_retries: int
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    per_shard_after: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["report"] = self.report.as_dict()
        return out


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    ordered = sorted(values)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"n": len(ordered), "p50": statistics.median(ordered), "p99": p99, "max": ordered[-1]}


async def _main_schema(db: Database) -> None:
    async with db.write() as conn:
        await conn.run_sync(
            lambda sync: messages.metadata.create_all(sync, tables=[messages, shard_fences, shard_map])
        )


async def run_online_move(
    main_url: str,
    shard_urls: list[str],
    new_url: str,
    *,
    rooms: int = 60,
    processes: int = 2,
    rate_per_room_hz: float = 4.0,
    warmup_s: float = 1.0,
    cooldown_s: float = 0.5,
    refresh_s: float = 0.2,
    algorithm: Algorithm = "ring",
) -> OnlineMoveResult:
    """Write to `rooms` rooms from `processes` map caches, add `new_url` as a shard meanwhile, then
    count: every acknowledged message stored once, in order, on its room's owner."""
    clock = SystemClock()
    main = create_database(main_url, pool_size=10)
    await _main_schema(main)
    extra: list[Database] = []

    def connect(url: str) -> Database:
        db = create_database(url, pool_size=10, max_overflow=10)
        extra.append(db)
        return db

    initial = ShardMap.initial([MAIN, *shard_urls], algorithm=algorithm)
    registries = [CollectorRegistry() for _ in range(processes)]
    metrics = [ChatShardMetrics(r) for r in registries]
    caches = [
        ChatShards(main, clock, initial=initial, refresh_s=refresh_s, connect=connect, metrics=m)
        for m in metrics
    ]
    # The operator's `mercato shards add` is a process of its own: its own pools.
    operator_main = create_database(main_url, pool_size=4)
    operator_dbs: list[Database] = []

    def operator_connect(url: str) -> Database:
        db = create_database(url, pool_size=4)
        operator_dbs.append(db)
        return db

    operator = ChatShards(
        operator_main, clock, initial=initial, refresh_s=refresh_s, connect=operator_connect
    )
    rebalancer = ChatRebalancer(operator)
    for i in range(1, len(shard_urls) + 1):
        await rebalancer.ensure_schema(operator.db(f"s{i}", initial))

    room_ids = [uuid.uuid4() for _ in range(rooms)]
    sent: dict[uuid.UUID, list[str]] = {r: [] for r in room_ids}
    samples: list[tuple[float, float]] = []  # (start, latency s)
    retries = 0
    stop = asyncio.Event()

    async def writer(index: int, room: uuid.UUID) -> None:
        nonlocal retries
        cache = caches[index % processes]
        k = 0
        period = 1.0 / rate_per_room_hz
        await asyncio.sleep(period * (index / rooms))
        while not stop.is_set():
            cmid = f"{room}-{k}"
            started = time.monotonic()
            while True:  # a failed write is retried with the same id, as the stream redelivers it
                try:
                    await cache.persist(room, sender=f"user{index}", text_=f"message {k}", client_msg_id=cmid)
                    break
                except ShardUnavailable:
                    retries += 1
                    await asyncio.sleep(0.05)
            samples.append((started, time.monotonic() - started))
            sent[room].append(cmid)
            k += 1
            await asyncio.sleep(max(0.0, period - (time.monotonic() - started)))

    tasks = [asyncio.create_task(writer(i, r)) for i, r in enumerate(room_ids)]
    try:
        await asyncio.sleep(warmup_s)
        before = initial.directory()
        move_started = time.monotonic()
        report = await _add_shard_in_a_process(main_url, [MAIN, *shard_urls], new_url, refresh_s, algorithm)
        move_ended = time.monotonic()
        await asyncio.sleep(cooldown_s)
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    final = await operator.current(force=True)
    after = final.directory()
    owner_changes = sum(1 for r in room_ids if before.owner(str(r)) != after.owner(str(r)))

    stored = lost = duplicated = out_of_order = wrong_shard = 0
    per_shard: dict[str, int] = {}
    for name in final.names:
        async with operator.db(name, final).read() as conn:
            per_shard[name] = int(
                (await conn.execute(select(func.count()).select_from(messages))).scalar_one()
            )
    for room in room_ids:
        owner = after.owner(str(room))
        async with operator.db(owner, final).read() as conn:
            rows = list(
                await conn.execute(
                    select(messages.c.seq, messages.c.client_msg_id)
                    .where(messages.c.room_id == room)
                    .order_by(messages.c.seq)
                )
            )
        ids = [r.client_msg_id for r in rows]
        stored += len(ids)
        lost += len(set(sent[room]) - set(ids))
        duplicated += len(ids) - len(set(ids))
        if [r.seq for r in rows] != list(range(1, len(rows) + 1)) or ids != sent[room][: len(ids)]:
            out_of_order += 1
        for name in final.names:
            if name == owner:
                continue
            async with operator.db(name, final).read() as conn:
                n = (
                    await conn.execute(
                        select(func.count()).select_from(messages).where(messages.c.room_id == room)
                    )
                ).scalar_one()
            wrong_shard += 1 if n else 0

    # "during" is the rebalance itself (its own clock), not the operator process's start-up.
    moving_from = max(move_started, move_ended - report.duration_s)
    latency = {
        "before": _summary([s * 1000 for t, s in samples if t < moving_from]),
        "during": _summary([s * 1000 for t, s in samples if moving_from <= t < move_ended]),
        "after": _summary([s * 1000 for t, s in samples if t >= move_ended]),
    }
    result = OnlineMoveResult(
        rooms=rooms,
        processes=processes,
        shards_before=len(initial.names),
        sent=sum(len(v) for v in sent.values()),
        stored=stored,
        lost=lost,
        duplicated=duplicated,
        rooms_out_of_order=out_of_order,
        rooms_on_wrong_shard=wrong_shard,
        owner_changes=owner_changes,
        report=report,
        write_retries=retries,
        stale_map_retries=int(
            sum(r.get_sample_value("mercato_chat_shard_stale_map_retries_total") or 0 for r in registries)
        ),
        latency_ms=latency,
        per_shard_after=per_shard,
    )
    for cache in caches:
        await cache.close()
    for db in (*extra, *operator_dbs, operator_main):
        await db.dispose()
    await main.dispose()
    return result
