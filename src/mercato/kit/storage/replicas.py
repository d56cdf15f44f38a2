"""Read replicas: which one may serve a read, and read-your-writes by commit LSN (ADR 0032).

A read that may be stale names how stale (`Staleness`) and the `Database` routes it here; nobody
else asks "is this a replica?". A replica serves it only when

- it is in recovery (a node that was promoted, or a primary listed by mistake, is not a replica),
- its replay lag is within the replica set's bound (`max_lag_s`, `max_lag_bytes`): beyond it the
  replica leaves rotation until it catches up, and `/readyz` lists it with the reason,
- its lag is within the read's own `Staleness.max_lag_s`, and
- when the caller presented a consistency token (the commit LSN of its last write), its replay LSN
  has reached that LSN: checked on the very connection that will run the read, polled for up to
  `token_wait_s`, after which the read goes to the primary instead.

Lag is measured by a refresh that runs at most every `refresh_interval_s`, started by the reads
themselves (no background task to wire): per replica `pg_last_wal_replay_lsn()` against the
primary's `pg_current_wal_lsn()` (bytes), and the age of the last replayed transaction while it is
behind (seconds; 0 when caught up: an idle primary is not lag).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Protocol

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine


@dataclass(frozen=True, slots=True)
class Staleness:
    """How stale a read may be: `max_lag_s` of replication lag; with `read_your_writes` a replica
    must also have replayed the caller's own last write (its consistency token)."""

    max_lag_s: float
    read_your_writes: bool = True


# -- consistency tokens -----------------------------------------------------------------------------


def parse_lsn(token: str) -> int:
    """PostgreSQL's `X/Y` LSN text as an integer; ValueError on anything else."""
    high, sep, low = token.strip().partition("/")
    if not sep or not high or not low or len(high) > 8 or len(low) > 8:
        raise ValueError(f"not an LSN: {token!r}")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


@dataclass
class ConsistencyScope:
    """One request's tokens: `after` the LSN its reads must see, `written` the highest commit LSN
    its writes produced (what the response hands back)."""

    after: int | None = None
    written: int | None = None

    def wrote(self, lsn: int) -> None:
        self.written = lsn if self.written is None else max(self.written, lsn)


_scope: ContextVar[ConsistencyScope | None] = ContextVar("mercato_consistency_scope", default=None)


def current_scope() -> ConsistencyScope | None:
    return _scope.get()


@contextlib.contextmanager
def consistency_scope(after: int | None = None) -> Iterator[ConsistencyScope]:
    """Make reads in this context wait for `after`, and collect the commit LSN of its writes."""
    scope = ConsistencyScope(after=after)
    reset = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(reset)


# -- the replica set --------------------------------------------------------------------------------


class ReplicaHook(Protocol):
    """Metrics: called after each refresh per replica, and once per routed read. Must not raise."""

    def replica_state(self, name: str, *, lag_bytes: int, lag_s: float, in_rotation: bool) -> None: ...

    def read_routed(self, target: str, reason: str) -> None: ...


class NullReplicaHook:
    def replica_state(self, name: str, *, lag_bytes: int, lag_s: float, in_rotation: bool) -> None:
        return None

    def read_routed(self, target: str, reason: str) -> None:
        return None


@dataclass
class Replica:
    name: str
    engine: AsyncEngine
    replay_lsn: int = 0
    lag_bytes: int = 0
    lag_s: float = 0.0
    in_recovery: bool = False
    reachable: bool = False
    reason: str = "not checked yet"
    checked_at: float = field(default=0.0)

    @property
    def in_rotation(self) -> bool:
        return self.reason == ""

    def detail(self) -> dict[str, object]:
        return {
            "name": self.name,
            "in_rotation": self.in_rotation,
            "lag_bytes": self.lag_bytes,
            "lag_s": round(self.lag_s, 3),
            "reason": self.reason,
        }


