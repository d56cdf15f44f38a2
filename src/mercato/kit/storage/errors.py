"""Which storage exceptions mean "the database is unavailable right now", not "the request is wrong".

During a failover the primary disappears for seconds: its pooled connections break (SQLAlchemy
raises a DBAPIError with `connection_invalidated`), new connections are refused (a bare
`ConnectionRefusedError` from the driver's connect, which SQLAlchemy does not wrap), a server
shutting down or still starting answers `CannotConnectNow`, and while no node is writable a
multi-host connect with `target_session_attrs=read-write` finds no match. The edge turns each of
these into 503 + Retry-After (a retry reaches the new primary: the pool dropped the dead
connections); anything else stays an error. The driver's names live here, with the engines, so the
gateway never imports a driver.
"""

from __future__ import annotations

import asyncpg
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

__all__ = ["UNAVAILABLE_ERRORS", "database_unavailable"]

# Exception types an edge handler registers for; `database_unavailable` decides per instance.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    DBAPIError,
    ConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)

_DRIVER_NAMES = frozenset(
    {
        "CannotConnectNowError",
        "ReadOnlySQLTransactionError",
        "AdminShutdownError",
        "CrashShutdownError",
        "ConnectionDoesNotExistError",
        "ConnectionFailureError",
        "ConnectionRejectionError",
        "TargetServerAttributeNotMatched",
    }
)


def database_unavailable(exc: BaseException) -> bool:
    """True for a lost, refused or not-yet-writable database; False for a genuine error."""
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated or isinstance(exc, OperationalError | InterfaceError):
            return True
        return exc.orig is not None and type(exc.orig).__name__ in _DRIVER_NAMES
    if isinstance(exc, ConnectionError | asyncpg.InterfaceError | asyncpg.PostgresConnectionError):
        return True
    return type(exc).__name__ in _DRIVER_NAMES
