"""The open-loop checkout generator: ``PUT`` a cart line, then ``POST /v1/checkout``, per slot.

It is `mercato.bench.client`'s generator with a two-request unit of work: checkout ``i`` is due at
its slot in the `Timetable` whatever happened to earlier ones; it takes a pooled keep-alive
connection (waiting on the clock for one when all are busy), sends the PUT, and when that answers
2xx sends the POST on the same connection. Customers rotate (checkout ``i`` is customer
``(first_customer + i) % M``, each with its own SKU), so two in-flight checkouts never share a cart
as long as ``M`` exceeds the number of checkouts in flight.

The same pattern against the bare baseline (``mode="bare"``: both requests are ``GET /bare``)
measures what the client and HTTP alone cost at the same rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from mercato.bench.client import ALLOWED_HOST, ResponseParser
from mercato.bench.stats import Counts, LatencyHistogram
from mercato.bench.timetable import Timetable

_SWEEP_INTERVAL_S = 0.05
_MIN_SLEEP_S = 0.001
_BODY_PUT = b'{"quantity":1}'
_BODY_POST = b"{}"


@dataclass(frozen=True, slots=True)
class CheckoutLoad:
    """One step's schedule and the accounts it uses. Picklable: it crosses into the generator process."""

    port: int
    rate_per_s: float
    duration_s: float
    t0_s: float  # time.monotonic() of the first slot (system-wide on Linux)
    tag: str  # request ids are f"{tag}-{i}"
    tokens: tuple[str, ...] = ()
    skus: tuple[str, ...] = ()  # skus[k] is customer k's line
    first_customer: int = 0
    mode: str = "checkout"  # checkout | bare
    bare_path: str = "/bare"
    host: str = ALLOWED_HOST
    max_connections: int = 256
    warm_connections: int = 16
    timeout_s: float = 5.0
    lag_threshold_s: float = 0.005

    def __post_init__(self) -> None:
        if self.host != ALLOWED_HOST:
            raise ValueError(f"the load generator only targets {ALLOWED_HOST}, not {self.host!r}")
        if self.mode not in ("checkout", "bare"):
            raise ValueError("mode is checkout or bare")
        if self.mode == "checkout" and (not self.tokens or len(self.tokens) != len(self.skus)):
            raise ValueError("a checkout load needs one token and one SKU per customer")
        if self.max_connections < 1 or not 0 <= self.warm_connections <= self.max_connections:
            raise ValueError("need max_connections >= 1 and 0 <= warm_connections <= max_connections")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")

    def timetable(self) -> Timetable:
        return Timetable.for_run(t0_s=self.t0_s, rate_per_s=self.rate_per_s, duration_s=self.duration_s)

    def requests(self, index: int) -> tuple[bytes, bytes]:
        """The two requests of checkout ``index``."""
        host = f"{self.host}:{self.port}"
        if self.mode == "bare":
            get = f"GET {self.bare_path} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n\r\n"
            raw = get.encode("latin-1")
            return raw, raw
        customer = (self.first_customer + index) % len(self.tokens)
        auth = f"Authorization: Bearer {self.tokens[customer]}\r\n"
        rid = f"{self.tag}-{index}"
        put = (
            f"PUT /v1/carts/me/items/{self.skus[customer]} HTTP/1.1\r\nHost: {host}\r\n{auth}"
            f"X-Request-ID: {rid}.cart\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(_BODY_PUT)}\r\n\r\n"
        ).encode("latin-1") + _BODY_PUT
        post = (
            f"POST /v1/checkout HTTP/1.1\r\nHost: {host}\r\n{auth}X-Request-ID: {rid}\r\n"
            f"Idempotency-Key: {rid}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(_BODY_POST)}\r\n\r\n"
        ).encode("latin-1") + _BODY_POST
        return put, post


