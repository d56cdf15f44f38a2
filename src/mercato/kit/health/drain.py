"""Connection draining on shutdown: readiness fails first, the server stops later (ADR 0040).

A load balancer only learns that a node is going away from its health checks. If the server closed
its listener the moment SIGTERM arrived, every request the balancer routed there before its next
check would be refused (or, worse, cut mid-flight). So on the first SIGTERM:

1. `Drain.active` turns true at once: `/readyz` answers 503 `draining`;
2. the process keeps serving for `drain_s` seconds, long enough for the balancer to see
   `fall` failed checks (`drain_s ≥ fall × interval + one interval of margin`);
3. then the server's own shutdown runs (uvicorn: stop accepting, finish in-flight requests, close
   idle keep-alive connections, lifespan shutdown).

A second SIGTERM during the drain skips the rest of the wait. `drain_s == 0` keeps the server's
behaviour unchanged.

`install()` wraps the SIGTERM handler the server put in place (uvicorn installs its own with
`signal.signal` before the application's lifespan starts, in every worker process), so it works for
one process and for `--workers N` alike without replacing the server class.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import Any

__all__ = ["Drain"]

Handler = Callable[[int, FrameType | None], Any]


class Drain:
    """A process's draining state and the SIGTERM hook that starts it."""

    def __init__(self, *, drain_s: float = 0.0, clock: Callable[[], float] = time.monotonic) -> None:
        if drain_s < 0:
            raise ValueError("drain_s must be >= 0")
        self.drain_s = drain_s
        self._clock = clock
        self._since: float | None = None
        self._previous: dict[int, Handler] = {}

    @property
    def active(self) -> bool:
        return self._since is not None

    @property
    def elapsed_s(self) -> float:
        return 0.0 if self._since is None else self._clock() - self._since

    def begin(self) -> None:
        """Start draining (idempotent): readiness fails from now on."""
        if self._since is None:
            self._since = self._clock()

    def install(self, loop: asyncio.AbstractEventLoop, signals: tuple[int, ...] = (signal.SIGTERM,)) -> bool:
        """Wrap the current handler of `signals`: the first one begins the drain and hands the
        signal on after `drain_s`; a second one hands it on at once. False (nothing installed) when
        `drain_s` is 0, off the main thread (an app served from a thread), or when the current handler
        is not a Python callable (the default action: no server of ours is running)."""
        if self.drain_s <= 0 or threading.current_thread() is not threading.main_thread():
            return False
        installed = False
        for sig in signals:
            previous = signal.getsignal(sig)
            if not callable(previous):
                continue
            self._previous[sig] = previous
            signal.signal(sig, self._make_handler(loop, previous))
            installed = True
        return installed

    def uninstall(self) -> None:
        """Put the wrapped handlers back (the server restores its own originals itself on exit)."""
        for sig, previous in self._previous.items():
            if signal.getsignal(sig) is not previous:
                signal.signal(sig, previous)
        self._previous.clear()

    def _make_handler(self, loop: asyncio.AbstractEventLoop, previous: Handler) -> Handler:
        def handler(sig: int, frame: FrameType | None) -> None:
            if self.active:  # a second signal: no more waiting
                previous(sig, frame)
                return
            self.begin()
            # call_soon_threadsafe is the one loop method safe to call from a signal handler.
            loop.call_soon_threadsafe(loop.call_later, self.drain_s, previous, sig, None)

        return handler
