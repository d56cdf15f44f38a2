"""Many streams at once (`kit/eventstore/batch.py`, ADR 0073), on real SQLite and PostgreSQL: one
load for a batch's streams, one append for all of them, a stream that moved on reported as a
conflict with nothing of it written while the others commit."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import cast

import pytest

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.eventstore import AggregateRepository, EventStore, NewEvent
from mercato.kit.eventstore.batch import StreamAppend, append_streams, load_streams
from mercato.kit.storage import Database
from tests.integration.eventstore_support import Counter, event_store_database, evt, stream
from tests.integration.statement_budget import counting


class BatchContract:
    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError

    @pytest.fixture
    async def db(self, url: str) -> AsyncIterator[Database]:
        async with event_store_database(url, pool_size=5) as database:
            yield database

    async def test_one_append_for_many_streams_reports_the_stream_that_moved_on(
        self, db: Database, clock: ManualClock
    ) -> None:
        store = EventStore(clock=clock)
        fresh, behind, ahead = stream(), stream(), stream()
        async with db.write() as conn:
            await store.append(conn, behind, [evt(1)], expected_version=0)
            await store.append(conn, ahead, [evt(1), evt(2)], expected_version=0)
            await store.save_snapshot(conn, ahead, version=1, state={"n": 1})
        async with db.write() as conn:
            states = await load_streams(store, conn, [fresh, behind, ahead], lock_for_append=True)
            assert [states[s].version for s in (fresh, behind, ahead)] == [0, 1, 2]
            # The snapshot at 1 and the one event after it.
            assert states[ahead].snapshot is not None
            assert states[ahead].snapshot.state == {"n": 1}
            assert [e.version for e in states[ahead].events] == [2]
            assert [e.data for e in states[behind].events] == [{"n": 1}]
            outcome = await append_streams(
                store,
                conn,
                [
                    StreamAppend(fresh, [evt(1), evt(2)], 0),
                    StreamAppend(behind, [evt(2)], 1),
                    # Decided on version 1, but the stream is at 2: a conflict, nothing written.
                    StreamAppend(ahead, [evt(9), evt(10)], 1),
                ],
                now=clock.now(),
                locked=True,
            )
        assert outcome.conflicts == {ahead}
        assert [e.version for e in outcome.recorded[fresh]] == [1, 2]
        assert [e.version for e in outcome.recorded[behind]] == [2]
        async with db.read() as conn:
            for stream_id, versions in ((fresh, [1, 2]), (behind, [1, 2]), (ahead, [1, 2])):
                loaded = await store.load(conn, stream_id)
                assert [e.version for e in loaded] == versions
            # The log grows in position order within a stream too.
            positions = [e.position for e in await store.load(conn, fresh)]
            assert positions == sorted(positions)
            assert [e.metadata for e in await store.load(conn, fresh)] == [{"source": "tests"}] * 2

    async def test_load_many_and_save_many_agree_with_load_and_save(
        self, db: Database, clock: ManualClock
    ) -> None:
        repo = AggregateRepository(EventStore(clock=clock), Counter, snapshot_every=2)
        ids = [uuid.uuid4().hex for _ in range(3)]
        for round_ in range(4):
            async with db.write() as conn:
                counters = await repo.load_many(conn, ids, lock_for_append=True)
                changes = []
                for n, counter_id in enumerate(ids):
                    counter = counters[counter_id]
                    for _ in range(n + 1):
                        counter.increment(round_ + 1)
                    changes.append((counter, [{"round": round_}] * (n + 1)))
                assert await repo.save_many(conn, changes, now=clock.now(), locked=True) == set()
        async with db.read() as conn:
            many = await repo.load_many(conn, ids)
            for n, counter_id in enumerate(ids):
                one = await repo.load(conn, counter_id)
                replayed = await repo.replay(conn, counter_id)
                assert (many[counter_id].version, many[counter_id].total) == (one.version, one.total)
                assert (one.version, one.total) == (replayed.version, replayed.total)
                assert one.version == 4 * (n + 1)
                assert one.total == (n + 1) * (1 + 2 + 3 + 4)
                snapshot = await EventStore().latest_snapshot(conn, repo.stream_id(counter_id))
                assert snapshot is not None
                assert snapshot.version == one.version

    async def test_a_batch_of_many_streams_is_two_statements_on_postgresql(
        self, db: Database, clock: ManualClock
    ) -> None:
        if db.dialect != "postgresql":
            pytest.skip("SQLite appends stream by stream (one statement each)")
        store = EventStore(clock=clock)
        ids = [stream() for _ in range(20)]
        with counting(cast(Container, SimpleNamespace(db=db))) as tally:
            async with db.write() as conn:
                states = await load_streams(store, conn, ids, lock_for_append=True)
                await append_streams(
                    store,
                    conn,
                    [StreamAppend(s, [NewEvent("happened", {"n": 1})], states[s].version) for s in ids],
                    now=clock.now(),
                    locked=True,
                )
        assert (len(tally.statements), tally.transactions) == (2, 1), tally.report()


class TestSqliteBatch(BatchContract):
    @pytest.fixture
    def url(self, sqlite_url: str) -> str:
        return sqlite_url


class TestPostgresBatch(BatchContract):
    @pytest.fixture
    def url(self, pg_url: str) -> str:
        return pg_url
