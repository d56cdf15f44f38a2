"""`mercato lab leader` end to end (3-member etcd, private PostgreSQL, SIGSTOP/SIGCONT): about a
minute on this machine, so behind -m slow; the default suite covers the same fencing on a database
lease election (test_fencing.py) and the etcd election itself (test_etcd_election.py)."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from mercato.lab.leader import LeaderConfig, run_leader_lab

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """A lab run of real processes: behind the marker (`pytest -m slow`), like the other drills."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("run it with -m slow (or its `mercato lab` command)")


async def test_a_paused_leader_is_fenced_off_and_the_election_survives_a_member() -> None:
    out = Path("/tmp") / f"hel_lab_leader_{uuid.uuid4().hex[:8]}"  # outside pytest's private tmp
    try:
        report = await run_leader_lab(
            LeaderConfig(
                period_s=0.5, work_s=0.2, control_periods=3, steady_periods=3, after_periods=4, out=out
            )
        )
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert report.control_runs_per_period > 1  # without election every node runs the job
    assert report.stale_fenced >= 1
    assert report.stale_applied == 0
    assert report.duplicate_periods == 0
    assert report.takeover_s is not None
    assert report.new_token > report.paused_token
    assert report.ticks_after_member_kill >= 2
    assert report.held
