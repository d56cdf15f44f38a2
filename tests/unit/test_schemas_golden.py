"""Golden vectors: every shipped schema version has examples; valid ones pass (also after a
CloudEvents round trip), `invalid-*` ones fail; old-version vectors upcast to valid current data."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from mercato.kit.messaging import Message
from mercato.kit.schemas import dataschema_uri, parse_dataschema
from mercato.schemas import catalog, read_event

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "events"


def _vectors() -> list[tuple[str, int, Path]]:
    found = []
    for path in sorted(GOLDEN.glob("*/v*/*.json")):
        found.append((path.parent.parent.name, int(path.parent.name[1:]), path))
    return found


VECTORS = _vectors()
VALID = [v for v in VECTORS if not v[2].name.startswith("invalid-")]
INVALID = [v for v in VECTORS if v[2].name.startswith("invalid-")]


def _id(vector: tuple[str, int, Path]) -> str:
    return f"{vector[0]}/v{vector[1]}/{vector[2].stem}"


def _load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_every_shipped_schema_version_has_valid_and_invalid_vectors() -> None:
    shipped = {(name, n) for name, s in catalog().subjects.items() for n in range(1, s.current_version + 1)}
    assert {(t, v) for t, v, _ in VALID} == shipped
    assert {t for t, _, _ in INVALID} == set(catalog().subjects)


@pytest.mark.parametrize("vector", VALID, ids=_id)
def test_valid_vector_passes_and_survives_the_cloudevents_round_trip(vector: tuple[str, int, Path]) -> None:
    event_type, version, path = vector
    data = _load(path)
    assert catalog().errors(event_type, data, version=version) == []
    message = Message(
        id=uuid.UUID("0193a4e2-0000-7000-8000-000000000001"),
        source="mercato/checkout",
        type=event_type,
        subject=str(data.get("order_id") or data["product_id"]),
        time=datetime(2026, 11, 25, 12, 0, tzinfo=UTC),
        data=data,
        topic=event_type.rsplit(".", 1)[0],
        dataschema=dataschema_uri(event_type, version),
    )
    again = Message.from_json(message.to_json())
    assert again == Message.from_cloudevent(message.to_cloudevent()) == message
    assert parse_dataschema(again.dataschema or "") == (event_type, version)
    assert catalog().errors(event_type, again.data, version=version) == []


@pytest.mark.parametrize("vector", INVALID, ids=_id)
def test_invalid_vector_fails(vector: tuple[str, int, Path]) -> None:
    event_type, version, path = vector
    assert catalog().errors(event_type, _load(path), version=version)


@pytest.mark.parametrize("vector", VALID, ids=_id)
def test_every_valid_vector_reads_as_valid_current_data(vector: tuple[str, int, Path]) -> None:
    event_type, version, path = vector
    current = read_event(event_type, dataschema_uri(event_type, version), _load(path))
    assert catalog().errors(event_type, current, strict=True) == []
