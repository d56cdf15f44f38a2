"""Wake on work: named signals from whoever creates work to the loops that handle it.

A background loop (the outbox relay, a stream consumer, the realtime broker) used to poll its table
every 20-200 ms whether or not anything had changed; idle, `mercato up` spent a fifth of a core on
those polls. Now each loop waits for a signal on its channel and polls only as a slow safety net
(a missed signal, a process that cannot signal us, a retry that became due):

- in this process, `fire(channel)` wakes every waiter at once; `after_commit(conn, channel)` fires
  when the caller's write transaction commits (`Database.write` calls `fire_pending`), never on a
  rollback, so a woken loop always finds the committed work;
- on PostgreSQL, `notify_sql(channel)` is a `pg_notify` the writer sends inside its transaction
  (PostgreSQL delivers it at commit, and only then), and `announce(channel)` sends one on its own;
  each process keeps one connection `LISTEN`ing on the channels its loops wait on and turns every
  notification into a local `fire`. SQLite has no such channel: embedded mode is one process, and
  for another process on the same file (`mercato api` beside `mercato worker` in development) a
  watcher stats the file's write-ahead log a few times a second (a system call, no query) and
  fires every channel waited on when the log changed without a commit of this process.

Waiting is race-free without clearing shared events: `mark(channels)` reads per-channel counters
before a pass, and `wait(channels, since=mark)` returns at once if any moved during the pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import String, bindparam, func, literal, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Select
from sqlalchemy.util import greenlet_spawn

__all__ = ["Mark", "WorkSignals"]

_PENDING = "mercato_signals_pending"
_PREFIX = "mercato_"

Mark = tuple[int, ...]


@dataclass
class _LoopState:
    counters: dict[str, int] = field(default_factory=dict)
    waiters: dict[str, set[asyncio.Future[None]]] = field(default_factory=dict)
    listening: set[str] = field(default_factory=set)  # channels the listener should hold
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    listener: asyncio.Task[None] | None = None
    # This process's commits and fires, to tell its own changes of the file from another's (SQLite).
    local_writes: int = 0
    announcing: set[str] = field(default_factory=set)  # a NOTIFY in flight, per channel
    announce_again: set[str] = field(default_factory=set)  # announced again meanwhile


class WorkSignals:
    """One per `Database` (as `db.signals`). Channel names: letters, digits and underscores."""

    def __init__(
        self, engine: AsyncEngine, *, listen_retry_s: float = 1.0, file_poll_s: float = 0.25
    ) -> None:
        self._engine = engine
        self.cross_process = engine.dialect.name == "postgresql"
        self._retry_s = listen_retry_s
        self._file_poll_s = file_poll_s
        database = engine.url.database if engine.dialect.name == "sqlite" else None
        self._wal_path = f"{database}-wal" if database and database != ":memory:" else None
        # One state per event loop: a Database may outlive a loop (tests, CLI commands run in turn).
        self._loops: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState] = (
            weakref.WeakKeyDictionary()
        )
        self.listener_errors = 0
        # The payload of this instance's own `announce`: its listener hears that NOTIFY too, and
        # `announce` fired locally already; firing again ran every waiting loop a second, empty
        # pass (the chat persister: one wasted stream read per message sent).
        self._origin = uuid.uuid4().hex

    def _state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._loops.get(loop)
        if state is None:
            state = self._loops[loop] = _LoopState()
        return state

    def loop_state(self) -> _LoopState:
        """This loop's state, for `committed_in`: a caller that keeps one per loop already (the SQLite
        write queue) saves the loop look-up per commit (`get_running_loop` is a `getpid` system
        call on Python 3.11)."""
        return self._state()

    # ---- producing ---------------------------------------------------------------------------

    def fire(self, *channels: str) -> None:
        """Wake this process's waiters on `channels` now."""
        try:
            state = self._state()
        except RuntimeError:  # no running loop: nobody can be waiting
            return
        state.local_writes += 1
        for channel in channels:
            state.counters[channel] = state.counters.get(channel, 0) + 1
            for waiter in state.waiters.pop(channel, ()):
                if not waiter.done():
                    waiter.set_result(None)

    def after_commit(self, conn: AsyncConnection, *channels: str) -> None:
        """Fire `channels` in this process once `conn`'s write transaction commits."""
        pending: set[str] = conn.info.setdefault(_PENDING, set())
        pending.update(channels)

    def fire_pending(self, conn: AsyncConnection, *, committed: bool) -> None:
        """Called by `Database` when a write transaction ends."""
        pending = self.take_pending(conn)
        if committed:
            self.committed(pending)

    def take_pending(self, conn: AsyncConnection) -> set[str]:
        """The channels `after_commit` queued on `conn`'s transaction, taken off it."""
        return self.take_pending_from(conn.info)

    def take_pending_from(self, info: dict[Any, Any]) -> set[str]:
        """`take_pending` given the connection's `info` (the SQLite writer keeps it at hand)."""
        pending: set[str] | None = info.pop(_PENDING, None)
        return pending or set()

    def committed_in(self, loop_state: _LoopState, info: dict[Any, Any]) -> None:
        """`committed(take_pending_from(info))` given this loop's `loop_state()`, without an empty
        set per commit (the SQLite writer's commit on the loop, ADR 0069)."""
        pending: set[str] | None = info.pop(_PENDING, None)
        loop_state.local_writes += 1
        if pending:
            self.fire(*pending)

    def committed(self, pending: set[str]) -> None:
        """A write transaction committed: count it and fire what it queued (`take_pending`)."""
        self.wrote()
        if pending:
            self.fire(*pending)

    def wrote(self) -> None:
        """This process committed a write (a change of the SQLite file that is not another's)."""
        # Not contextlib.suppress: this runs after every commit, and a try block costs nothing.
        try:  # noqa: SIM105
            self._state().local_writes += 1
        except RuntimeError:  # no running loop: nobody to tell
            pass

    @property
    def origin(self) -> str:
        """The payload of this instance's own NOTIFYs: its listener ignores them (a statement that
        NOTIFYs with it, `origin_notify_statement`, leaves the local `fire` to its sender)."""
        return self._origin

    def notify_sql(self, channel: str) -> Select[Any]:
        """`SELECT pg_notify(...)`: PostgreSQL only; delivered to every listener at commit."""
        return notify_statement(channel)

    async def announce(self, channel: str) -> None:
        """Fire `channel` here, and on PostgreSQL in every other process: one `pg_notify` on the
        driver's connection, outside any transaction. Announcements made while one is in flight
        are coalesced into one more after it (a listener needs to know there is work, not how much).
        """
        self.fire(channel)
        if not self.cross_process:
            return
        state = self._state()
        if channel in state.announcing:
            state.announce_again.add(channel)
            return
        state.announcing.add(channel)
        try:
            while True:
                state.announce_again.discard(channel)
                await self._notify_now(_PREFIX + _checked(channel))
                if channel not in state.announce_again:
                    return
        finally:
            state.announcing.discard(channel)
            state.announce_again.discard(channel)

    async def _notify_now(self, pg_channel: str) -> None:
        pooled = await self._engine.raw_connection()
        try:
            driver: Any = pooled.driver_connection  # an asyncpg connection
            await driver.execute("SELECT pg_notify($1, $2)", pg_channel, self._origin)
        except BaseException:
            await greenlet_spawn(pooled.invalidate)  # its state is unknown after a failure
            raise
        await greenlet_spawn(pooled.close)

    # ---- waiting -----------------------------------------------------------------------------

    def waited_on(self, channel: str) -> bool:
        """Whether a loop of this process has waited on `channel` (its waiters are woken by a
        local `fire`, so a writer here need not NOTIFY for them)."""
        try:
            return channel in self._state().listening
        except RuntimeError:  # no running loop: nobody waits
            return False

    def mark(self, channels: Iterable[str]) -> Mark:
        """The channels' counters now: pass to `wait(since=...)` to catch a signal fired meanwhile."""
        state = self._state()
        return tuple(state.counters.get(channel, 0) for channel in channels)

    async def wait(
        self,
        channels: tuple[str, ...],
        *,
        since: Mark,
        timeout_s: float,
        stop: asyncio.Event | None = None,
    ) -> bool:
        """Until a signal on one of `channels` (since `since`), `stop`, or `timeout_s`; True when
        signalled. On PostgreSQL the first wait on a channel starts this process's listener."""
        state = self._state()
        if self.mark(channels) != since:
            return True
        if not state.listening.issuperset(channels):
            state.listening.update(channels)
            state.changed.set()
        if (self.cross_process or self._wal_path) and (state.listener is None or state.listener.done()):
            listen = self._listen(state) if self.cross_process else self._watch_file(state)
            state.listener = asyncio.get_running_loop().create_task(listen, name="work-signals-listener")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        for channel in channels:
            state.waiters.setdefault(channel, set()).add(waiter)
        stopper = None if stop is None else asyncio.ensure_future(stop.wait())
        try:
            pending: list[asyncio.Future[Any]] = [waiter] if stopper is None else [waiter, stopper]
            await asyncio.wait(pending, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
            return waiter.done()
        finally:
            if stopper is not None:
                stopper.cancel()
            for channel in channels:
                state.waiters.get(channel, set()).discard(waiter)
            waiter.cancel()

    async def aclose(self) -> None:
        """Stop this loop's listener (the database is being disposed)."""
        with contextlib.suppress(RuntimeError):
            state = self._state()
            if state.listener is not None:
                state.listener.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await state.listener
                state.listener = None

    async def _listen(self, state: _LoopState) -> None:
        """One pooled connection LISTENing on every channel waited on; reconnects when lost."""

        def on_notification(_conn: Any, _pid: int, channel: str, payload: str) -> None:
            if payload != self._origin:
                self.fire(channel.removeprefix(_PREFIX))

        while True:
            try:
                async with self._engine.connect() as conn:
                    raw = await conn.get_raw_connection()
                    driver: Any = raw.driver_connection  # an asyncpg connection
                    lost = asyncio.Event()
                    driver.add_termination_listener(_setter(lost))
                    held: set[str] = set()
                    try:
                        while not lost.is_set():
                            state.changed.clear()
                            for channel in sorted(state.listening - held):
                                await driver.add_listener(_PREFIX + channel, on_notification)
                                held.add(channel)
                                # Anything signalled while nobody listened was missed: look now.
                                self.fire(channel)
                            await _first_of(state.changed, lost)
                    finally:
                        if not driver.is_closed():
                            for channel in held:
                                await driver.remove_listener(_PREFIX + channel, on_notification)
                        await conn.rollback()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the safety poll covers the gap; the listener reconnects
                self.listener_errors += 1
            await asyncio.sleep(self._retry_s)

    async def _watch_file(self, state: _LoopState) -> None:
        """SQLite: another process's commit changes the write-ahead log; fire every channel then."""
        assert self._wal_path is not None
        last: tuple[int, int, int] | None = None
        seen = state.local_writes
        first = True
        while True:
            try:
                st = os.stat(self._wal_path)
                now: tuple[int, int, int] | None = (st.st_ino, st.st_size, st.st_mtime_ns)
            except OSError:
                now = None
            if not first and now != last and state.local_writes == seen:
                self.fire(*state.listening)
            last, seen, first = now, state.local_writes, False
            await asyncio.sleep(self._file_poll_s)


def _checked(channel: str) -> str:
    if not channel.replace("_", "").isalnum():
        raise ValueError("channel: letters, digits and underscores only")
    return channel


def _setter(event: asyncio.Event) -> Callable[..., None]:
    def set_event(*_args: Any) -> None:
        event.set()

    return set_event


async def _first_of(*events: asyncio.Event) -> None:
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def notify_statement(channel: str) -> Select[Any]:
    """`SELECT pg_notify(...)` on `channel` (PostgreSQL only): what `WorkSignals.notify_sql` sends."""
    return select(func.pg_notify(literal(_PREFIX + _checked(channel)), literal("")))


def origin_notify_statement(channel: str) -> Select[Any]:
    """`notify_statement` whose payload is the bind parameter `origin` (`WorkSignals.origin`): the
    sending process's own listener ignores it, the sender firing its channel here itself."""
    return select(func.pg_notify(literal(_PREFIX + _checked(channel)), bindparam("origin", type_=String())))
