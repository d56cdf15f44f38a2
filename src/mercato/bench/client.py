"""An open-loop HTTP/1.1 load generator on raw asyncio protocols.

Why not ``httpx.AsyncClient``: measured on this machine it spends about 1.4 ms of CPU per request
against ~26 µs for this client (see docs/benchmarks.md), so at the bare endpoint's rates the client,
not the server, would be what the benchmark measured. This client does only what a benchmark of our own
JSON endpoints needs: keep-alive GETs, ``Content-Length`` or chunked bodies, one request in flight
per connection, a bounded pool of connections to one loopback address.

Scheduling is open-loop: request ``j`` is dispatched at its slot in the `Timetable` whether or not
earlier requests have finished, and its latency runs from that slot (the intended send time). When
every pooled connection is busy, the request waits in a queue, and that wait is part of its latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mercato.bench.stats import Counts, LatencyHistogram
from mercato.bench.timetable import Timetable

ALLOWED_HOST = "127.0.0.1"
_SWEEP_INTERVAL_S = 0.05
_MIN_SLEEP_S = 0.001


@dataclass(frozen=True, slots=True)
class GeneratorConfig:
    """One generator process's share of one constant-rate step.

    ``t0_s`` is an absolute ``time.monotonic()`` value (system-wide on Linux, so several processes
    share one timetable). Requests cycle through ``paths``: global request ``i`` asks for
    ``paths[i % len(paths)]``.
    """

    port: int
    paths: tuple[str, ...]
    rate_per_s: float
    duration_s: float
    t0_s: float
    host: str = ALLOWED_HOST
    processes: int = 1
    index: int = 0
    max_connections: int = 256
    warm_connections: int = 16
    timeout_s: float = 2.0
    lag_threshold_s: float = 0.005

    def __post_init__(self) -> None:
        if self.host != ALLOWED_HOST:
            raise ValueError(f"the load generator only targets {ALLOWED_HOST}, not {self.host!r}")
        if not self.paths or any(not p.startswith("/") for p in self.paths):
            raise ValueError("paths must be a non-empty list of absolute paths")
        if self.max_connections < 1 or not 0 <= self.warm_connections <= self.max_connections:
            raise ValueError("need max_connections >= 1 and 0 <= warm_connections <= max_connections")
        if self.timeout_s <= 0 or self.lag_threshold_s < 0:
            raise ValueError("timeout_s must be positive and lag_threshold_s not negative")

    def timetable(self) -> Timetable:
        return Timetable.for_run(
            t0_s=self.t0_s,
            rate_per_s=self.rate_per_s,
            duration_s=self.duration_s,
            processes=self.processes,
            index=self.index,
        )


@dataclass(slots=True)
class GeneratorResult:
    counts: Counts
    histogram: str  # LatencyHistogram.encode()

    def to_dict(self) -> dict[str, Any]:
        return {"counts": self.counts.to_dict(), "histogram": self.histogram}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GeneratorResult:
        return cls(counts=Counts.from_dict(data["counts"]), histogram=str(data["histogram"]))


def build_request(host: str, port: int, path: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: mercato-bench\r\n"
        "Accept: application/json\r\n\r\n"
    ).encode("latin-1")


class ResponseParser:
    """Incremental HTTP/1.1 response framing: status, and where the body ends.

    ``feed`` returns ``True`` once one whole response is in; ``status`` and ``keep_alive`` are then
    valid, and ``reset`` prepares for the next response on the same connection.
    """

    __slots__ = ("_body_end", "_buf", "_chunk_pos", "_chunked", "_head_end", "keep_alive", "status")

    def __init__(self) -> None:
        self._buf = bytearray()
        self.reset()

    def reset(self) -> None:
        self._buf.clear()
        self._head_end = -1
        self._body_end = -1
        self._chunked = False
        self._chunk_pos = 0
        self.status = 0
        self.keep_alive = True

    def feed(self, data: bytes) -> bool:
        buf = self._buf
        buf += data
        if self._head_end < 0:
            idx = buf.find(b"\r\n\r\n")
            if idx < 0:
                return False
            head = bytes(buf[:idx]).lower()
            self._head_end = idx + 4
            self.status = int(head[9:12])
            self.keep_alive = b"\r\nconnection: close" not in head
            pos = head.find(b"\r\ncontent-length:")
            if pos >= 0:
                end = head.find(b"\r\n", pos + 2)
                length = int(head[pos + 17 : end if end >= 0 else len(head)])
                self._body_end = self._head_end + length
            elif b"\r\ntransfer-encoding: chunked" in head:
                self._chunked = True
                self._chunk_pos = self._head_end
            elif self.status in (204, 304) or 100 <= self.status < 200:
                self._body_end = self._head_end
            else:
                raise ValueError("response without Content-Length or chunked encoding")
        if self._chunked:
            return self._chunks_done()
        return len(buf) >= self._body_end

    def _chunks_done(self) -> bool:
        buf = self._buf
        while True:
            line_end = buf.find(b"\r\n", self._chunk_pos)
            if line_end < 0:
                return False
            size = int(bytes(buf[self._chunk_pos : line_end]).split(b";", 1)[0], 16)
            if size == 0:
                return buf.find(b"\r\n\r\n", line_end - 2) >= 0 if line_end >= 2 else False
            nxt = line_end + 2 + size + 2
            if len(buf) < nxt:
                return False
            self._chunk_pos = nxt


class _Connection(asyncio.Protocol):
    __slots__ = ("closed", "gen", "intended_s", "parser", "transport")

    def __init__(self, gen: OpenLoopGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.intended_s = -1.0  # < 0: idle
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes, intended_s: float) -> None:
        self.intended_s = intended_s
        assert self.transport is not None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        if self.intended_s < 0:
            return
        try:
            done = self.parser.feed(data)
        except ValueError:
            self.gen._failed(self)
            self.abort()
            return
        if done:
            status, keep_alive = self.parser.status, self.parser.keep_alive
            self.parser.reset()
            self.gen._responded(self, status, keep_alive)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gen._lost(self)


class OpenLoopGenerator:
    """Runs one `GeneratorConfig` to completion in the running event loop."""

    def __init__(self, config: GeneratorConfig) -> None:
        self.config = config
        self.timetable = config.timetable()
        self._requests = [build_request(config.host, config.port, p) for p in config.paths]
        self._idle: list[_Connection] = []
        self._busy: set[_Connection] = set()
        self._pending: deque[tuple[float, bytes]] = deque()
        self._open = 0  # connected or connecting
        self._hist = LatencyHistogram()
        self._counts = Counts(scheduled=self.timetable.count, first_due_s=self.timetable.t0_s)
        self._done = asyncio.Event()
        self._connect_tasks: set[asyncio.Task[None]] = set()

    # -- public -------------------------------------------------------------------------------

    async def run(self) -> GeneratorResult:
        cfg, tt = self.config, self.timetable
        await asyncio.gather(*(self._connect() for _ in range(min(cfg.warm_connections, tt.count))))
        cpu0, wall0 = time.process_time(), time.monotonic()
        sweeper = asyncio.create_task(self._sweep())
        try:
            await self._schedule()
            self._check_done()
            remaining = tt.end_s + cfg.timeout_s + 2 * _SWEEP_INTERVAL_S - time.monotonic()
            if not self._done.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._done.wait(), timeout=max(0.0, remaining))
        finally:
            sweeper.cancel()
            self._expire(time.monotonic(), force=True)
            for conn in [*self._idle, *self._busy]:
                conn.abort()
            for task in self._connect_tasks:
                task.cancel()
            counts = self._counts
            counts.cpu_s = time.process_time() - cpu0
            counts.wall_s = time.monotonic() - wall0
        return GeneratorResult(counts=counts, histogram=self._hist.encode())

    # -- scheduling ---------------------------------------------------------------------------

    async def _schedule(self) -> None:
        tt, cfg = self.timetable, self.config
        requests, n_req = self._requests, len(self._requests)
        counts = self._counts
        threshold = cfg.lag_threshold_s
        monotonic = time.monotonic
        j = 0
        while j < tt.count:
            now = monotonic()
            upto = tt.due_by(now, j)
            while j < upto:
                intended = tt.due_s(j)
                lag = now - intended
                if lag > counts.max_dispatch_lag_s:
                    counts.max_dispatch_lag_s = lag
                if lag > threshold:
                    counts.late_dispatches += 1
                self._dispatch(requests[(tt.offset + j * tt.stride) % n_req], intended, now)
                j += 1
            if j < tt.count:
                # Event-loop timers tick in whole milliseconds: a shorter sleep returns at once and the
                # loop would spin. Sleeping at least one tick sends in small batches instead, each
                # request at most ~1 ms after its slot (and its latency still counts from the slot).
                delay = tt.due_s(j) - monotonic()
                await asyncio.sleep(max(delay, _MIN_SLEEP_S))

    def _dispatch(self, request: bytes, intended_s: float, now_s: float) -> None:
        if self._idle:
            self._send(self._idle.pop(), request, intended_s, now_s)
            return
        self._pending.append((intended_s, request))
        if self._open < self.config.max_connections:
            self._spawn_connect()

    def _send(self, conn: _Connection, request: bytes, intended_s: float, now_s: float) -> None:
        if now_s - intended_s > self.config.lag_threshold_s:
            self._counts.late_sends += 1
        self._counts.sent += 1
        self._busy.add(conn)
        conn.send(request, intended_s)

    # -- connections --------------------------------------------------------------------------

    def _spawn_connect(self) -> None:
        task = asyncio.create_task(self._connect())
        self._connect_tasks.add(task)
        task.add_done_callback(self._connect_tasks.discard)

    async def _connect(self) -> None:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(
                lambda: _Connection(self), self.config.host, self.config.port
            )
        except OSError:
            self._open -= 1
            if self._pending:  # the request this connection was opened for fails
                intended, _ = self._pending.popleft()
                self._finish_error(intended, transport=True)
            return
        self._free(conn)

    def _free(self, conn: _Connection) -> None:
        if conn.closed:
            return
        if self._pending:
            intended, request = self._pending.popleft()
            self._send(conn, request, intended, time.monotonic())
        else:
            self._idle.append(conn)

    def _responded(self, conn: _Connection, status: int, keep_alive: bool) -> None:
        now = time.monotonic()
        intended = conn.intended_s
        conn.intended_s = -1.0
        self._busy.discard(conn)
        self._hist.record_s(now - intended)
        counts = self._counts
        if 200 <= status < 300:
            counts.ok += 1
        else:
            counts.non_2xx += 1
            counts.non_2xx_statuses[status] = counts.non_2xx_statuses.get(status, 0) + 1
        if now > counts.last_done_s:
            counts.last_done_s = now
        if keep_alive:
            self._free(conn)
        else:
            conn.abort()
        self._check_done()

    def _failed(self, conn: _Connection) -> None:
        if conn.intended_s >= 0:
            intended = conn.intended_s
            conn.intended_s = -1.0
            self._busy.discard(conn)
            self._finish_error(intended, transport=True)

    def _lost(self, conn: _Connection) -> None:
        self._open -= 1
        self._failed(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if self._pending and self._open < self.config.max_connections:
            self._spawn_connect()

    # -- failures and timeouts ----------------------------------------------------------------

    def _finish_error(self, intended_s: float, *, transport: bool) -> None:
        now = time.monotonic()
        self._hist.record_s(now - intended_s)
        if transport:
            self._counts.transport_errors += 1
        else:
            self._counts.timeouts += 1
        if now > self._counts.last_done_s:
            self._counts.last_done_s = now
        self._check_done()

    def _expire(self, now_s: float, *, force: bool = False) -> None:
        """Time out requests older than the timeout (every outstanding one when ``force``)."""
        limit = self.config.timeout_s
        for conn in list(self._busy):
            if force or now_s - conn.intended_s > limit:
                intended = conn.intended_s
                conn.intended_s = -1.0
                self._busy.discard(conn)
                conn.abort()
                self._finish_error(intended, transport=False)
        while self._pending and (force or now_s - self._pending[0][0] > limit):
            intended, _ = self._pending.popleft()
            self._finish_error(intended, transport=False)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            self._expire(time.monotonic())

    def _check_done(self) -> None:
        if self._counts.finished >= self._counts.scheduled:
            self._done.set()


def run_generator(config: GeneratorConfig) -> dict[str, Any]:
    """Process entry point: run one step on a fresh (uvloop, when installed) event loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        return asyncio.run(_run(config))
    return uvloop.run(_run(config))


async def _run(config: GeneratorConfig) -> dict[str, Any]:
    return (await OpenLoopGenerator(config).run()).to_dict()


def merge_results(results: Sequence[GeneratorResult]) -> tuple[Counts, LatencyHistogram]:
    counts = Counts()
    for item in results:
        counts = counts.merge(item.counts)
    return counts, LatencyHistogram.merged([r.histogram for r in results])
