"""The commit guard: a check run just before COMMIT of every write transaction opened in its context.

Fencing tokens use it (kit/coordination/fencing.py): a singleton job's writes commit only while
its term is current. Kept apart from `database.py` so the SQLite write scope (sqlite_write_scope.py)
reads it without importing the `Database` it serves.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["COMMIT_GUARD", "CommitGuard", "guarded_writes"]

CommitGuard = Callable[[AsyncConnection], Awaitable[None]]
COMMIT_GUARD: ContextVar[CommitGuard | None] = ContextVar("mercato_commit_guard", default=None)


@contextmanager
def guarded_writes(guard: CommitGuard) -> Iterator[None]:
    """Run `guard(conn)` before the COMMIT of every write transaction opened in this context (this
    task and the tasks it starts); an exception from it rolls the transaction back. Autocommit
    writes become write transactions meanwhile, so nothing escapes the guard."""
    reset = COMMIT_GUARD.set(guard)
    try:
        yield
    finally:
        COMMIT_GUARD.reset(reset)
