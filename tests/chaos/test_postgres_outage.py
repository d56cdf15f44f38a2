"""PostgreSQL stopped for 10 s under steady load (`mercato lab outage`): 0 answers 500, every failure a 503
with Retry-After, none slower than the request deadline, and the API recovers by itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from mercato.lab.outage import OutageOptions, run_outage

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kill", [False, True], ids=["fast-shutdown", "kill-9"])
def test_a_10_s_postgres_outage_under_load_is_503s_and_recovers(kill: bool, tmp_path: Path) -> None:
    options = OutageOptions(outage_s=10.0, warmup_s=3.0, after_s=6.0, deadline_s=5.0, kill=kill)
    report = run_outage(options, workdir=tmp_path, log=lambda _message: None)
    assert report.errors_500 == 0, report.by_status
    assert set(report.by_status) == {"200", "503"}, report.by_status
    assert report.unavailable_without_retry_after == 0
    assert report.no_answer == 0
    assert report.max_latency_s <= options.deadline_s
    assert report.by_status["503"] > 0, "the outage was seen"
    assert report.recovery_s is not None, "served again after the restart"
    assert report.recovery_s <= 5.0
    assert report.ok
