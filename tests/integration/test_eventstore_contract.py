"""The event store's contract: one suite, run on real SQLite and PostgreSQL.

`EventStoreContract` holds the tests; a backend subclasses it and provides the `url` fixture.
Covers append/load, the expected-version guard (a stale check and the unique-constraint backstop),
two real concurrent appends of one version (exactly one wins), the global log, snapshots, the
repository (snapshot every N, load == full replay, hypothesis over random valid command sequences)
and the conflict retry (reload + re-decide under real contention).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import event, insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import ManualClock
from mercato.kit.eventstore import (
    AggregateRepository,
    ConcurrencyConflict,
    EventStore,
    NewEvent,
    events,
    retry_on_conflict,
)
from mercato.kit.eventstore.store import _CHECKED_INSERT_ONE
from mercato.kit.storage import Database, create_database
from mercato.kit.storage.statements import Statements, add_driver_listener
from mercato.shop.payments.model import LedgerRuleBroken, PaymentLedger
from tests.integration.eventstore_support import Counter, event_store_database, evt, stream


class StaleCheckStore(EventStore):
    """A writer whose version check saw an old version (no lock, a stale replica): only the unique
    (stream_id, version) constraint stands between it and a forked stream."""

    async def stream_version(self, conn: AsyncConnection, stream_id: str) -> int:
        return 0


async def version_of(db: Database, stream_id: str) -> int:
    async with db.read() as conn:
        return await EventStore().stream_version(conn, stream_id)


class EventStoreContract:
    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("a backend subclass provides the database url")

    @pytest.fixture
    async def db(self, url: str) -> AsyncIterator[Database]:
        async with event_store_database(url, pool_size=10) as database:
            yield database

    @pytest.fixture
    def store(self, clock: ManualClock) -> EventStore:
        return EventStore(clock=clock)

    async def test_append_then_load_in_version_order(self, db: Database, store: EventStore) -> None:
        s = stream()
        async with db.write() as conn:
            first = await store.append(conn, s, [evt(1), evt(2)], expected_version=0)
            more = await store.append(conn, s, [evt(3)], expected_version=2)
        assert [e.version for e in first + more] == [1, 2, 3]
        assert [e.position for e in first + more] == sorted(e.position for e in first + more)
        async with db.read() as conn:
            loaded = await store.load(conn, s)
            tail = await store.load(conn, s, after_version=2)
            assert await store.stream_version(conn, s) == 3
            assert await store.load(conn, stream()) == []
        assert loaded == first + more
        assert [(e.type, e.data, e.metadata) for e in loaded] == [
            ("happened", {"n": n}, {"source": "tests"}) for n in (1, 2, 3)
        ]
        assert [e.data["n"] for e in tail] == [3]
        assert loaded[0].recorded_at.tzinfo is not None

    async def test_wrong_expected_version_conflicts_and_keeps_the_transaction(
        self, db: Database, store: EventStore
    ) -> None:
        s, other = stream(), stream()
        async with db.write() as conn:
            await store.append(conn, s, [evt(1), evt(2)], expected_version=0)
        for done, stale in enumerate((0, 1, 3)):
            async with db.write() as conn:
                with pytest.raises(ConcurrencyConflict) as caught:
                    await store.append(conn, s, [evt(9)], expected_version=stale)
                assert (caught.value.expected_version, caught.value.actual_version) == (stale, 2)
                # The same transaction goes on and commits its other work.
                await store.append(conn, other, [evt(stale)], expected_version=done)
        assert await version_of(db, s) == 2
        assert await version_of(db, other) == 3
        async with db.write() as conn:
            assert await store.append(conn, s, [], expected_version=7) == []
            with pytest.raises(ValueError):
                await store.append(conn, s, [evt(1)], expected_version=-1)

    async def test_unique_version_is_the_backstop_when_the_check_was_stale(
        self, db: Database, clock: ManualClock
    ) -> None:
        s, other = stream(), stream()
        async with db.write() as conn:
            await EventStore(clock=clock).append(conn, s, [evt(1)], expected_version=0)
        async with db.write() as conn:
            with pytest.raises(ConcurrencyConflict) as caught:
                await StaleCheckStore(clock=clock).append(conn, s, [evt(2)], expected_version=0)
            if db.dialect == "sqlite":
                # The check is a subquery of the INSERT itself: a stale read elsewhere cannot fool it.
                assert caught.value.actual_version == 1
            else:
                assert caught.value.actual_version is None
            # Only the failed insert was undone.
            await EventStore(clock=clock).append(conn, other, [evt(1)], expected_version=0)
        assert (await version_of(db, s), await version_of(db, other)) == (1, 1)
        row = {
            "stream_id": s,
            "version": 1,
            "type": "x",
            "data": {},
            "metadata": {},
            "recorded_at": clock.now(),
        }
        async with db.write() as conn:
            with pytest.raises(IntegrityError):
                await conn.execute(insert(events).values(**row))

    async def test_a_failed_append_writes_none_of_its_events_and_keeps_the_transaction(
        self, db: Database, store: EventStore
    ) -> None:
        s, other = stream(), stream()
        broken = NewEvent(None, {"n": 2})  # type: ignore[arg-type]  # NOT NULL: the second row fails
        async with db.write() as conn:
            with pytest.raises(IntegrityError):
                await store.append(conn, s, [evt(1), broken], expected_version=0)
            await store.append(conn, other, [evt(1)], expected_version=0)
        assert (await version_of(db, s), await version_of(db, other)) == (0, 1)

    async def test_a_one_event_append_failing_a_constraint_is_no_conflict(
        self, db: Database, store: EventStore
    ) -> None:
        """A one-event append's version check fails as a NOT NULL of its version on SQLite (ADR
        0069): any other NOT NULL column is the caller's error, not a concurrency conflict."""
        s, other = stream(), stream()
        broken = NewEvent(None, {"n": 1})  # type: ignore[arg-type]
        async with db.write() as conn:
            with pytest.raises(IntegrityError):
                await store.append(conn, s, [broken], expected_version=0)
            await store.append(conn, other, [evt(1)], expected_version=0)
        assert (await version_of(db, s), await version_of(db, other)) == (0, 1)

    async def test_an_append_on_a_connection_not_yet_in_a_transaction_rolls_back_with_it(
        self, db: Database, store: EventStore
    ) -> None:
        s = stream()
        async with db.engine.connect() as conn:
            await store.append(conn, s, [evt(1)], expected_version=0)
            await conn.rollback()
        assert await version_of(db, s) == 0

    async def test_concurrent_appends_with_one_expected_version_let_exactly_one_win(
        self, db: Database, store: EventStore
    ) -> None:
        s = stream()
        async with db.write() as conn:
            await store.append(conn, s, [evt(0)], expected_version=0)
        writers = 6
        decided = asyncio.Barrier(writers)

        async def writer(n: int) -> bool:
            # Each decides on what it read, then all append at once with that version.
            expected = await version_of(db, s)
            await decided.wait()
            try:
                async with db.write() as conn:
                    await store.append(conn, s, [evt(n), evt(n)], expected_version=expected)
            except ConcurrencyConflict:
                return False
            return True

        outcomes = await asyncio.gather(*(writer(n) for n in range(writers)))
        assert outcomes.count(True) == 1
        async with db.read() as conn:
            loaded = await store.load(conn, s)
        assert [e.version for e in loaded] == [1, 2, 3]
        winner = next(i for i, won in enumerate(outcomes) if won)
        assert [e.data["n"] for e in loaded[1:]] == [winner, winner]

    async def test_read_all_pages_every_stream_in_position_order(
        self, db: Database, store: EventStore
    ) -> None:
        a, b = stream(), stream()
        async with db.write() as conn:
            start = await store.read_all(conn, after_position=0, limit=10_000)
            after = start[-1].position if start else 0
            await store.append(conn, a, [evt(1)], expected_version=0)
            await store.append(conn, b, [evt(2), evt(3)], expected_version=0)
            await store.append(conn, a, [evt(4)], expected_version=1)
        seen: list[int] = []
        position = after
        async with db.read() as conn:
            while page := await store.read_all(conn, after_position=position, limit=3):
                seen.extend(e.data["n"] for e in page)
                assert [e.position for e in page] == sorted(e.position for e in page)
                position = page[-1].position
            with pytest.raises(ValueError):
                await store.read_all(conn, after_position=0, limit=0)
        assert seen == [1, 2, 3, 4]

    async def test_snapshots_latest_wins_and_a_version_is_kept_once(
        self, db: Database, store: EventStore
    ) -> None:
        s = stream()
        async with db.write() as conn:
            assert await store.latest_snapshot(conn, s) is None
            await store.save_snapshot(conn, s, version=3, state={"total": 3})
            await store.save_snapshot(conn, s, version=6, state={"total": 6})
            await store.save_snapshot(conn, s, version=6, state={"total": -1})
        async with db.read() as conn:
            latest = await store.latest_snapshot(conn, s)
        assert latest is not None
        assert (latest.version, latest.state) == (6, {"total": 6})

    async def test_repository_snapshots_every_n_and_load_equals_replay(
        self, db: Database, store: EventStore
    ) -> None:
        repo = AggregateRepository(store, Counter, snapshot_every=3)
        counter_id = uuid.uuid4().hex
        for batch in (1, 1, 2, 3, 1):
            async with db.write() as conn:
                counter = await repo.load(conn, counter_id)
                for _ in range(batch):
                    counter.increment(2)
                saved = await repo.save(conn, counter)
                assert len(saved) == batch
                assert (counter.saved_version, counter.pending) == (counter.version, [])
        async with db.read() as conn:
            snapshot = await store.latest_snapshot(conn, repo.stream_id(counter_id))
            loaded = await repo.load(conn, counter_id)
            replayed = await repo.replay(conn, counter_id)
        # Versions went 1, 2, 4, 7, 8: crossing 3 at 4 and 6 at 7.
        assert snapshot is not None
        assert (snapshot.version, snapshot.state) == (7, {"total": 14})
        assert (loaded.version, loaded.total) == (replayed.version, replayed.total) == (8, 16)

    async def test_retry_on_conflict_reloads_and_decides_again(self, db: Database, store: EventStore) -> None:
        repo = AggregateRepository(store, Counter, snapshot_every=5)
        counter_id = uuid.uuid4().hex
        Counter.limit = 10

        async def increment(conn: AsyncConnection) -> bool:
            counter = await repo.load(conn, counter_id)
            try:
                counter.increment(1)
            except ValueError:
                return False  # the re-decision: the limit is reached, nothing to write
            await asyncio.sleep(0)  # let the others load the same version
            await repo.save(conn, counter)
            return True

        try:
            results = await asyncio.gather(
                *(retry_on_conflict(db, increment, max_attempts=50, base_delay_s=0.002) for _ in range(12))
            )
            assert results.count(True) == 10
            async with db.write() as conn:
                # Inside a caller's transaction each attempt is a savepoint; at the limit it decides
                # to write nothing.
                assert await retry_on_conflict(db, increment, conn=conn) is False
        finally:
            Counter.limit = 1_000
        async with db.read() as conn:
            assert (await repo.replay(conn, counter_id)).total == 10

    def test_load_equals_replay_for_random_valid_ledgers(self, url: str) -> None:
        with asyncio.Runner() as runner:
            database = create_database(url, pool_size=2, max_overflow=0)
            try:
                check_ledgers(runner, database)
            finally:
                runner.run(database.dispose())


COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(["authorize", "capture", "void", "refund", "save"]),
        st.integers(min_value=1, max_value=5_000),
        st.integers(min_value=0, max_value=3),
    ),
    max_size=25,
)


def check_ledgers(runner: asyncio.Runner, database: Database) -> None:
    @settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(commands=COMMANDS, snapshot_every=st.integers(min_value=1, max_value=4))
    def prop(commands: list[tuple[str, int, int]], snapshot_every: int) -> None:
        runner.run(ledger_round_trip(database, commands, snapshot_every))

    prop()


async def ledger_round_trip(
    database: Database, commands: list[tuple[str, int, int]], snapshot_every: int
) -> None:
    """Apply random commands (dropping those a rule refuses, so the sequence is valid), saving at the
    "save" steps; the snapshot path and the full replay must give the same ledger."""
    repo = AggregateRepository(EventStore(), PaymentLedger, snapshot_every=snapshot_every)
    order_id = uuid.uuid4().hex
    ledger = PaymentLedger(order_id)
    for name, amount, pick in commands:
        try:
            if name == "authorize":
                ledger.authorize(authorization_id=f"a{pick % 2}", amount_minor=amount, currency="EUR")
            elif name == "capture":
                ledger.capture(
                    authorization_id="a0", capture_id=f"c{pick}", amount_minor=amount, currency="EUR"
                )
            elif name == "void":
                ledger.void(authorization_id="a0")
            elif name == "refund":
                ledger.refund(capture_id=f"c{pick}", amount_minor=amount, currency="EUR")
        except LedgerRuleBroken:
            continue
        if name == "save":
            async with database.write() as conn:
                await repo.save(conn, ledger)
    async with database.write() as conn:
        await repo.save(conn, ledger)
    async with database.read() as conn:
        loaded = await repo.load(conn, order_id)
        replayed = await repo.replay(conn, order_id)
    assert loaded.version == replayed.version == ledger.version
    assert loaded.snapshot() == replayed.snapshot() == ledger.snapshot()
    assert loaded.status == replayed.status == ledger.status
    assert 0 <= ledger.refunded_minor <= ledger.captured_minor <= ledger.authorized_minor or ledger.voided


