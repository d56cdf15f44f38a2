"""Fencing tokens checked by the database in the writer's own transaction (ADR 0041), and the
singleton jobs of the worker gated by a database-lease election (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from prometheus_client import CollectorRegistry
from sqlalchemy import func, insert, select

from mercato.bootstrap import Container
from mercato.kit.clock import ManualClock
from mercato.kit.coordination import (
    FencedOut,
    LeaseElection,
    LeaseStore,
    PrometheusElectionHook,
    Term,
    claim,
    fence,
    fenced_writes,
    leases_table,
    newest_token,
)
from mercato.workers.jobs import PeriodicJob
from mercato.workers.runner import run_pass


async def _marker_rows(container: Container) -> int:
    """Rows the fenced writers inserted (into the leases table: any table would do)."""
    async with container.db.read() as conn:
        count = await conn.scalar(
            select(func.count()).select_from(leases_table).where(leases_table.c.holder == "marker")
        )
    return int(count or 0)


async def _write_marker(container: Container, name: str) -> None:
    now = container.clock.now()
    async with container.db.write() as conn:
        await conn.execute(
            insert(leases_table).values(
                name=name, holder="marker", fencing_token=1, expires_at=now, acquired_at=now
            )
        )


async def test_an_older_token_is_refused_and_its_transaction_rolled_back(container: Container) -> None:
    await claim(container.db, "jobs", 7)
    with fenced_writes("jobs", 7):
        await _write_marker(container, "current-term")  # the same term: applied
    with pytest.raises(FencedOut), fenced_writes("jobs", 6):
        await _write_marker(container, "stale-term")
    assert await _marker_rows(container) == 1
    assert await newest_token(container.db, "jobs") == 7
    with fenced_writes("jobs", 9):  # a newer term moves the token forward as it writes
        await _write_marker(container, "newer-term")
    assert await newest_token(container.db, "jobs") == 9
    with pytest.raises(FencedOut), fenced_writes("jobs", 7):
        await _write_marker(container, "stale-again")
    assert await _marker_rows(container) == 2


async def test_the_comparison_is_in_the_statement_not_the_client(container: Container) -> None:
    """`fence` on a bare connection: no row yet inserts it; an older token matches no row."""
    async with container.db.write() as conn:
        await fence(conn, "bare", 3)
    async with container.db.write() as conn:
        with pytest.raises(FencedOut):
            await fence(conn, "bare", 2)
    assert await newest_token(container.db, "bare") == 3


async def test_unfenced_writes_are_not_checked(container: Container) -> None:
    await claim(container.db, "jobs", 100)
    await _write_marker(container, "outside-any-term")  # not a singleton job's write
    assert await _marker_rows(container) == 1


async def test_a_paused_leader_is_fenced_off_after_a_takeover(
    container: Container, clock: ManualClock
) -> None:
    """Leader A starts a pass, pauses past its lease (the pause falls after its leadership check),
    B is elected and claims a newer token; A wakes and writes: refused, nothing applied."""
    store = LeaseStore(container.db, clock)
    registry = CollectorRegistry()
    hook = PrometheusElectionHook(registry)

    async def on_elected(term: Term) -> None:
        assert term.token is not None
        await claim(container.db, "jobs", term.token)

    a = LeaseElection(store, "jobs", "a", ttl_s=10, clock=clock, hook=hook, on_elected=on_elected)
    b = LeaseElection(store, "jobs", "b", ttl_s=10, clock=clock, on_elected=on_elected)
    await a.step()
    await b.step()
    assert a.term is not None
    assert a.term.token == 1
    assert b.term is None

    paused, resume = asyncio.Event(), asyncio.Event()

    async def sweep() -> int:
        paused.set()
        await resume.wait()  # the "GC pause" between the leadership check and the write
        await _write_marker(container, "sweep")
        return 1

    job = PeriodicJob("sweep", 1.0, sweep, singleton=True)
    pass_of_a = asyncio.create_task(run_pass(job, a))
    await paused.wait()
    clock.advance(11)  # A's lease expires while it is paused
    await b.step()
    assert b.term is not None
    assert b.term.token == 2
    resume.set()
    assert await pass_of_a == 0  # refused: the pass counts nothing
    assert await _marker_rows(container) == 0
    assert registry.get_sample_value("mercato_coordination_fenced_writes_total", {"election": "jobs"}) == 1
    # B's own pass runs and applies; A, a follower now, does not run the job at all.
    resume.set()
    assert await run_pass(job, b) == 1
    assert await run_pass(job, a) == 0
    assert await _marker_rows(container) == 1
    labels = {"election": "jobs", "change": "lost"}
    assert registry.get_sample_value("mercato_coordination_leadership_changes_total", labels) == 1
    assert registry.get_sample_value("mercato_coordination_is_leader", {"election": "jobs"}) == 0


async def test_only_the_leader_runs_a_singleton_and_every_worker_runs_the_rest(
    container: Container, clock: ManualClock
) -> None:
    store = LeaseStore(container.db, clock)
    elections = [LeaseElection(store, "jobs", f"w{i}", ttl_s=10, clock=clock) for i in range(3)]
    for e in elections:
        await e.step()
    runs = {"singleton": 0, "every": 0}

    async def singleton() -> int:
        runs["singleton"] += 1
        return 0

    async def every() -> int:
        runs["every"] += 1
        return 0

    for e in elections:
        await run_pass(PeriodicJob("s", 1.0, singleton, singleton=True), e)
        await run_pass(PeriodicJob("e", 1.0, every), e)
    assert runs == {"singleton": 1, "every": 3}
    leaders = [e.holder for e in elections if e.term is not None]
    assert leaders == ["w0"]
    # The leader renews within its TTL and keeps its term; expired, the next campaign wins.
    clock.advance(5)
    await elections[0].step()
    assert elections[0].term is not None
    clock.advance(timedelta(seconds=11).total_seconds())
    await elections[1].step()
    assert elections[0].term is None
    assert elections[1].term is not None
    assert elections[1].term.token == 2
