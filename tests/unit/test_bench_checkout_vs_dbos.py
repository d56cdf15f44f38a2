"""``mercato bench checkout --vs dbos``: a tiny round end to end, and its refusals (ADR 0049)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from typer.testing import CliRunner

from mercato.bench import dbos_checkout
from mercato.bench.cli import app as bench_app
from tests.conftest import PG_ADMIN_DSN, PG_TEST_PREFIX, _pg_host_part

# The databases this file may create on the shared server start with it.
_PREFIX = f"{PG_TEST_PREFIX}_hdb_"


def _databases() -> set[str]:
    async def names() -> set[str]:
        conn = await asyncpg.connect(PG_ADMIN_DSN)
        try:
            return {r["datname"] for r in await conn.fetch("SELECT datname FROM pg_database")}
        finally:
            await conn.close()

    return asyncio.run(names())


def test_vs_dbos_needs_postgresql_and_a_known_engine() -> None:
    runner = CliRunner()
    sqlite = runner.invoke(bench_app, ["checkout", "--vs", "dbos", "--rates", "5"])
    assert sqlite.exit_code == 2
    url = f"postgresql+asyncpg://{_pg_host_part()}/{_PREFIX}never"
    other = runner.invoke(bench_app, ["checkout", "--vs", "temporal", "--database-url", url])
    assert other.exit_code == 2


def test_a_missing_extra_is_a_clear_message_before_anything_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def without_dbos(name: str, *args: Any) -> Any:
        return None if name == "dbos" else real(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", without_dbos)
    with pytest.raises(dbos_checkout.DbosMissing, match=r"mercato\[bench\]"):
        dbos_checkout.require_dbos()
    url = f"postgresql+asyncpg://{_pg_host_part()}/{_PREFIX}never"
    args = ["checkout", "--vs", "dbos", "--database-url", url, "--create-database"]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 2
    assert f"{_PREFIX}never" not in _databases()  # refused before creating anything


@pytest.mark.timeout(120)
def test_a_tiny_round_runs_both_sides_into_one_table(tmp_path: Path) -> None:
    pytest.importorskip("dbos")
    name = f"{_PREFIX}t{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    before = {d for d in _databases() if d.startswith(_PREFIX)}
    args = ["checkout", "--vs", "dbos", "--rates", "5", "--duration", "1", "--warmup", "0"]
    args += [
        "--drain",
        "15",
        "--customers",
        "5",
        "--database-url",
        f"postgresql+asyncpg://{_pg_host_part()}/{name}",
    ]
    args += ["--create-database", "--out", str(out)]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    rows = {row["side"].split()[0]: row for row in report["vs_dbos"]["rows"]}
    assert set(rows) == {"mercato", "dbos"}
    for row in rows.values():
        assert row["offered_rate"] == 5
        assert row["completed"] == 5
        assert row["not_completed"] == 0
        assert 0 < row["p50_ms"] <= row["p99_ms"]
        assert row["cpu_ms_per_workflow"] > 0
        assert row["machine_cpu_ms_per_workflow"] > 0
        assert row["machine_cores_busy"] > 0
    assert report["vs_dbos"]["dbos"]["steps"][0]["failure_sample"] == []
    assert (out / "bench-checkout.png").stat().st_size > 1000
    verdict = (out / "verdict.txt").read_text()
    assert "goal ≥ 3× DBOS" in verdict
    assert "beyond the six steps, dbos" in verdict
    assert "Mercato vs DBOS" in (out / "table.txt").read_text()
    # Both databases (the Mercato side's and the DBOS side's, named after it) are gone.
    assert {d for d in _databases() if d.startswith(_PREFIX)} <= before
