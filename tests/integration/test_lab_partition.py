"""`mercato lab partition` end to end (network namespace, veth pairs, `mercato api` inside, a private
PostgreSQL over veth): about a minute, root only, so behind -m slow. The default suite covers the
fail-fast itself with a silent TCP proxy (test_partition_fail_fast.py)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from mercato.lab.partition import PartitionConfig, run_partition

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2"),
]


@pytest.fixture(autouse=True)
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """A lab run of real processes: behind the marker (`pytest -m slow`), like the other drills."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("run it with -m slow (or its `mercato lab` command)")


def test_cp_refuses_fast_ap_serves_stale_and_everything_converges() -> None:
    out = Path("/tmp") / f"hel_lab_partition_{uuid.uuid4().hex[:8]}"
    out.mkdir()
    try:
        report = run_partition(PartitionConfig(partition_s=5, heal_s=10, out=out))
    finally:
        shutil.rmtree(out, ignore_errors=True)
    assert report.cp_after_detection()
    assert report.cp_fast_503 == len(report.cp_after_detection())
    assert all(s.status == 503 for s in report.during("CP"))
    assert report.ap_served_stale == len(report.during("AP")) > 0
    healed = [s.status for s in report.samples if s.phase == "healed" and s.op == "checkout"]
    assert report.orders_after == 1, healed
    assert report.held
