"""Counting what a piece of work sends to the database, the way the checkout bench's probe does.

One statement per `before_cursor_execute` (BEGIN counted apart: SQLite's BEGIN IMMEDIATE is sent as a
statement, asyncpg's BEGIN is not, and on both it is the transaction's cost), one transaction per
commit or rollback of a connection that ran a statement, none for an autocommit connection (it sends
no BEGIN/COMMIT), plus what the SQL stream sends on the driver's connection (`add_driver_listener`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import Connection

from mercato.bootstrap import Container
from mercato.kit.messaging.sql_log import add_driver_listener
from mercato.kit.storage.statements_in_tx import DRIVER_STATEMENTS_IN_TX

_DIRTY = "_budget_statements_in_tx"


@dataclass
class Tally:
    statements: list[str] = field(default_factory=list)
    transactions: int = 0
    begins: int = 0
    # The statements and, where a transaction ended, "COMMIT" (or "ROLLBACK"): what ran in which.
    timeline: list[str] = field(default_factory=list)

    def report(self) -> str:
        head = f"{len(self.statements)} statements, {self.transactions} transactions ({self.begins} BEGIN)"
        return head + ":\n" + "\n".join(self.statements)


@contextmanager
def counting(container: Container) -> Iterator[Tally]:
    tally = Tally()
    engine = container.db.engine.sync_engine

    def statement(conn: Connection, _cursor: Any, sql: str, *_args: Any) -> None:
        conn.info[_DIRTY] = True
        if sql.lstrip().upper().startswith("BEGIN"):
            tally.begins += 1
        else:
            tally.statements.append(" ".join(sql.split())[:160])
            tally.timeline.append(tally.statements[-1])

    def end(conn: Connection) -> None:
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            conn.info.pop(_DIRTY, None)  # statements that committed alone: no BEGIN/COMMIT sent
            conn.info.pop(DRIVER_STATEMENTS_IN_TX, None)
            return
        # Statements sent on the driver path under the connection (`on_connection`) count too.
        if conn.info.pop(_DIRTY, False) | conn.info.pop(DRIVER_STATEMENTS_IN_TX, False):
            tally.transactions += 1
            tally.timeline.append("END")

    def driver(sql: str | None) -> None:
        if sql is None:
            tally.transactions += 1
            tally.timeline.append("END")
        else:
            tally.statements.append("driver: " + " ".join(sql.split())[:152])
            tally.timeline.append(tally.statements[-1])

    listeners = [("before_cursor_execute", statement), ("commit", end), ("rollback", end)]
    for name, fn in listeners:
        event.listen(engine, name, fn)
    remove_driver = add_driver_listener(driver)
    try:
        yield tally
    finally:
        remove_driver()
        for name, fn in listeners:
            event.remove(engine, name, fn)


def verbs(tally: Tally) -> list[str]:
    return [sql.split(None, 1)[0].upper() for sql in tally.statements]