class TestSqliteEventStore(EventStoreContract):
    @pytest.fixture
    def url(self, sqlite_url: str) -> str:
        return sqlite_url

    async def test_an_append_is_one_statement_on_the_driver_and_the_begin_is_no_cursor_execute(
        self, db: Database, store: EventStore
    ) -> None:
        """Each SQLAlchemy cursor execute on aiosqlite is 3-4 hops to its thread, each costing more
        than the statement (ADR 0058): the write transaction and the append must send none."""
        s = stream()
        sent: list[str] = []
        through_sqlalchemy: list[str] = []

        def cursor_execute(_conn: Any, _cursor: Any, sql: str, *_args: Any) -> None:
            through_sqlalchemy.append(sql)

        engine = db.engine.sync_engine
        event.listen(engine, "before_cursor_execute", cursor_execute)
        remove = add_driver_listener(lambda sql: sent.append(sql) if sql else None)
        try:
            async with db.write() as conn:
                recorded = await store.append(conn, s, [evt(1), evt(2)], expected_version=0)
            async with db.write() as conn:
                with pytest.raises(ConcurrencyConflict):
                    await store.append(conn, s, [evt(3)], expected_version=1)
        finally:
            remove()
            event.remove(engine, "before_cursor_execute", cursor_execute)
        assert through_sqlalchemy == []
        # The append, then the conflicting one, then its read of the version it missed.
        assert [sql.split(None, 1)[0] for sql in sent] == ["INSERT", "INSERT", "SELECT"]
        assert [e.version for e in recorded] == [1, 2]
        assert await version_of(db, s) == 2

    async def test_a_one_event_append_builds_no_temporary_table(self, db: Database) -> None:
        """`INSERT … SELECT` reading the table it inserts into runs through a temporary table
        (OpenEphemeral): a third of SQLite's work for a one-event append (ADR 0069). The one-event
        statement is a VALUES row."""
        sql = Statements(db.engine.dialect).get(_CHECKED_INSERT_ONE).sql
        async with db.read() as conn:
            driver = await conn.get_raw_connection()
            plan = await driver.driver_connection.execute_fetchall(  # type: ignore[union-attr]
                f"EXPLAIN {sql}", ["s", "s", 0, 1, "t", "{}", "{}", "2026-01-01 00:00:00.000000"]
            )
        opcodes = [row[1] for row in plan]
        assert "Insert" in opcodes
        assert "OpenEphemeral" not in opcodes


class TestPostgresEventStore(EventStoreContract):
    @pytest.fixture
    def url(self, pg_url: str) -> str:
        return pg_url
