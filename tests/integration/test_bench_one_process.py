"""`mercato bench one-process`: a part of a checkout's work measured in one process, end to end on
the real PostgreSQL, and its database dropped after."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from mercato.cli.main import app

PREFIX = os.environ.get("MERCATO_TEST_PG_PREFIX", "mercato_test")


@pytest.mark.parametrize(("part", "expect"), [("relay", "statements per pass"), ("ledger", "statements")])
def test_a_part_prints_its_cpu_and_statements_and_drops_its_database(
    part: str, expect: str, tmp_path: Path
) -> None:
    database = f"{PREFIX}_op_{uuid.uuid4().hex[:8]}"
    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            "one-process",
            part,
            "--database",
            database,
            "--count",
            "20",
            "--batch",
            "5",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "CPU" in result.output, result.output
    assert expect in result.output, result.output
    # Through the harness: the printed line is the run folder's table and report.
    assert expect in (run / "table.txt").read_text()
    assert json.loads((run / "report.json").read_text())["part"] == part
    assert (run / "result.json").is_file()
    assert asyncio.run(_databases_named(database)) == 0


async def _databases_named(name: str) -> int:
    admin = await asyncpg.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    try:
        return int(await admin.fetchval("SELECT count(*) FROM pg_database WHERE datname = $1", name))
    finally:
        await admin.close()


def test_an_unknown_part_is_refused() -> None:
    result = CliRunner().invoke(app, ["bench", "one-process", "nope", "--database", "x"])
    assert result.exit_code != 0
