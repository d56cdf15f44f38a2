"""A small key/value table for platform facts such as "seed completed at"."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Column, String, Table, select
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage.types import UTCDateTime, metadata

platform_meta = Table(
    "platform_meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", String(1000), nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
)


async def get_meta(conn: AsyncConnection, key: str) -> str | None:
    row = (await conn.execute(select(platform_meta.c.value).where(platform_meta.c.key == key))).first()
    return str(row[0]) if row else None


async def set_meta(conn: AsyncConnection, key: str, value: str, *, now: datetime) -> None:
    updated = await conn.execute(
        platform_meta.update().where(platform_meta.c.key == key).values(value=value, updated_at=now)
    )
    if updated.rowcount == 0:
        await conn.execute(platform_meta.insert().values(key=key, value=value, updated_at=now))