class ReplicaSet:
    """The replicas a `Database` may read from, their measured lag, and the routing rule."""

    def __init__(
        self,
        replicas: list[tuple[str, AsyncEngine]],
        *,
        max_lag_s: float = 5.0,
        max_lag_bytes: int = 16 * 1024 * 1024,
        token_wait_s: float = 0.05,
        token_poll_s: float = 0.005,
        refresh_interval_s: float = 1.0,
        probe_timeout_s: float = 1.0,
        hook: ReplicaHook | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.replicas = [Replica(name, engine) for name, engine in replicas]
        self.max_lag_s = max_lag_s
        self.max_lag_bytes = max_lag_bytes
        self.token_wait_s = token_wait_s
        self.token_poll_s = token_poll_s
        self.refresh_interval_s = refresh_interval_s
        self.probe_timeout_s = probe_timeout_s
        self.hook = hook or NullReplicaHook()
        self._rng = rng or random.Random()
        self._refreshed_at = float("-inf")
        self._refreshing: asyncio.Task[None] | None = None

    # -- measuring ------------------------------------------------------------------------------

    async def refresh(self, primary: AsyncEngine) -> None:
        """Measure every replica against the primary's current WAL position, now."""
        self._refreshed_at = time.monotonic()
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                async with primary.connect() as conn:
                    primary_lsn = await _scalar_lsn(conn, "SELECT pg_current_wal_lsn()::text")
        except Exception:  # noqa: BLE001 - the primary down: keep routing on the last measurement
            return
        await asyncio.gather(*(self._measure(r, primary_lsn) for r in self.replicas))

    async def _measure(self, replica: Replica, primary_lsn: int) -> None:
        try:
            async with asyncio.timeout(self.probe_timeout_s):
                async with replica.engine.connect() as conn:
                    row = (
                        await conn.execute(
                            text(
                                "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()::text,"
                                " EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8"
                            )
                        )
                    ).one()
        except Exception as exc:  # noqa: BLE001 - unreachable is a state to report, not an error
            replica.reachable = False
            replica.reason = f"unreachable: {type(exc).__name__}"
        else:
            replica.reachable = True
            replica.in_recovery = bool(row[0])
            replica.replay_lsn = parse_lsn(row[1]) if row[1] else 0
            replica.lag_bytes = max(0, primary_lsn - replica.replay_lsn) if replica.in_recovery else 0
            replica.lag_s = float(row[2] or 0.0) if replica.lag_bytes > 0 else 0.0
            if not replica.in_recovery:
                replica.reason = "not in recovery (a primary)"
            elif replica.lag_s > self.max_lag_s or replica.lag_bytes > self.max_lag_bytes:
                replica.reason = f"lag {replica.lag_s:.1f} s / {replica.lag_bytes} B beyond the bound"
            else:
                replica.reason = ""
        replica.checked_at = time.monotonic()
        self.hook.replica_state(
            replica.name, lag_bytes=replica.lag_bytes, lag_s=replica.lag_s, in_rotation=replica.in_rotation
        )

    def refresh_soon(self, primary: AsyncEngine) -> None:
        """Start a refresh in the background if the last one is older than the interval (one at a
        time): the reads keep the measurements fresh without a task of their own."""
        if time.monotonic() - self._refreshed_at < self.refresh_interval_s:
            return
        if self._refreshing is not None and not self._refreshing.done():
            return
        self._refreshed_at = time.monotonic()
        self._refreshing = asyncio.get_running_loop().create_task(self.refresh(primary))

    # -- routing --------------------------------------------------------------------------------

    def candidates(self, staleness: Staleness) -> list[Replica]:
        """Replicas in rotation whose lag the read accepts, in random order (spread the load)."""
        fit = [r for r in self.replicas if r.in_rotation and r.lag_s <= staleness.max_lag_s]
        self._rng.shuffle(fit)
        return fit

    async def reached(self, conn: AsyncConnection, replica: Replica, lsn: int) -> bool:
        """Whether `replica` (through `conn`) has replayed `lsn`, polling up to `token_wait_s`."""
        if replica.replay_lsn >= lsn:
            return True
        deadline = time.monotonic() + self.token_wait_s
        while True:
            replayed = await _scalar_lsn(conn, "SELECT pg_last_wal_replay_lsn()::text")
            replica.replay_lsn = max(replica.replay_lsn, replayed)
            if replayed >= lsn:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.token_poll_s)

    def detail(self) -> list[dict[str, object]]:
        return [r.detail() for r in self.replicas]

    async def dispose(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for r in self.replicas:
            await r.engine.dispose()


async def _scalar_lsn(conn: AsyncConnection, sql: str) -> int:
    value = (await conn.execute(text(sql))).scalar()
    return parse_lsn(value) if value else 0


async def commit_lsn(conn: AsyncConnection) -> int:
    """The primary's WAL position right after a commit: at or past the commit record, so a replica
    that replayed it sees the transaction. One round trip on the driver connection, outside any
    transaction (no BEGIN/ROLLBACK pair from the pool's autobegin)."""
    raw = await conn.get_raw_connection()
    return await driver_commit_lsn(raw.driver_connection)


async def driver_commit_lsn(driver: Any) -> int:
    """`commit_lsn` on an asyncpg connection of the raw-driver path (kit/storage/statements.py)."""
    return parse_lsn(await driver.fetchval("SELECT pg_current_wal_lsn()::text"))
