"""Which errors mean "a dependency is down" rather than "our code is wrong": one classifier for the edge.

A driver reports an outage in many shapes. Measured on asyncpg 0.30 + SQLAlchemy 2 (ADR 0026):

- server stopped or killed: a bare `ConnectionRefusedError` from the connect call (not wrapped);
- a pooled connection whose server went away: `sqlalchemy.exc.InterfaceError` ("the underlying connection
  is closed") or `DBAPIError` over `asyncpg.ConnectionDoesNotExistError`, itself over `AdminShutdownError`
  when a fast shutdown terminated the session mid-statement;
- pool exhausted: `sqlalchemy.exc.TimeoutError` after `pool_timeout`;
- `statement_timeout`: `DBAPIError` over `asyncpg.QueryCanceledError` (SQLSTATE 57014);
- failover: `ReadOnlySQLTransactionError` (25006) on a demoted primary, `CannotConnectNowError` (57P03,
  "the database system is starting up / shutting down"), admin or crash shutdown (57P01, 57P02);
- SQLite: `sqlite3.OperationalError("database is locked")` once the busy timeout has run out.

`classify_outage(exc)` walks the exception's cause chain and answers an `Outage` (which dependency, why,
how long to wait, whether a write's outcome is unknown) or None for everything else: a constraint
violation or a bug must still surface as what it is. The gateway maps an `Outage` to
`503 /problems/dependency-unavailable` with `Retry-After`.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType

import sqlalchemy.exc

from mercato.kit.storage.reachability import DatabaseUnreachable

__all__ = ["OUTAGE_ERROR_TYPES", "Outage", "classify_outage"]

DATABASE = "database"
REDIS = "redis"
BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Outage:
    """A dependency that could not serve the request.

    `reason` is a stable slug safe to show a client (never a host or a driver message).
    `outcome_unknown`: the connection broke while a statement or COMMIT was in flight, so a write may
    or may not have committed; the client must retry with the same Idempotency-Key, not a new one.
    """

    dependency: str
    reason: str
    retry_after_s: float
    outcome_unknown: bool = False


# SQLSTATE -> (reason, retry after, outcome unknown). Class 08 (connection exception) is matched by prefix.
_SQLSTATES: dict[str, tuple[str, float, bool]] = {
    "57014": ("statement-timeout", 1.0, False),  # query_canceled: the statement was rolled back
    "57P01": ("shutting-down", 2.0, True),  # admin_shutdown: the session was terminated
    "57P02": ("shutting-down", 2.0, True),  # crash_shutdown
    "57P05": ("connection-lost", 2.0, True),  # idle_session_timeout
    "25006": ("failover", 2.0, False),  # read_only_sql_transaction: a demoted primary or a standby
    "53300": ("too-many-connections", 1.0, False),
    "53100": ("disk-full", 5.0, False),
    "53200": ("out-of-memory", 2.0, False),
    "55P03": ("lock-timeout", 1.0, False),  # lock_not_available (lock_timeout)
    "58030": ("io-error", 2.0, False),
}

_SQLITE_MESSAGES: tuple[tuple[str, str, float], ...] = (
    ("database is locked", "locked", 1.0),
    ("database table is locked", "locked", 1.0),
    ("unable to open database file", "unavailable", 2.0),
    ("disk i/o error", "io-error", 2.0),
    ("database or disk is full", "disk-full", 5.0),
)

# Modules whose frames mark a bare OSError as the database's (the connect call raises it unwrapped).
_DB_DRIVER_MODULES = ("asyncpg", "sqlalchemy", "aiosqlite")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        orig = getattr(current, "orig", None)  # SQLAlchemy's DBAPIError wraps the driver's error
        if isinstance(orig, BaseException) and id(orig) not in seen:
            yield from _chain(orig)
        current = current.__cause__ or current.__context__


def _module_of(exc: BaseException) -> str:
    return type(exc).__module__ or ""


# The event loop raises the connect errors from its socket callbacks: asyncio's (standard library) or
# uvloop's (`mercato api` under uvicorn and `mercato worker` run on uvloop). Its frames are skipped.
_EVENT_LOOP_MODULES = frozenset({*sys.stdlib_module_names, "uvloop"})


def _raised_by_driver(tb: TracebackType | None) -> bool:
    """Whether the innermost frame outside the event loop (the standard library's asyncio or uvloop)
    belongs to a database driver. Only the raise point counts: an error of our own code that merely
    propagated out through a `Database.read()` block also passed SQLAlchemy's frames."""
    frames = []
    while tb is not None:
        frames.append(str(tb.tb_frame.f_globals.get("__name__", "")))
        tb = tb.tb_next
    for name in reversed(frames):
        if name.partition(".")[0] in _EVENT_LOOP_MODULES:
            continue
        return name.startswith(_DB_DRIVER_MODULES)
    return False


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) and len(state) == 5 else None


