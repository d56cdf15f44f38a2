"""``mercato bench eventstore`` on SQLite: a tiny round, both sides at the durability asked for (ADR 0058)."""

from __future__ import annotations

import pytest

from mercato.bench.eventstore import run_eventstore_bench

pytest.importorskip("eventsourcing")


@pytest.mark.parametrize("synchronous", ["NORMAL", "full"])
async def test_a_tiny_sqlite_round_runs_both_sides_at_one_synchronous(synchronous: str) -> None:
    [result] = await run_eventstore_bench(
        backends=["sqlite"],
        aggregates=3,
        events_per_aggregate=4,
        batch=2,
        pg_admin_dsn="postgresql://unused",
        sqlite_synchronous=synchronous,
    )
    # The run refuses to report unless both sides read this level back from their connections.
    assert (result.backend, result.synchronous, result.events) == ("sqlite", synchronous.upper(), 12)
    assert min(result.ours_append_per_s, result.lib_append_per_s) > 0
    assert min(result.ours_append_cpu_us, result.lib_append_cpu_us) > 0
    assert min(result.ours_replay_per_s, result.lib_replay_per_s) > 0


async def test_a_synchronous_that_would_not_be_equal_durability_is_refused() -> None:
    with pytest.raises(ValueError, match="sqlite_synchronous"):
        await run_eventstore_bench(
            backends=["sqlite"],
            aggregates=1,
            events_per_aggregate=1,
            batch=1,
            pg_admin_dsn="postgresql://unused",
            sqlite_synchronous="OFF",
        )
