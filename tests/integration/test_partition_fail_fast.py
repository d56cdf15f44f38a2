"""CP under a partition (guide §34): a primary that stops answering (packets dropped, not refused) is
detected by the reachability probes, and reads of the primary and writes then fail at once as a
503-class outage instead of hanging; it recovers on the first answered probe. The cache in front of
the primary serves stale data and says how stale (`Mercato-Staleness`'s source).

The "partition" here is a TCP proxy in front of the real PostgreSQL that can start dropping
everything silently (it keeps the sockets open and forwards nothing), the way a cut link looks to
the client. `mercato lab partition` does the same with network namespaces and veth pairs."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from mercato.kit.cache import Cache, CacheTtls, MemoryTier, staleness_scope
from mercato.kit.clock import ManualClock
from mercato.kit.storage import Database, create_database
from mercato.kit.storage.outages import classify_outage
from mercato.kit.storage.reachability import DatabaseUnreachable
from mercato.kit.storage.statements import driver_connection


class _Blackholing:
    """A TCP forwarder to `target` that, once `cut`, forwards nothing in either direction."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.link_up = asyncio.Event()
        self.link_up.set()
        self.server: asyncio.Server | None = None
        self.connections = 0  # accepted, in all

    @property
    def cut(self) -> bool:
        return not self.link_up.is_set()

    @cut.setter
    def cut(self, value: bool) -> None:
        if value:
            self.link_up.clear()
        else:
            self.link_up.set()

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.cut:  # a new connection across the cut: accepted by nobody, answered never
            await asyncio.sleep(3600)
        up_reader, up_writer = await asyncio.open_connection(*self.target)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(Exception):
                while data := await src.read(65536):
                    await self.link_up.wait()  # held, never delivered while cut
                    dst.write(data)
                    await dst.drain()

        pumps = {
            asyncio.ensure_future(pump(reader, up_writer)),
            asyncio.ensure_future(pump(up_reader, writer)),
        }
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)  # one side closed: close both
        for w in (writer, up_writer):
            w.close()
        for task in pumps:
            task.cancel()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxied_url(pg_url: str) -> AsyncIterator[tuple[str, _Blackholing]]:
    url = make_url(pg_url)
    proxy = _Blackholing(url.host or "127.0.0.1", url.port or 5432)
    port = await proxy.start()
    yield url.set(host="127.0.0.1", port=port).render_as_string(hide_password=False), proxy
    proxy.cut = False
    await proxy.stop()


async def test_a_silent_primary_is_refused_within_a_second_and_recovers(
    proxied_url: tuple[str, _Blackholing],
) -> None:
    url, proxy = proxied_url
    db = create_database(url, probe_interval_s=0.15, probe_timeout_s=0.3, probe_failures=2)
    try:
        async with db.write() as conn:  # reachable: works, and starts the probes
            await conn.execute(text("SELECT 1"))
        proxy.cut = True
        await asyncio.sleep(1.2)  # ≥ failures × (interval + timeout)
        assert db.reachability is not None
        assert db.reachability.unreachable
        for scope in (db.write, db.read):
            started = time.monotonic()
            with pytest.raises(DatabaseUnreachable) as caught:
                async with scope() as conn:
                    await conn.execute(text("SELECT 1"))
            assert time.monotonic() - started < 1.0
            outage = classify_outage(caught.value)
            assert outage is not None
            assert (outage.dependency, outage.reason) == ("database", "unreachable")
        proxy.cut = False
        for _ in range(50):  # the first answered probe (within 5 s)
            if not db.reachability.unreachable:
                break
            await asyncio.sleep(0.1)
        assert not db.reachability.unreachable
        async with db.write() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        proxy.cut = False
        await db.dispose()


async def test_the_probes_share_one_session_instead_of_connecting_each_time(
    proxied_url: tuple[str, _Blackholing],
) -> None:
    """A connection per probe cost an idle API most of its CPU (~3 ms, four times a second)."""
    url, proxy = proxied_url
    db = create_database(url, probe_interval_s=0.05, probe_timeout_s=0.3, probe_failures=2)
    try:
        async with db.write() as conn:  # starts the probes; the pool opens its own connection
            await conn.execute(text("SELECT 1"))
        await asyncio.sleep(1.0)  # ~20 probes
        assert proxy.connections <= 3, proxy.connections  # the pool's, the probe's (one reopen at most)
        assert db.reachability is not None
        assert not db.reachability.unreachable
    finally:
        await db.dispose()


async def test_the_cache_serves_stale_on_an_unreachable_origin_and_says_how_stale() -> None:
    clock = ManualClock(datetime.now(UTC))  # the memory tier expires entries by the real clock
    cache = Cache(
        "products",
        local=MemoryTier(max_bytes=1 << 20),
        ttls=CacheTtls(fresh_s=2, stale_while_revalidate_s=0, stale_if_error_s=600, local_fresh_s=2),
        clock=clock,
        xfetch=False,
    )

    async def origin() -> bytes:
        return b"v1"

    async def partitioned() -> bytes:
        raise DatabaseUnreachable("the primary database is unreachable")

    with staleness_scope() as fresh:
        assert await cache.get("p", origin) == b"v1"
    assert fresh.staleness_s is None  # from the origin: no header
    clock.advance(9)
    with staleness_scope() as stale:
        assert await cache.get("p", partitioned) == b"v1"
    assert stale.reason == "error"
    assert stale.staleness_s == pytest.approx(7.0)  # 9 s old, fresh for 2: 7 s stale


async def test_a_statement_in_flight_at_the_cut_ends_as_an_outage_within_a_second(
    proxied_url: tuple[str, _Blackholing],
) -> None:
    """The API's defaults (0.25 s / 0.5 s / 2 failures): one silent probe, corroborated by the stuck
    statement's connection (checked out for longer than a probe's timeout), is the verdict, and the
    statement's connection is terminated; it used to wait for the second probe and, past it, for
    TCP. Then the raw driver path, which skips `check()`, is refused at once too."""
    url, proxy = proxied_url
    db = create_database(url, probe_interval_s=0.25, probe_timeout_s=0.5, probe_failures=2)
    try:
        async with db.write() as conn, db.read() as other:  # two pooled connections; starts the probes
            await conn.execute(text("SELECT 1"))
            await other.execute(text("SELECT 1"))

        async def in_flight_at_the_cut() -> None:
            async with db.read() as conn:
                await conn.execute(text("SELECT 1"))  # a pooled connection: ready, then the cut
                proxy.cut = True
                await conn.execute(text("SELECT 2"))

        started = time.monotonic()
        with pytest.raises(Exception) as caught:  # the driver's shape varies; classified below
            await in_flight_at_the_cut()
        elapsed = time.monotonic() - started
        assert elapsed < 1.0, elapsed  # interval + timeout = 0.75 s, plus the loop's slack
        outage = classify_outage(caught.value)
        assert outage is not None, caught.value
        assert outage.dependency == "database"
        assert db.reachability is not None
        assert db.reachability.unreachable
        for _ in range(2):  # the pooled idle connection (closed at checkout), then a new one: refused
            started = time.monotonic()
            with pytest.raises(Exception) as caught:
                await _driver_select(db)
            assert time.monotonic() - started < 0.3, caught.value
            assert classify_outage(caught.value) is not None, caught.value
    finally:
        proxy.cut = False
        await db.dispose()


async def _driver_select(db: Database) -> None:
    async with driver_connection(db) as raw:
        await raw.fetchval("SELECT 1")