def _database(exc: BaseException) -> Outage | None:
    """One link of the chain, seen as a database error."""
    state = _sqlstate(exc) if _module_of(exc).startswith(("asyncpg", "sqlalchemy")) else None
    if state is not None:
        if state == "57P03":  # cannot_connect_now: "the database system is starting up / shutting down"
            reason = "shutting-down" if "shutting down" in str(exc) else "starting-up"
            return Outage(DATABASE, reason, 2.0, False)
        if state in _SQLSTATES:
            reason, retry_s, unknown = _SQLSTATES[state]
            return Outage(DATABASE, reason, retry_s, unknown)
        if state.startswith("08"):  # connection_exception, connection_failure, ...
            return Outage(DATABASE, "connection-lost", 2.0, True)
        return None
    module = _module_of(exc)
    if module.startswith("asyncpg"):
        name = type(exc).__name__
        if name == "ConnectionDoesNotExistError":
            return Outage(DATABASE, "connection-lost", 2.0, True)
        if name in ("InterfaceError", "InternalClientError") and "closed" in str(exc):
            # "the underlying connection is closed": a pooled connection outlived its server; nothing
            # was sent on it, so nothing committed.
            return Outage(DATABASE, "connection-lost", 2.0, False)
        if name == "InternalClientError" and "another operation (2)" in str(exc):
            # State 2 is asyncpg's ERROR_CONSUME: the server's FATAL (a shutdown) arrived on an idle
            # pooled connection before its close did; the statement was refused before it was sent.
            return Outage(DATABASE, "connection-lost", 2.0, False)
        if name == "TargetServerAttributeNotMatched":
            # A multi-host URL with `target_session_attrs=read-write` while no node is writable yet:
            # a failover in progress.
            return Outage(DATABASE, "failover", 2.0, False)
        if name == "TooManyConnectionsError":
            return Outage(DATABASE, "too-many-connections", 1.0, False)
    if isinstance(exc, sqlite3.OperationalError):
        message = str(exc).lower()
        for fragment, reason, retry_s in _SQLITE_MESSAGES:
            if fragment in message:
                return Outage(DATABASE, reason, retry_s, False)
    return None


_REDIS_OUTAGES = frozenset(
    {"ConnectionError", "TimeoutError", "BusyLoadingError", "ReadOnlyError", "MaxConnectionsError"}
)
_NATS_OUTAGES = frozenset(
    {"NoServersError", "ConnectionClosedError", "TimeoutError", "StaleConnectionError", "NoRespondersError"}
)


def _redis_or_broker(exc: BaseException) -> Outage | None:
    module = _module_of(exc)
    name = type(exc).__name__
    if module.startswith("redis") and name in _REDIS_OUTAGES:
        return Outage(REDIS, "unavailable", 1.0, name == "TimeoutError")
    if module.startswith("nats") and name in _NATS_OUTAGES:
        return Outage(BROKER, "unavailable", 2.0, name == "TimeoutError")
    return None


def classify_outage(exc: BaseException) -> Outage | None:
    """The outage `exc` reports, or None when it is not a dependency being down.

    Walks the cause/context chain (and SQLAlchemy's `.orig`), so a wrapped driver error is found under
    its wrappers. A bare `OSError` (refused, reset, unreachable, a connect timeout) counts as the
    database's when a database driver raised it (the innermost frame outside the event loop).
    """
    for link in _chain(exc):
        if isinstance(link, DatabaseUnreachable):  # the probes say so: nothing was tried
            return Outage(DATABASE, "unreachable", 2.0, False)
        found = _database(link) or _redis_or_broker(link)
        if found is not None:
            return found
    if isinstance(exc, sqlalchemy.exc.TimeoutError):
        return Outage(DATABASE, "pool-timeout", 1.0, False)
    for link in _chain(exc):
        if isinstance(link, OSError) and _raised_by_driver(link.__traceback__):
            if isinstance(link, ConnectionRefusedError):
                return Outage(DATABASE, "connection-refused", 2.0, False)
            if isinstance(link, TimeoutError):
                return Outage(DATABASE, "connect-timeout", 2.0, False)
            # Reset or broken pipe mid-operation: whatever was in flight may have committed.
            return Outage(
                DATABASE, "connection-lost", 2.0, isinstance(link, ConnectionResetError | BrokenPipeError)
            )
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and exc.connection_invalidated:
        return Outage(DATABASE, "connection-lost", 2.0, True)
    return None


# The exception types the gateway installs a handler for; the handler asks `classify_outage` and lets
# anything it does not recognise through as the 500 it is.
OUTAGE_ERROR_TYPES: tuple[type[BaseException], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,
    sqlite3.Error,
    OSError,
)
