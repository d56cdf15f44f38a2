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


async def test_patroni_killed_on_the_primary_fenced_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL of the primary's Patroni with its PostgreSQL going down with it (a supervisor with
    KillMode=control-group, or a watchdog): the leader key expires (≈ ttl), the sync standby is
    promoted, nothing acknowledged is lost; Patroni restarted later rejoins the node as a replica.

    Without the fence (`fence=False`, Patroni's own unit file: KillMode=process) the orphaned
    PostgreSQL refuses nothing but cannot commit (its sync standby follows the new leader), and
    Patroni restarted on it acknowledged 2-3 commits during its first loop before demoting it: those
    are lost (docs/benchmarks.md). That drill is `mercato lab failover --kill patroni`."""
    need_ha_binaries()
    report, _folder = await run_failover(
        FailoverConfig(
            checkouts=16,
            kill_after_checkouts=4,
            drive_s=10.0,
            nats=False,
            kill="patroni",
            fence=True,
            patroni_down_s=20.0,
            out=tmp_path,
        ),
        log=lambda _m: None,
    )
    assert report.new_leader_after_s is not None
    assert report.new_leader_after_s <= 15.0
    assert report.orphan_write_acked is False, report.orphan_write
    assert report.rpo_missing == 0, report.missing_acks
    assert report.rejoined_as_replica
    assert report.violations.get("single_capture") == 0
    assert report.violations.get("terminal_state") == 0
    assert report.checkouts.get("client_status_500", 0) == 0
    assert report.ok
