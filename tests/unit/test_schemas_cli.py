"""`mercato schemas check|list|show`: passes on the shipped schemas, fails on a broken copy."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mercato.cli.main import app
from mercato.schemas import SCHEMA_DIR

runner = CliRunner()
COMPLETED = "mercato.orders.order_completed"


@pytest.fixture
def copy_dir(tmp_path: Path) -> Path:
    target = tmp_path / "schemas"
    shutil.copytree(SCHEMA_DIR, target, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    return target


def _v2(root: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((root / COMPLETED / "v2.json").read_text())
    return data


def test_check_passes_on_the_shipped_schemas() -> None:
    result = runner.invoke(app, ["schemas", "check", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"subjects": 8, "failures": []}


def test_check_fails_when_a_new_version_breaks_the_declared_mode(copy_dir: Path) -> None:
    v3 = _v2(copy_dir)
    v3["required"] = [*v3["required"], "completed_at"]  # type: ignore[misc]
    (copy_dir / COMPLETED / "v3.json").write_text(json.dumps(v3))
    result = runner.invoke(app, ["schemas", "check", "--dir", str(copy_dir), "--json"])
    assert result.exit_code == 1
    failures = json.loads(result.stdout)["failures"]
    assert {(f["subject"], f["version"]) for f in failures} == {(COMPLETED, 3), (COMPLETED, 2)}
    assert any("required_added" in f["problem"] and "BACKWARD" in f["problem"] for f in failures)
    assert any("no upcaster v2 -> v3" in f["problem"] for f in failures)


def test_check_fails_when_an_edited_version_narrows_a_type(copy_dir: Path) -> None:
    v2 = _v2(copy_dir)
    v2["properties"]["total_minor"] = {"type": "string"}  # type: ignore[index]
    (copy_dir / COMPLETED / "v2.json").write_text(json.dumps(v2))
    result = runner.invoke(app, ["schemas", "check", "--dir", str(copy_dir)])
    assert result.exit_code == 1
    assert "type_narrowed" in result.stderr


def _gap(root: Path) -> None:
    (root / COMPLETED / "v2.json").unlink()
    (root / COMPLETED / "v3.json").write_text("{}")


def _not_json(root: Path) -> None:
    (root / COMPLETED / "v1.json").write_text("{not json")


def _undeclared(root: Path) -> None:
    (root / "mercato.orders.order_shipped").mkdir()


def _unsupported(root: Path) -> None:
    (root / COMPLETED / "v1.json").write_text('{"anyOf": [{"type": "object"}]}')


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        (_gap, "not contiguous"),
        (_not_json, "not a valid Draft 2020-12"),
        (_undeclared, "without an entry in subjects.toml"),
        (_unsupported, "UnsupportedSchema"),
    ],
)
def test_check_fails_on_malformed_schema_directories(
    copy_dir: Path, breakage: Callable[[Path], None], message: str
) -> None:
    breakage(copy_dir)
    result = runner.invoke(app, ["schemas", "check", "--dir", str(copy_dir)])
    assert result.exit_code == 1
    assert message in result.stderr


def test_list_and_show() -> None:
    listed = runner.invoke(app, ["schemas", "list", "--json"])
    assert listed.exit_code == 0
    rows = {row["subject"]: row for row in json.loads(listed.stdout)["items"]}
    assert rows[COMPLETED]["current_version"] == 2
    assert rows[COMPLETED]["dataschema"] == f"/schemas/{COMPLETED}/v2"
    assert rows[COMPLETED]["compatibility"] == "FULL"
    shown = runner.invoke(app, ["schemas", "show", COMPLETED, "--version", "1"])
    assert shown.exit_code == 0
    assert "completed_at" not in json.loads(shown.stdout)["properties"]
    missing = runner.invoke(app, ["schemas", "show", "mercato.nope"])
    assert missing.exit_code == 1
