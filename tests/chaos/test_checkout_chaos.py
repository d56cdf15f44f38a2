"""The checkout chaos run (the checkout issue's acceptance gate) on SQLite and on PostgreSQL.

Real processes — shop API, saga worker, PSP and carrier — with the PSP failing 30 %, hanging 10 %
and losing 5 % of its answers, the carrier failing 10 %, and the worker SIGKILLed and restarted at
random; then every invariant of `mercato.lab.chaos_invariants`, each checked from its own side.
The CI-sized run keeps timeouts and deadlines short; the full one (`-m slow`) drives 1,000.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from mercato.lab.chaos import ChaosConfig, ChaosReport, run_chaos
from tests.conftest import PG_TEST_PREFIX

pytestmark = pytest.mark.chaos


def _explain(report: ChaosReport) -> str:
    lines = [f"{v.name}: {v.violations} violations {v.details}" for v in report.verdicts if not v.ok]
    if not report.settled:
        lines.append("the run did not settle within its bound")
    lines.append(f"counts: {report.counts}")
    lines.extend(f"--- {name} ---\n{tail}" for name, tail in report.logs.items())
    return "\n".join(lines)


def _assert_sound(report: ChaosReport, config: ChaosConfig) -> None:
    assert report.ok, _explain(report)
    counts = report.counts
    assert report.kills >= config.kills
    assert counts["checkouts_driven"] == config.checkouts
    # Every answered checkout made exactly one order, and every order reached its end.
    assert (
        counts["orders"] == counts["checkouts_accepted"] >= config.checkouts - counts["checkouts_unanswered"]
    )
    assert counts["orders_completed"] + counts["orders_cancelled"] == counts["orders"]
    assert counts["sagas_failed"] == counts["sagas_active"] == 0
    # The faults and the decline card really were exercised: both outcomes occur.
    assert counts["orders_completed"] > 0
    assert counts["orders_cancelled"] > 0
    assert counts["downstream_applied"] == counts["outbox_messages"] > 0


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_checkouts_survive_provider_faults_and_worker_kills(backend: str, tmp_path: Path) -> None:
    config = ChaosConfig(
        backend=backend, checkouts=50, kills=5, workdir=tmp_path, database_prefix=f"{PG_TEST_PREFIX}_chaos"
    )
    _assert_sound(await run_chaos(config), config)


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
async def test_a_thousand_checkouts_survive_provider_faults_and_worker_kills(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("the full-size run takes minutes: run it with -m slow")
    config = ChaosConfig(
        backend=backend,
        checkouts=1000,
        kills=10,
        concurrency=16,
        stock_per_sku=300,
        saga_deadline_s=60.0,
        drive_s=60.0,
        kill_gap_s=(3.0, 8.0),
        workdir=tmp_path,
        seed=11,
        database_prefix=f"{PG_TEST_PREFIX}_chaos",
    )
    _assert_sound(await run_chaos(config), config)
