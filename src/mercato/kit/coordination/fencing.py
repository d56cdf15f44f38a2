"""Fencing tokens checked by the database, in the statement, in the writer's own transaction.

A leader that paused (a GC pause, SIGSTOP, a stalled VM) past its lease still believes it leads
when it wakes; only the resource can tell. Every term of an election carries a token that grows
from term to term (an etcd revision, or a database lease's counter). The resource keeps, per
fenced resource name, the newest token it has seen, and a write transaction of a leader ends with

    UPDATE coordination_fencing_tokens SET token = :t WHERE resource = :r AND token <= :t

before its COMMIT. One row updated: the term is current, the row stays locked until COMMIT, so a
newer leader's claim (the same statement with a larger token) is ordered after it. No row: a newer
term has written, `FencedOut` is raised and the whole transaction rolls back: nothing the stale
leader wrote in it is applied (Kleppmann, DDIA ch. 8, "fencing tokens").

The check runs at the end of the transaction, not the start, so the row lock is held for the
COMMIT only: a leader paused in the middle of its work holds no lock that would stall its
successor's claim.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import BigInteger, Column, String, Table, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.storage import Database, guarded_writes, metadata

__all__ = ["FencedOut", "claim", "fence", "fenced_writes", "fencing_tokens_table", "newest_token"]

fencing_tokens_table = Table(
    "coordination_fencing_tokens",
    metadata,
    Column("resource", String(200), primary_key=True),
    Column("token", BigInteger, nullable=False),
)


class FencedOut(Exception):
    """A newer term has written to this resource: the stale holder's transaction is rolled back."""

    def __init__(self, resource: str, token: int) -> None:
        super().__init__(f"fencing token {token} for {resource!r} is older than the newest seen")
        self.resource = resource
        self.token = token


async def fence(conn: AsyncConnection, resource: str, token: int) -> None:
    """Record `token` as the newest for `resource` in `conn`'s transaction, or raise `FencedOut`
    when a larger one was recorded. The comparison is the statement's WHERE clause."""
    t = fencing_tokens_table
    result = await conn.execute(
        update(t).where(t.c.resource == resource, t.c.token <= token).values(token=token)
    )
    if result.rowcount == 1:
        return
    exists = (await conn.execute(select(t.c.token).where(t.c.resource == resource))).first()
    if exists is None:
        try:
            async with conn.begin_nested():  # a savepoint: losing the insert race keeps the txn
                await conn.execute(insert(t).values(resource=resource, token=token))
            return
        except IntegrityError:
            # Someone inserted first: compare against theirs, in the statement again.
            result = await conn.execute(
                update(t).where(t.c.resource == resource, t.c.token <= token).values(token=token)
            )
            if result.rowcount == 1:
                return
    raise FencedOut(resource, token)


async def claim(db: Database, resource: str, token: int) -> None:
    """A new term's first write: move the resource's token forward at once, so a stale leader is
    refused from now on even before the new leader's jobs write anything."""
    async with db.write() as conn:
        await fence(conn, resource, token)


async def newest_token(db: Database, resource: str) -> int | None:
    async with db.read() as conn:
        t = fencing_tokens_table
        row = (await conn.execute(select(t.c.token).where(t.c.resource == resource))).first()
    return None if row is None else int(row[0])


@contextmanager
def fenced_writes(resource: str, token: int) -> Iterator[None]:
    """Every write transaction opened in this context ends with `fence(conn, resource, token)`."""

    async def guard(conn: AsyncConnection) -> None:
        await fence(conn, resource, token)

    with guarded_writes(guard):
        yield
