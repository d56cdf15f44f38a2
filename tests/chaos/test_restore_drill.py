"""The disaster-recovery drill on pgBackRest (slow, ~1 min): point-in-time restore to T returns
exactly the rows committed before T; a time before the first backup and a missing WAL segment are
refused with a clear message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mercato.lab.restore import run_restore_drill
from tests.integration.ha_support import need_ha_binaries

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """A drill of minutes on a whole cluster: behind the marker (`pytest -m slow`), as the brief asks."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a cluster drill of minutes: run it with -m slow (or `mercato lab ...`)")


async def test_restore_to_t_returns_exactly_the_rows_before_t(tmp_path: Path) -> None:
    need_ha_binaries()
    if shutil.which("pgbackrest") is None:
        pytest.skip("pgbackrest not installed")
    report = await run_restore_drill(rows=100, out=tmp_path)
    assert report.before_t == 100
    assert report.restored == 100
    assert report.missing_before_t == 0
    assert report.present_after_t == 0
    assert "before the first backup" in report.refused["time_before_first_backup"]
    assert "did not finish recovery" in report.refused["missing_wal"]
    # Put into service: the restored copy became the primary and took a write through the shop's URL.
    assert report.rows_after_adopt == 101
    assert report.replicas_streaming == 2
    assert report.serving_rto_s > report.restore_rto_s
    assert (tmp_path / "report.md").exists()
