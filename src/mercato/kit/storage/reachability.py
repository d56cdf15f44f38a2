"""Is the primary reachable? A partition is told apart from a slow query in well under a second.

A stopped server refuses connections at once, but a network partition drops packets silently: a
new connection waits for its connect timeout and a statement on a pooled connection waits for TCP
to give up (minutes). Under a partition the shop's consistent (CP) operations must refuse quickly
(503 with Retry-After, guide §34), not hang. So a probe pings the primary every `interval_s` on a
session of its own (opened again every `session_s`), bounded by `timeout_s`; after `failures`
consecutive failed probes the primary is *unreachable*. Only timeouts count: a refused connection
is an answer (the server is down or starting, which ADR 0026's outage path already answers at
once). Then:

- every new read of the primary and every write fails at once with `DatabaseUnreachable` (an outage:
  503 `dependency-unavailable`, reason `unreachable`), and a cache in front of the primary serves
  what it has, stale (stale-if-error, `Mercato-Staleness`); a connection checked out of the pool
  anyway (the raw driver path skips `check()`) is closed at checkout, so its statement fails at once;
- the connections checked out when the verdict falls, and on every failed probe after it, are
  terminated: their statements are on the dead link, and their requests end now with an outage
  answer instead of waiting for TCP (minutes) or the driver's graceful close.

The first answered probe makes it reachable again. `failures` > 1 keeps slow probes on a loaded
machine (or a stalled event loop) from failing requests; but one failed probe is enough when a
connection of the pool has also been checked out for longer than a probe's timeout (two channels to
the primary silent at once). So a request in flight at the cut ends within about
`interval_s + timeout_s` (0.75 s with the defaults 0.25 / 0.5 / 2), and the verdict without a
request in flight comes within about `failures × (interval_s + timeout_s)` (1.5 s).

Busy is not silent (ADR 0078). The probes run on a thread of their own with its own event loop, so
a probe's timeout measures the primary's silence, not how long the API's loop takes to get round to
reading the answer: 1,000 WebSocket subscribes on a loaded machine kept that loop seconds behind,
the probe's reconnect timed out on the loop's queue, and the API refused every request as
"unreachable" while PostgreSQL answered in a millisecond. The verdict is still kept on the API's
loop (each probe's outcome is handed to it), and the one-probe shortcut above takes a long checkout
as a witness only while that loop is keeping up (it ran the outcome within `timeout_s / 2`): on a
congested loop a connection is checked out long because its holder waits for the loop, not for
the server, so a storm that exhausts the pool needs `failures` silent probes like any other load.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from mercato.kit.observability import get_logger
from mercato.kit.storage.reachability_probe import ProbeThread

__all__ = ["DatabaseUnreachable", "Reachability"]

_log = get_logger("mercato.storage")


class DatabaseUnreachable(ConnectionError):
    """The primary did not answer the last probes: refused without trying (an outage, 503)."""


class Reachability:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        interval_s: float = 0.25,
        timeout_s: float = 0.5,
        failures: int = 2,
        session_s: float = 5.0,
    ) -> None:
        self._engine = engine
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._failures = failures
        self._session_s = session_s
        self._consecutive = 0
        self.unreachable_since: float | None = None
        # The probes' thread and the loop whose requests it watches (the verdict lives on that loop).
        self._prober: ProbeThread | None = None
        # How late the API's loop ran the last failed probe's outcome (its congestion, in seconds).
        self.last_outcome_lag_s = 0.0
        # The probe speaks asyncpg directly (reachability_probe.py): never a dead link's goodbye.
        self._dsn = engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        # Checked-out driver connections and when they were checked out, by id (until checked in).
        self._busy: dict[int, tuple[Any, float]] = {}
        sync_pool = engine.sync_engine.pool
        event.listen(sync_pool, "checkout", self._on_checkout)
        event.listen(sync_pool, "checkin", self._on_checkin)
        event.listen(engine.sync_engine, "do_connect", self._on_connect)
        event.listen(sync_pool, "close", self._on_close)

    @property
    def unreachable(self) -> bool:
        return self.unreachable_since is not None

    def check(self) -> None:
        """Raise `DatabaseUnreachable` while the primary is unreachable; start probing if not yet."""
        self.ensure_started()
        if self.unreachable_since is not None:
            raise DatabaseUnreachable("the primary database is unreachable")

    def ensure_started(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no running loop: a sync caller, nothing to watch
            return
        prober = self._prober
        if prober is None or not prober.alive or prober.owner is not loop:
            # A new event loop (a CLI command after another, a test) gets a watch of its own.
            if prober is not None:
                prober.stop()
            self._consecutive = 0
            self.unreachable_since = None
            self._prober = ProbeThread(
                self._dsn,
                owner=loop,
                on_outcome=self._outcome,
                interval_s=self._interval_s,
                timeout_s=self._timeout_s,
                session_s=self._session_s,
            )
            self._prober.start()

    def _on_connect(self, _dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
        """No new connection towards an unreachable primary (it would wait for its connect timeout,
        or for ARP to give up): the raw driver path, which skips `check()`, fails at once too."""
        if self.unreachable_since is not None:
            raise DatabaseUnreachable("the primary database is unreachable")

    def _on_close(self, dbapi_conn: Any, _record: Any) -> None:
        """A pooled connection the pool closes meanwhile (recycled after a disconnect invalidated the
        pool) would say goodbye over the dead link, for the driver's 2 s: its socket is closed first."""
        if self.unreachable_since is not None:
            _terminate(dbapi_conn)

    def _on_checkout(self, dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
        self._busy[id(dbapi_conn)] = (dbapi_conn, time.monotonic())
        if self.unreachable_since is not None:
            # A caller that skipped `check()` (the raw driver path, kit/storage/statements.py) would
            # send its statement down the dead link: its connection is closed first, so the statement
            # fails at once as an outage (connection closed) and the pool discards the connection.
            _terminate(dbapi_conn)

    def _on_checkin(self, dbapi_conn: Any, _record: Any) -> None:
        self._busy.pop(id(dbapi_conn), None)

    def _outcome(self, ok: bool, posted_at: float) -> None:
        """A probe's outcome, on the API's loop, `posted_at` being when the probe thread handed it."""
        if ok:
            self._answered()
        else:
            self.last_outcome_lag_s = time.monotonic() - posted_at
            self._failed()

    def _failed(self) -> None:
        self._consecutive += 1
        if self.unreachable_since is not None:
            # Requests that passed `check()` just before the verdict checked out a connection after
            # it: on the dead link too. Each failed probe ends them (within one probe cycle).
            self._terminate_busy(min_age_s=0.0)
            return
        # One silent probe is enough when a statement on the pool is silent too (checked out for
        # longer than a probe's whole timeout): two channels to the primary quiet at once is the
        # partition's signature, not a slow probe on a loaded machine. In-flight requests then end
        # within about interval + timeout of the cut (0.75 s by default), not failures times that.
        # Only while the API's loop keeps up (ADR 0078): on a congested loop a checkout is long
        # because its holder waits for the loop, not for the server.
        loop_keeps_up = self.last_outcome_lag_s <= self._timeout_s / 2
        corroborated = loop_keeps_up and self._oldest_busy_s() > self._timeout_s
        if self._consecutive < self._failures and not corroborated:
            return
        self.unreachable_since = time.monotonic()
        stuck = self._terminate_busy(min_age_s=0.0)
        _log.warning(
            "database_unreachable",
            probes_failed=self._consecutive,
            corroborated=corroborated,
            loop_lag_s=round(self.last_outcome_lag_s, 3),
            terminated=stuck,
        )

    def _answered(self) -> None:
        self._consecutive = 0
        if self.unreachable_since is not None:
            _log.info("database_reachable", after_s=round(time.monotonic() - self.unreachable_since, 3))
            self.unreachable_since = None

    def _oldest_busy_s(self) -> float:
        """How long the oldest request's connection has been checked out. A LISTEN connection is
        checked out for good and silent by design (kit/storage/signals.py): not a witness."""
        now = time.monotonic()
        return max((now - since for c, since in list(self._busy.values()) if not _listening(c)), default=0.0)

    def _terminate_busy(self, *, min_age_s: float) -> int:
        """Close the checked-out connections' sockets now: their statements are on the dead link, and
        terminating (no goodbye) ends them with a connection error, an outage answer (503)."""
        now = time.monotonic()
        stuck = [c for c, since in list(self._busy.values()) if now - since >= min_age_s]
        for dbapi_conn in stuck:
            _terminate(dbapi_conn)
        return len(stuck)

    async def close(self) -> None:
        prober, self._prober = self._prober, None
        if prober is not None:
            prober.stop()
            # Bounded: closing a database must never hang on its prober.
            await asyncio.to_thread(prober.join, 2 * self._timeout_s + 1.0)


def _terminate(dbapi_conn: Any) -> None:
    """Close a pooled connection's socket now (asyncpg's `terminate`: no goodbye on a dead link)."""
    driver = getattr(dbapi_conn, "driver_connection", None)
    terminate = getattr(driver, "terminate", None)
    if callable(terminate):
        with contextlib.suppress(Exception):
            terminate()


def _listening(dbapi_conn: Any) -> bool:
    driver = getattr(dbapi_conn, "driver_connection", None)
    return bool(getattr(driver, "_listeners", None))  # asyncpg's channel -> callbacks
