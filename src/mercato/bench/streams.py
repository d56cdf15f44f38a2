"""``mercato bench streams``: publish+consume throughput through the `Stream` port vs the raw client.

Same work on both sides, same run, same server: publish `messages` CloudEvents in batches of
`batch`, then one consumer reads batches of `batch` and acknowledges each message individually.
Raw Redis: a pipelined `XADD` per batch, `XREADGROUP` + `XACK`. Raw NATS: `publish_async` + PubAcks,
a pull `fetch` + confirmed acks (`ack_sync`, as the adapter confirms its acks). One partition, so
the raw side has the same shape (a partitioned topic multiplies the adapter's read round trips).
Everything is created under a unique prefix and deleted afterwards (the servers are shared).
SQL log: `SqlLogStream` on a fresh migrated database (a temp SQLite file, or a PostgreSQL database
made and dropped by the run) vs the raw driver (aiosqlite / asyncpg) doing the same on a plain log
table: a batched INSERT per publish batch, a SELECT of the next unacked batch, one committed UPDATE
per acknowledgement.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import asyncpg
import nats
from redis.asyncio import Redis

from mercato.kit.ids import new_id
from mercato.kit.messaging import JetStreamStream, Message, RedisStream, SqlLogStream, Stream
from mercato.kit.storage import create_database
from mercato.kit.storage.migrations import upgrade
from mercato.migrations import SCRIPT_LOCATION

__all__ = ["StreamBenchResult", "run_streams_bench"]

TOPIC = "bench.events"


@dataclass(frozen=True, slots=True)
class StreamBenchResult:
    backend: str
    ours_per_s: float
    raw_per_s: float | None

    @property
    def ratio(self) -> float | None:
        return None if not self.raw_per_s else self.ours_per_s / self.raw_per_s


def _messages(count: int) -> list[Message]:
    now = datetime.now(UTC)
    return [
        Message(
            id=new_id(),
            source="/bench",
            type="mercato.bench.tick",
            subject=f"k{n % 64}",
            time=now,
            data={"n": n},
            topic=TOPIC,
        )
        for n in range(count)
    ]


async def _through_port(stream: Stream, messages: list[Message], *, batch_size: int) -> float:
    started = time.perf_counter()
    for start in range(0, len(messages), batch_size):
        await stream.publish(messages[start : start + batch_size])
    seen = 0
    while seen < len(messages):
        deliveries = await stream.read(TOPIC, "bench", "c1", max_messages=batch_size, block_s=1.0)
        if not deliveries:
            raise RuntimeError(f"stream stalled after {seen} of {len(messages)} messages")
        for delivery in deliveries:
            await stream.ack(delivery)
        seen += len(deliveries)
    return len(messages) / (time.perf_counter() - started)


async def _redis(url: str, messages: list[Message], *, batch_size: int) -> StreamBenchResult:
    client = Redis.from_url(url)
    prefix = f"bench:{uuid.uuid4().hex}"
    stream = RedisStream(client, prefix=prefix, partitions=1)
    try:
        ours = await _through_port(stream, messages, batch_size=batch_size)
        key = f"{prefix}:raw"
        payloads = [m.to_json() for m in messages]
        started = time.perf_counter()
        for start in range(0, len(payloads), batch_size):
            async with client.pipeline(transaction=False) as pipe:
                chunk = range(start, min(start + batch_size, len(payloads)))
                for m, payload in ((messages[i], payloads[i]) for i in chunk):
                    pipe.xadd(key, {"id": str(m.id), "env": payload})
                await pipe.execute()
        await client.xgroup_create(key, "bench", id="0")
        seen = 0
        while seen < len(payloads):
            # redis-py types the reply loosely: [[stream, [(entry id, {field: value})]]].
            got: Any = await client.xreadgroup("bench", "c1", {key: ">"}, count=batch_size)
            for _, entries in got:
                for entry_id, fields in entries:
                    Message.from_json(fields[b"env"])
                    await client.xack(key, "bench", entry_id)
                    seen += 1
        raw = len(payloads) / (time.perf_counter() - started)
        return StreamBenchResult("redis", ours, raw)
    finally:
        await stream.delete_all()
        await client.aclose()


async def _nats(url: str, messages: list[Message], *, batch_size: int) -> StreamBenchResult:
    client = await nats.connect(url)
    prefix = f"bench{uuid.uuid4().hex[:12]}"
    stream = JetStreamStream(client=client, prefix=prefix, partitions=1)
    raw_stream = f"{prefix}_raw"
    js = client.jetstream()
    try:
        ours = await _through_port(stream, messages, batch_size=batch_size)
        await js.add_stream(name=raw_stream, subjects=[f"{prefix}.raw"])
        started = time.perf_counter()
        for start in range(0, len(messages), batch_size):
            acks = [
                await js.publish_async(
                    f"{prefix}.raw", m.to_json().encode(), headers={"Nats-Msg-Id": str(m.id)}
                )
                for m in messages[start : start + batch_size]
            ]
            for ack in acks:
                await ack
        sub = await js.pull_subscribe(f"{prefix}.raw", durable="bench", stream=raw_stream)
        seen = 0
        while seen < len(messages):
            for msg in await sub.fetch(batch_size, timeout=1.0):
                Message.from_json(msg.data)
                await msg.ack_sync()
                seen += 1
        raw = len(messages) / (time.perf_counter() - started)
        return StreamBenchResult("nats", ours, raw)
    finally:
        await stream.delete_all([TOPIC])
        await js.delete_stream(raw_stream)
        await client.drain()


_RAW_LOG_DDL = (
    "CREATE TABLE raw_log (id {serial} PRIMARY KEY, message_id TEXT NOT NULL UNIQUE, "
    "envelope TEXT NOT NULL, acked BOOLEAN NOT NULL DEFAULT FALSE)"
)


async def _sql_log_through_port(url: str, messages: list[Message], *, batch_size: int) -> float:
    # Alembic runs its own event loop: migrate from a worker thread, outside ours.
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, url)
    db = create_database(url)
    try:
        return await _through_port(SqlLogStream(db, partitions=1), messages, batch_size=batch_size)
    finally:
        await db.dispose()


async def _sqlite(messages: list[Message], *, batch_size: int) -> StreamBenchResult:
    with tempfile.TemporaryDirectory(prefix="mercato-bench-") as tmp:
        ours = await _sql_log_through_port(
            f"sqlite+aiosqlite:///{Path(tmp) / 'ours.db'}", messages, batch_size=batch_size
        )
        async with aiosqlite.connect(Path(tmp) / "raw.db") as conn:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA synchronous=NORMAL")
            await conn.execute(_RAW_LOG_DDL.format(serial="INTEGER"))
            await conn.commit()
            started = time.perf_counter()
            for start in range(0, len(messages), batch_size):
                chunk = messages[start : start + batch_size]
                await conn.executemany(
                    "INSERT INTO raw_log (message_id, envelope) VALUES (?, ?)",
                    [(str(m.id), m.to_json()) for m in chunk],
                )
                await conn.commit()
            seen = 0
            while seen < len(messages):
                async with conn.execute(
                    "SELECT id, envelope FROM raw_log WHERE NOT acked ORDER BY id LIMIT ?", (batch_size,)
                ) as cursor:
                    rows = list(await cursor.fetchall())
                for row_id, envelope in rows:
                    Message.from_json(envelope)
                    await conn.execute("UPDATE raw_log SET acked = TRUE WHERE id = ?", (row_id,))
                    await conn.commit()
                    seen += 1
            raw = len(messages) / (time.perf_counter() - started)
    return StreamBenchResult("sql-log (SQLite)", ours, raw)


async def _postgres(admin_dsn: str, messages: list[Message], *, batch_size: int) -> StreamBenchResult:
    name = f"mercato_bench_streams_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    host = admin_dsn.split("://", 1)[1].rsplit("/", 1)[0]
    try:
        ours = await _sql_log_through_port(
            f"postgresql+asyncpg://{host}/{name}", messages, batch_size=batch_size
        )
        conn = await asyncpg.connect(f"postgresql://{host}/{name}")
        try:
            await conn.execute(_RAW_LOG_DDL.format(serial="BIGSERIAL"))
            started = time.perf_counter()
            for start in range(0, len(messages), batch_size):
                chunk = messages[start : start + batch_size]
                await conn.executemany(
                    "INSERT INTO raw_log (message_id, envelope) VALUES ($1, $2)",
                    [(str(m.id), m.to_json()) for m in chunk],
                )
            seen = 0
            while seen < len(messages):
                rows = await conn.fetch(
                    "SELECT id, envelope FROM raw_log WHERE NOT acked ORDER BY id LIMIT $1", batch_size
                )
                for row in rows:
                    Message.from_json(row["envelope"])
                    await conn.execute("UPDATE raw_log SET acked = TRUE WHERE id = $1", row["id"])
                    seen += 1
            raw = len(messages) / (time.perf_counter() - started)
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(admin_dsn)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
    return StreamBenchResult("sql-log (PostgreSQL)", ours, raw)


async def run_streams_bench(
    *,
    backends: list[str],
    messages: int,
    batch_size: int,
    redis_url: str,
    nats_url: str,
    postgres_admin_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres",
) -> list[StreamBenchResult]:
    """Each backend once, ours first then raw, on the same generated messages."""
    payload = _messages(messages)
    results = []
    for backend in backends:
        if backend == "redis":
            results.append(await _redis(redis_url, payload, batch_size=batch_size))
        elif backend == "nats":
            results.append(await _nats(nats_url, payload, batch_size=batch_size))
        elif backend == "sqlite":
            results.append(await _sqlite(payload, batch_size=batch_size))
        elif backend == "postgresql":
            results.append(await _postgres(postgres_admin_dsn, payload, batch_size=batch_size))
        else:
            raise ValueError(f"unknown backend {backend!r} (redis, nats, sqlite, postgresql)")
    return results
