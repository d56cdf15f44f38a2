"""Telling saga runners in other processes that a new saga is waiting, instead of making them poll.

A runner in the process that starts a saga is woken directly (`SagaRunner.wake`). A runner in another
process (`mercato worker` beside `mercato api`) would otherwise find the saga only at its next poll,
on average half a poll interval later. On PostgreSQL, `SagaStore.start` sends a `NOTIFY` inside the
starting transaction (delivered at commit, and only if it commits) and each runner keeps one
connection `LISTEN`ing, which wakes it at once. The poll stays: it finds the sagas whose retry
became due and covers a listener that is reconnecting.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

from sqlalchemy import Select, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.dml import Insert

from mercato.kit.observability import get_logger
from mercato.kit.storage import Database

__all__ = ["PostgresSagaWakeups", "SagaWakeups"]

_log = get_logger("mercato.sagas")


class SagaWakeups(Protocol):
    """A channel from whoever starts sagas to the runners that drive them."""

    async def notify(self, conn: AsyncConnection) -> None:
        """Announce new work, inside the caller's transaction (nothing is announced on rollback)."""
        ...

    def announcing(self, insert: Insert) -> ClauseElement | None:
        """`insert` and this channel's announcement as one statement (built once, by the store),
        or None when the announcement cannot ride in it (then `notify` is called after it)."""
        ...

    def announcement(self) -> Select[Any] | None:
        """A SELECT whose columns announce when a statement carrying them commits (its data-modifying
        CTEs are the statement's writes), or None when the announcement cannot ride in a statement."""
        ...

    async def listen(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        """Call `wake()` on each announcement until `stop` is set; survives lost connections."""
        ...


class PostgresSagaWakeups:
    """`NOTIFY`/`LISTEN` on one channel; the listener holds one pooled connection while it runs."""

    def __init__(self, db: Database, *, channel: str = "mercato_saga_due", retry_s: float = 1.0) -> None:
        if not channel.replace("_", "").isalnum():
            raise ValueError("channel: letters, digits and underscores only")
        self._db = db
        self.channel = channel
        self._retry_s = retry_s
        self._notify = select(func.pg_notify(literal(channel), literal("")))

    async def notify(self, conn: AsyncConnection) -> None:
        await conn.execute(self._notify)

    def announcing(self, insert: Insert) -> ClauseElement | None:
        # `SELECT pg_notify(...)` with the insert as a data-modifying CTE: PostgreSQL runs it
        # whether or not the query reads it, and delivers the NOTIFY at commit, only if it commits.
        return self._notify.add_cte(insert.cte("new_saga"))

    def announcement(self) -> Select[Any]:
        return self._notify

    async def listen(self, wake: Callable[[], None], stop: asyncio.Event) -> None:
        def on_notification(*_args: Any) -> None:
            wake()

        while not stop.is_set():
            try:
                async with self._db.engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    driver: Any = raw.driver_connection  # an asyncpg connection
                    lost = asyncio.Event()
                    await driver.add_listener(self.channel, on_notification)
                    driver.add_termination_listener(_setter(lost))
                    # Anything started while no one listened was missed: look now.
                    wake()
                    try:
                        await _first_of(stop, lost)
                    finally:
                        if not driver.is_closed():
                            await driver.remove_listener(self.channel, on_notification)
                        await conn.rollback()
            except Exception:  # noqa: BLE001 - the poll covers the gap; the listener reconnects
                _log.warning("saga_listener_lost", channel=self.channel, exc_info=True)
            if not stop.is_set():
                await _first_of(stop, timeout_s=self._retry_s)


def _setter(event: asyncio.Event) -> Callable[..., None]:
    def set_event(*_args: Any) -> None:
        event.set()

    return set_event


async def _first_of(*events: asyncio.Event, timeout_s: float | None = None) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
