"""A process pool for CPU-heavy pure functions, awaited from the event loop, with a bounded queue.

What runs where (ADR 0053): the loop runs I/O and short Python; threads run what releases the GIL
(argon2 in `PasswordHashing`, aiosqlite's connection thread); CPU-bound *Python* (aggregations,
comparisons, rendering over rows already fetched) runs here, in other processes, because a thread
would still hold the GIL and stall the loop.

- **Bounded.** At most `max_workers` jobs run and at most `max_queued` wait. Beyond that a job is
  refused at once (`PoolFull`, with `wait_s=0`) or waits up to `wait_s` for room and is then
  refused: backpressure reaches the caller instead of an unbounded backlog of pickled inputs.
- **Off the loop, all of it.** Submitting (which may start a worker process) happens on a thread;
  pickling the arguments and unpickling the result happen on the executor's feeder and management
  threads. The loop only awaits a future.
- **A crashed worker** (killed, out of memory, a segfault in an extension) fails the jobs it broke
  with `WorkerCrashed`; the next job gets a fresh executor. Exceptions the function raises reach
  the caller unchanged.
- **No orphans.** A worker exits when the process that owns the pool dies, even by SIGKILL (no
  shutdown ever reaches it): otherwise it waits for jobs forever on a queue whose pipe it holds
  both ends of, and keeps the forkserver alive with it (each child holds the server's pipe).
- **Metrics** on the given registry: `mercato_process_pool_{queued,running}` gauges and
  `mercato_process_pool_{completed,rejected,crashed}_total` counters, labelled by pool.

`concurrent.futures.ProcessPoolExecutor` does the process work; it has no bound on its queue, no
metrics and stays broken after a crash, which is what this adds. Functions and arguments must be
picklable (module-level functions, plain data).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Literal, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

__all__ = ["PoolFull", "ProcessPool", "WorkerCrashed", "exit_with_parent"]

T = TypeVar("T")
StartMethod = Literal["forkserver", "spawn", "fork"]


class PoolFull(Exception):
    """The pool's queue is full: the job was not accepted (retry later, or shed the request)."""


class WorkerCrashed(Exception):
    """The worker process running the job died; the pool replaced its processes."""


class _Metrics:
    def __init__(self, registry: CollectorRegistry | None, name: str) -> None:
        reg = registry if registry is not None else CollectorRegistry()
        label = ["pool"]
        self.queued = Gauge(
            "mercato_process_pool_queued", "Jobs waiting for a worker process.", label, registry=reg
        ).labels(name)
        self.running = Gauge(
            "mercato_process_pool_running", "Jobs running in a worker process.", label, registry=reg
        ).labels(name)
        self.completed = Counter(
            "mercato_process_pool_completed_total",
            "Jobs that returned (or raised) in a worker process.",
            label,
            registry=reg,
        ).labels(name)
        self.rejected = Counter(
            "mercato_process_pool_rejected_total",
            "Jobs refused because the queue was full.",
            label,
            registry=reg,
        ).labels(name)
        self.crashed = Counter(
            "mercato_process_pool_crashed_total",
            "Jobs lost to a worker process that died.",
            label,
            registry=reg,
        ).labels(name)


class ProcessPool:
    def __init__(
        self,
        *,
        name: str = "cpu",
        max_workers: int = 1,
        max_queued: int = 8,
        wait_s: float = 0.0,
        start_method: StartMethod = "forkserver",
        registry: CollectorRegistry | None = None,
    ) -> None:
        if max_workers < 1 or max_queued < 0 or wait_s < 0:
            raise ValueError("max_workers >= 1, max_queued >= 0 and wait_s >= 0")
        self.name = name
        self.max_workers = max_workers
        self.max_queued = max_queued
        self.wait_s = wait_s
        self._context = multiprocessing.get_context(start_method)
        self._metrics = _Metrics(registry, name)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()  # guards the executor's replacement (submits run on threads)
        self._running = 0
        self._queued = 0
        self._room: asyncio.Condition | None = None
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def running(self) -> int:
        return self._running

    def _condition(self) -> asyncio.Condition:
        if self._room is None:
            self._room = asyncio.Condition()
        return self._room

    def _current_executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"process pool {self.name!r} is closed")
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.max_workers, mp_context=self._context, initializer=exit_with_parent
                )
            return self._executor

    def _discard(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._executor is broken:
                self._executor = None
        broken.shutdown(wait=False, cancel_futures=True)

    async def run(self, fn: Callable[..., T], /, *args: Any) -> T:
        """`fn(*args)` in a worker process. Raises `PoolFull` when the queue stays full,
        `WorkerCrashed` when the process died, or whatever `fn` raised."""
        room = self._condition()
        async with room:
            if self._running >= self.max_workers and self._queued >= self.max_queued:
                if self.wait_s <= 0:
                    self._metrics.rejected.inc()
                    raise PoolFull(f"process pool {self.name!r}: {self._queued} jobs queued")
                try:
                    await asyncio.wait_for(
                        room.wait_for(
                            lambda: self._running < self.max_workers or self._queued < self.max_queued
                        ),
                        self.wait_s,
                    )
                except TimeoutError:
                    self._metrics.rejected.inc()
                    raise PoolFull(f"process pool {self.name!r}: full for {self.wait_s:g} s") from None
            self._queued += 1
            self._metrics.queued.inc()
            try:
                await room.wait_for(lambda: self._running < self.max_workers)
            finally:
                self._queued -= 1
                self._metrics.queued.dec()
            self._running += 1
            self._metrics.running.inc()
        try:
            return await self._execute(fn, args)
        finally:
            async with room:
                self._running -= 1
                self._metrics.running.dec()
                room.notify_all()

    async def _execute(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        executor = self._current_executor()
        try:
            # submit() may start worker processes: a thread does it, not the loop.
            future = await asyncio.to_thread(executor.submit, fn, *args)
            result: T = await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._metrics.crashed.inc()
            self._discard(executor)
            raise WorkerCrashed(f"a worker process of pool {self.name!r} died: {exc}") from exc
        except Exception:
            self._metrics.completed.inc()  # the function raised: the job did complete
            raise
        self._metrics.completed.inc()
        return result

    async def warm_up(self) -> None:
        """Start the worker processes now (off the loop), so the first job does not pay for it."""
        await asyncio.gather(*(self.run(_noop) for _ in range(self.max_workers)))

    async def close(self) -> None:
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)


def _noop() -> None:
    return None


def exit_with_parent() -> None:
    """In a worker process: exit as soon as the process that started it is gone (its sentinel pipe
    reads end-of-file), whatever killed it. A daemon thread waits for that; jobs run meanwhile."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def wait_then_exit() -> None:
        parent.join()
        os._exit(0)

    threading.Thread(target=wait_then_exit, name="exit-with-parent", daemon=True).start()