@dataclass(slots=True)
class CheckoutLoadResult:
    counts: Counts  # per checkout (ok: the second request answered 2xx)
    accept: str  # encoded histograms: slot -> second response
    second: str  # second request sent -> its response
    accepted: dict[int, float]  # checkout index -> intended time as wall-clock seconds

    def to_dict(self) -> dict[str, Any]:
        return {
            "counts": self.counts.to_dict(),
            "accept": self.accept,
            "second": self.second,
            "accepted": self.accepted,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CheckoutLoadResult:
        return cls(
            counts=Counts.from_dict(data["counts"]),
            accept=str(data["accept"]),
            second=str(data["second"]),
            accepted={int(k): float(v) for k, v in data["accepted"].items()},
        )


class _Conn(asyncio.Protocol):
    """One keep-alive connection carrying one checkout (two requests) at a time."""

    def __init__(self, gen: CheckoutGenerator) -> None:
        self.gen = gen
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.index = -1  # < 0: idle
        self.intended_s = 0.0
        self.second_sent_s = 0.0
        self.pending_second: bytes | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def start(self, index: int, intended_s: float, first: bytes, second: bytes) -> None:
        self.index, self.intended_s, self.pending_second = index, intended_s, second
        assert self.transport is not None
        self.transport.write(first)

    def data_received(self, data: bytes) -> None:
        if self.index < 0:
            return
        try:
            done = self.parser.feed(data)
        except ValueError:
            self.gen._error(self, transport=True)
            self.abort()
            return
        if not done:
            return
        status, keep_alive = self.parser.status, self.parser.keep_alive
        self.parser.reset()
        second = self.pending_second
        if second is not None and 200 <= status < 300 and keep_alive:
            self.pending_second = None
            self.second_sent_s = time.monotonic()
            assert self.transport is not None
            self.transport.write(second)
            return
        self.gen._finished(self, status, second is None, keep_alive)

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.gen._lost(self)


class CheckoutGenerator:
    """Runs one `CheckoutLoad` to completion in the running event loop."""

    def __init__(self, load: CheckoutLoad) -> None:
        self.load = load
        self.timetable = load.timetable()
        self._idle: list[_Conn] = []
        self._busy: set[_Conn] = set()
        self._pending: deque[tuple[int, float]] = deque()
        self._open = 0
        self._accept = LatencyHistogram()
        self._second = LatencyHistogram()
        self._counts = Counts(scheduled=self.timetable.count, first_due_s=self.timetable.t0_s)
        self._accepted: dict[int, float] = {}
        # Monotonic -> wall clock, to compare intended times with the database's timestamps.
        self._wall_offset = time.time() - time.monotonic()
        self._done = asyncio.Event()
        self._connect_tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> CheckoutLoadResult:
        load, tt = self.load, self.timetable
        await asyncio.gather(*(self._connect() for _ in range(min(load.warm_connections, tt.count))))
        cpu0, wall0 = time.process_time(), time.monotonic()
        sweeper = asyncio.create_task(self._sweep())
        try:
            await self._schedule()
            self._check_done()
            remaining = tt.end_s + load.timeout_s + 2 * _SWEEP_INTERVAL_S - time.monotonic()
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
            self._counts.cpu_s = time.process_time() - cpu0
            self._counts.wall_s = time.monotonic() - wall0
        return CheckoutLoadResult(
            counts=self._counts,
            accept=self._accept.encode(),
            second=self._second.encode(),
            accepted=self._accepted,
        )

    async def _schedule(self) -> None:
        tt, counts, threshold = self.timetable, self._counts, self.load.lag_threshold_s
        j = 0
        while j < tt.count:
            now = time.monotonic()
            upto = tt.due_by(now, j)
            while j < upto:
                intended = tt.due_s(j)
                lag = now - intended
                counts.max_dispatch_lag_s = max(counts.max_dispatch_lag_s, lag)
                if lag > threshold:
                    counts.late_dispatches += 1
                self._dispatch(j, intended, now)
                j += 1
            if j < tt.count:
                # Timers tick in whole milliseconds (see mercato.bench.client): sleep at least one.
                await asyncio.sleep(max(tt.due_s(j) - time.monotonic(), _MIN_SLEEP_S))

    def _dispatch(self, index: int, intended_s: float, now_s: float) -> None:
        if self._idle:
            self._start(self._idle.pop(), index, intended_s, now_s)
            return
        self._pending.append((index, intended_s))
        if self._open < self.load.max_connections:
            task = asyncio.create_task(self._connect())
            self._connect_tasks.add(task)
            task.add_done_callback(self._connect_tasks.discard)

    def _start(self, conn: _Conn, index: int, intended_s: float, now_s: float) -> None:
        if now_s - intended_s > self.load.lag_threshold_s:
            self._counts.late_sends += 1
        self._counts.sent += 1
        self._busy.add(conn)
        first, second = self.load.requests(index)
        conn.start(index, intended_s, first, second)

    async def _connect(self) -> None:
        self._open += 1
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(lambda: _Conn(self), self.load.host, self.load.port)
        except OSError:
            self._open -= 1
            if self._pending:
                _, intended = self._pending.popleft()
                self._record_error(intended, transport=True)
            return
        self._free(conn)

    def _free(self, conn: _Conn) -> None:
        if conn.closed:
            return
        if self._pending:
            index, intended = self._pending.popleft()
            self._start(conn, index, intended, time.monotonic())
        else:
            self._idle.append(conn)

    def _finished(self, conn: _Conn, status: int, second_done: bool, keep_alive: bool) -> None:
        now = time.monotonic()
        index, intended = conn.index, conn.intended_s
        conn.index = -1
        self._busy.discard(conn)
        counts = self._counts
        if second_done and 200 <= status < 300:
            counts.ok += 1
            self._accept.record_s(now - intended)
            self._second.record_s(now - conn.second_sent_s)
            self._accepted[index] = intended + self._wall_offset
        else:
            counts.non_2xx += 1
            counts.non_2xx_statuses[status] = counts.non_2xx_statuses.get(status, 0) + 1
        counts.last_done_s = max(counts.last_done_s, now)
        if keep_alive:
            self._free(conn)
        else:
            conn.abort()
        self._check_done()

    def _error(self, conn: _Conn, *, transport: bool) -> None:
        if conn.index >= 0:
            intended = conn.intended_s
            conn.index = -1
            self._busy.discard(conn)
            self._record_error(intended, transport=transport)

    def _lost(self, conn: _Conn) -> None:
        self._open -= 1
        self._error(conn, transport=True)
        if conn in self._idle:
            self._idle.remove(conn)

    def _record_error(self, intended_s: float, *, transport: bool) -> None:
        now = time.monotonic()
        if transport:
            self._counts.transport_errors += 1
        else:
            self._counts.timeouts += 1
        self._counts.last_done_s = max(self._counts.last_done_s, now)
        self._check_done()

    def _expire(self, now_s: float, *, force: bool = False) -> None:
        limit = self.load.timeout_s
        for conn in list(self._busy):
            if force or now_s - conn.intended_s > limit:
                self._error(conn, transport=False)
                conn.abort()
        while self._pending and (force or now_s - self._pending[0][1] > limit):
            _, intended = self._pending.popleft()
            self._record_error(intended, transport=False)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL_S)
            self._expire(time.monotonic())

    def _check_done(self) -> None:
        if self._counts.finished >= self._counts.scheduled:
            self._done.set()


def warm() -> bool:
    """Run once in a fresh generator process so its start-up (spawn, imports) precedes any slot."""
    return True


def run_checkout_load(load: CheckoutLoad) -> dict[str, Any]:
    """Process entry point: run one step on a fresh (uvloop, when installed) event loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings uvloop
        return asyncio.run(_run(load))
    return uvloop.run(_run(load))


async def _run(load: CheckoutLoad) -> dict[str, Any]:
    return (await CheckoutGenerator(load).run()).to_dict()
