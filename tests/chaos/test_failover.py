"""The failover drill, short: the primary's PostgreSQL SIGKILLed under checkout load on a 3-node
Patroni cluster (synchronous mode), then a NATS node killed under publish/consume (slow: ~2 min)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mercato.lab.failover import FailoverConfig, run_failover
from tests.integration.ha_support import need_ha_binaries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """A drill of minutes on a whole cluster: behind the marker (`pytest -m slow`), as the brief asks."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a cluster drill of minutes: run it with -m slow (or `mercato lab ...`)")


async def test_failover_drill_promotes_loses_nothing_and_rejoins(tmp_path: Path) -> None:
    need_ha_binaries()
    report, folder = await run_failover(
        FailoverConfig(checkouts=24, kill_after_checkouts=6, drive_s=12.0, nats_messages=600, out=tmp_path),
        log=lambda _m: None,
    )
    assert report.rto_s is not None
    assert report.rto_s <= 15.0
    assert report.rpo_missing == 0
    assert report.violations.get("terminal_state") == 0
    assert report.violations.get("single_capture") == 0
    assert report.checkouts.get("client_status_500", 0) == 0
    assert report.rejoined_as_replica
    assert report.timeline_after == (report.timeline_before or 0) + 1
    assert report.nats.get("lost") == 0
    assert report.nats.get("acked", 0) > 0
    assert report.ok
    assert (folder / "failover.png").exists()
    assert (folder / "report.json").exists()


async def test_patroni_killed_on_the_primary_never_makes_a_second_primary(tmp_path: Path) -> None:
    """SIGKILL of the primary's Patroni only: its PostgreSQL runs on, orphaned, until the leader key
    expires and the sync standby is promoted; a write sent straight to the old primary then is never
    acknowledged (its commit waits for a standby that follows someone else); Patroni restarted by its
    supervisor demotes it and it rejoins; nothing acknowledged is lost."""
    need_ha_binaries()
    report, _folder = await run_failover(
        FailoverConfig(
            checkouts=16,
            kill_after_checkouts=4,
            drive_s=10.0,
            nats=False,
            kill="patroni",
            patroni_down_s=20.0,
            out=tmp_path,
        ),
        log=lambda _m: None,
    )
    assert report.new_leader_after_s is not None
    assert report.orphan_write_acked is False, report.orphan_write
    assert report.rpo_missing == 0
    assert report.rejoined_as_replica
    assert report.violations.get("single_capture") == 0
    assert report.violations.get("terminal_state") == 0
    assert report.checkouts.get("client_status_500", 0) == 0
    assert report.ok
