"""The database schema registry on SQLite and PostgreSQL: register, refuse, stay idempotent."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete
from typer.testing import CliRunner

from mercato.cli.main import app
from mercato.config import get_settings
from mercato.kit.clock import ManualClock
from mercato.kit.schemas import (
    Compatibility,
    IncompatibleSchema,
    SchemaNotFound,
    SchemaRegistry,
    UnsupportedSchema,
    fingerprint,
    schema_subjects,
    schema_versions,
)
from mercato.kit.storage import create_database
from mercato.schemas import catalog

SUBJECT = "mercato.test.thing_happened"
V1: dict[str, Any] = {
    "type": "object",
    "properties": {"id": {"type": "string"}, "amount": {"type": "integer"}},
    "required": ["id", "amount"],
    "additionalProperties": True,
}
V2_OPTIONAL = {**V1, "properties": {**V1["properties"], "note": {"type": "string", "default": ""}}}
V2_REQUIRED = {**V2_OPTIONAL, "required": ["id", "amount", "note"]}


async def _clear(url: str) -> None:
    db = create_database(url)
    try:
        async with db.write() as conn:
            await conn.execute(delete(schema_versions))
            await conn.execute(delete(schema_subjects))
    finally:
        await db.dispose()


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[SchemaRegistry]:
    db = create_database(database_url)
    clock = ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    try:
        yield SchemaRegistry(db, clock=clock)
    finally:
        await db.dispose()
        await _clear(database_url)


async def test_register_numbers_versions_and_refuses_an_incompatible_schema(registry: SchemaRegistry) -> None:
    first = await registry.register(SUBJECT, V1, compatibility=Compatibility.FULL)
    assert (first.version, first.fingerprint) == (1, fingerprint(V1))
    assert await registry.compatibility(SUBJECT) == Compatibility.FULL
    with pytest.raises(IncompatibleSchema) as refused:
        await registry.register(SUBJECT, V2_REQUIRED)
    assert refused.value.mode is Compatibility.FULL
    assert [(p.path, p.rule) for p in refused.value.problems] == [("/properties/note", "required_missing")]
    assert "not FULL-compatible" in str(refused.value)
    assert [v.version for v in await registry.versions(SUBJECT)] == [1]  # nothing stored
    second = await registry.register(SUBJECT, V2_OPTIONAL)
    assert second.version == 2
    latest = await registry.get(SUBJECT)
    assert (latest.version, latest.schema) == (2, V2_OPTIONAL)
    assert (await registry.get(SUBJECT, 1)).schema == V1


async def test_registering_the_same_schema_again_is_idempotent(registry: SchemaRegistry) -> None:
    first = await registry.register(SUBJECT, V1)
    await registry.register(SUBJECT, V2_OPTIONAL)
    # Key order does not matter: the fingerprint is over canonical JSON.
    again = await registry.register(SUBJECT, dict(reversed(list(V1.items()))))
    assert (again.version, again.fingerprint, again.registered_at) == (
        1,
        first.fingerprint,
        first.registered_at,
    )
    assert len(await registry.versions(SUBJECT)) == 2


async def test_the_mode_decides_and_can_change(registry: SchemaRegistry) -> None:
    await registry.register(SUBJECT, V1, compatibility=Compatibility.BACKWARD)
    assert await registry.test_compatibility(SUBJECT, V2_REQUIRED)
    await registry.set_compatibility(SUBJECT, Compatibility.FORWARD)  # old readers ignore `note`
    assert await registry.test_compatibility(SUBJECT, V2_REQUIRED) == []
    assert (await registry.register(SUBJECT, V2_REQUIRED)).version == 2
    assert await registry.subjects() == {SUBJECT: Compatibility.FORWARD}


async def test_transitive_mode_catches_a_removed_field_reused_with_another_type(
    registry: SchemaRegistry,
) -> None:
    """Guide §3's anti-pattern "reusing field numbers": v2 drops `note`, v3 brings it back as an
    integer. Each step alone is fine for FORWARD; the v1 reader still expects a string."""
    with_note = {**V1, "properties": {**V1["properties"], "note": {"type": "string"}}}
    reused = {**V1, "properties": {**V1["properties"], "note": {"type": "integer"}}}
    await registry.set_compatibility(SUBJECT, Compatibility.FORWARD)
    await registry.register(SUBJECT, with_note)
    await registry.register(SUBJECT, V1)
    assert await registry.test_compatibility(SUBJECT, reused) == []
    await registry.set_compatibility(SUBJECT, Compatibility.FORWARD_TRANSITIVE)
    with pytest.raises(IncompatibleSchema, match=r"type_narrowed.*version 1"):
        await registry.register(SUBJECT, reused)


async def test_unsupported_or_invalid_schemas_and_unknown_subjects(registry: SchemaRegistry) -> None:
    with pytest.raises(UnsupportedSchema, match="anyOf"):
        await registry.register(SUBJECT, {"anyOf": [V1]})
    with pytest.raises(UnsupportedSchema, match="Draft 2020-12"):
        await registry.register(SUBJECT, {"type": "no-such-type"})
    with pytest.raises(SchemaNotFound):
        await registry.get(SUBJECT)
    with pytest.raises(SchemaNotFound):
        await registry.compatibility(SUBJECT)


async def test_concurrent_registrations_of_one_subject_take_turns(registry: SchemaRegistry) -> None:
    await registry.register(SUBJECT, V1)
    schemas = [{**V1, "properties": {**V1["properties"], f"f{n}": {"type": "string"}}} for n in range(4)]
    results = await asyncio.gather(*(registry.register(SUBJECT, s) for s in schemas))
    assert sorted(r.version for r in results) == [2, 3, 4, 5]


# ---- `mercato schemas register` ---------------------------------------------------------------


@pytest.fixture
def cli_db(database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("MERCATO_DATABASE_URL", database_url)
    monkeypatch.setenv("MERCATO_DATA_DIR", str(tmp_path))
    get_settings.cache_clear()
    yield database_url
    get_settings.cache_clear()
    asyncio.run(_clear(database_url))


def test_cli_register_pushes_the_shipped_schemas_once(cli_db: str) -> None:
    runner = CliRunner()
    first = runner.invoke(app, ["schemas", "register", "--json"])
    assert first.exit_code == 0, first.output
    again = runner.invoke(app, ["schemas", "register", "--json"])
    assert again.exit_code == 0, again.output
    assert again.stdout == first.stdout
    expected = {(name, n) for name, s in catalog().subjects.items() for n in range(1, s.current_version + 1)}
    assert {(row["subject"], row["version"]) for row in json.loads(first.stdout)["items"]} == expected
