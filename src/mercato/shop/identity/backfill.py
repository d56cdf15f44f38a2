"""The rename's backfill: copy `display_name` into `public_name` where it is still empty.

Batched (one short write transaction per `batch` rows, so it never holds the write lock long) and
resumable (it only ever looks at rows still missing a `public_name`, so a stopped run continues
where it was; a row written meanwhile by a dual-writing release is already done). Idempotent.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import bindparam, text

from mercato.kit.storage import Database

__all__ = ["backfill_public_names", "missing_public_names"]

_MISSING = text("SELECT count(*) FROM identity_users WHERE public_name IS NULL")
_NEXT = text("SELECT id FROM identity_users WHERE public_name IS NULL ORDER BY id LIMIT :batch")
_COPY = text(
    "UPDATE identity_users SET public_name = display_name WHERE id IN :ids AND public_name IS NULL"
).bindparams(bindparam("ids", expanding=True))


async def missing_public_names(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(_MISSING)).scalar_one())


async def backfill_public_names(
    db: Database,
    *,
    batch: int = 500,
    max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Copy names in batches; returns how many rows this run filled. `on_batch(rows)` after each."""
    filled = batches = 0
    while max_batches is None or batches < max_batches:
        async with db.write() as conn:
            ids = [row.id for row in await conn.execute(_NEXT, {"batch": batch})]
            if not ids:
                break
            result = await conn.execute(_COPY, {"ids": ids})
        filled += result.rowcount
        batches += 1
        if on_batch is not None:
            on_batch(result.rowcount)
    return filled
