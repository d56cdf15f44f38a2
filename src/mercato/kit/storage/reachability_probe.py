"""The reachability probes' thread (kit/storage/reachability.py holds the verdict).

`SELECT 1` every `interval_s` on a session of the probe's own, each step bounded by `timeout_s`, on a
thread with an event loop of its own: the API's loop may be seconds behind under load (1,000
WebSocket subscribes on a loaded machine), and a probe run there timed out waiting for that loop,
not for the primary (ADR 0078). Here a timeout measures the primary's silence; the GIL is handed
over every few milliseconds (`sys.getswitchinterval()`), far inside a probe's timeout. Each outcome
is handed to the owner loop (`on_outcome(ok, posted_at)`), where the verdict and its terminations of
pooled connections happen.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import threading
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from mercato.kit.storage.cancellation import stop_if_cancelled

__all__ = ["ProbeThread"]

# A connect that fails with these never reached a server: a cut link whose neighbour (ARP) entry has
# failed answers at once with "no route to host"; it is silence, not a refusal.
_NO_PATH = frozenset({errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ETIMEDOUT})


class ProbeThread:
    """A daemon thread: an interpreter exiting without `stop()` does not wait for it."""

    def __init__(
        self,
        dsn: str,
        *,
        owner: asyncio.AbstractEventLoop,
        on_outcome: Callable[[bool, float], None],
        interval_s: float,
        timeout_s: float,
        session_s: float,
    ) -> None:
        self.owner = owner
        self._dsn = dsn
        self._on_outcome = on_outcome
        self._interval_s = interval_s
        self._timeout_s = timeout_s
        self._session_s = session_s
        self._session: Any = None  # the probe's own asyncpg connection, and when it was opened
        self._session_opened = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._main, name="db-reachability", daemon=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop probing (at once between probes, or once the probe in flight ends)."""
        self._stopped.set()
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            with contextlib.suppress(RuntimeError):  # its loop already closed: it has ended
                loop.call_soon_threadsafe(task.cancel)

    def join(self, timeout_s: float) -> None:
        self._thread.join(timeout_s)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            if not self._stopped.is_set():
                self._task = loop.create_task(self._run())
                with contextlib.suppress(asyncio.CancelledError):
                    loop.run_until_complete(self._task)
        finally:
            self._stopped.set()
            loop.close()

    def _report(self, ok: bool) -> bool:
        """Hand an outcome to the owner loop; False when it is closed (nobody left to watch for)."""
        if self._stopped.is_set():
            return False
        try:
            self.owner.call_soon_threadsafe(self._on_outcome, ok, time.monotonic())
        except RuntimeError:  # the owner loop is closed
            return False
        return True

    async def _run(self) -> None:
        try:
            while True:
                try:
                    await self._probe()
                except TimeoutError:  # silence: the partition's signature
                    ok = False
                except OSError as exc:
                    # The network, not the server, answered "no route": silence. Otherwise a
                    # refusal or a reset: the server's host is there.
                    ok = exc.errno not in _NO_PATH
                except Exception:  # noqa: BLE001 - an answer, if a refusal: the server is there
                    # (down, starting, refusing): the ordinary outage path (ADR 0026) answers fast.
                    ok = True
                else:
                    ok = True
                if not self._report(ok):
                    return
                # `wait_for` can swallow a cancellation that lands as the probe fails (Python 3.11):
                # the task is then still marked cancelling, and must stop here rather than sleep on.
                stop_if_cancelled()
                await asyncio.sleep(self._interval_s)
        finally:
            conn, self._session = self._session, None
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=self._timeout_s)

    async def _probe(self) -> None:
        """`SELECT 1` on the probe's own session, each step bounded by `timeout_s`. The session is
        opened again every `session_s`: a new connection per probe cost ~3 ms of CPU four times a
        second, most of an idle API's CPU, and a smart shutdown waits for our session at most that
        long. On a failure the session is terminated (its socket closed now, no goodbye on a dead
        link) and the next probe connects anew, so a refusal is still seen as an answer."""
        conn = self._session
        if conn is not None and (
            conn.is_closed() or time.monotonic() - self._session_opened > self._session_s
        ):
            self._session = None
            with contextlib.suppress(Exception):
                await conn.close(timeout=self._timeout_s)
            conn = None
        try:
            if conn is None:
                conn = await asyncio.wait_for(
                    asyncpg.connect(self._dsn, timeout=self._timeout_s), self._timeout_s
                )
                self._session, self._session_opened = conn, time.monotonic()
            await conn.fetchval("SELECT 1", timeout=self._timeout_s)
        except BaseException:
            self._session = None
            if conn is not None:
                conn.terminate()
            raise
