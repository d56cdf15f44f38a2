"""A directory of versioned event schemas: load, look up, validate, check each version chain.

Layout (one subject per event type, ADR 0017):

    <root>/subjects.toml                  [subjects."<type>"] compatibility = "FULL"
    <root>/<type>/v1.json, v2.json, ...   JSON Schema (Draft 2020-12), contiguous from v1

The newest file of a type is its *current* version: what producers write and stamp into the
CloudEvents `dataschema` attribute as `/schemas/<type>/v<N>`. The catalog is offline (files
only), so `mercato schemas check` needs no database and runs in CI before anything is deployed.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator, FormatChecker
from jsonschema.exceptions import SchemaError

from mercato.kit.schemas.compat import (
    Compatibility,
    Incompatibility,
    UnsupportedSchema,
    check_compatibility,
    closed,
    unsupported_keywords,
)

__all__ = [
    "EventSchemaViolation",
    "SchemaCatalog",
    "SchemaCatalogError",
    "Subject",
    "dataschema_uri",
    "fingerprint",
    "parse_dataschema",
]

_VERSION_FILE = re.compile(r"^v([1-9][0-9]*)\.json$")
_DATASCHEMA = re.compile(r"^/schemas/(?P<type>[A-Za-z0-9_.\-]+)/v(?P<version>[1-9][0-9]*)$")
_FORMATS = FormatChecker()


@_FORMATS.checks("date-time", raises=ValueError)
def _rfc3339(value: object) -> bool:
    # jsonschema checks date-time only with an optional extra installed; without this the format
    # would pass anything. RFC 3339 needs a date, a time and an offset (`Z` or `+hh:mm`).
    if not isinstance(value, str):
        return True
    return "T" in value.upper() and datetime.fromisoformat(value.replace("Z", "+00:00")).tzinfo is not None


class SchemaCatalogError(ValueError):
    """The schema files are unusable: malformed, missing, undeclared or not contiguous."""


class EventSchemaViolation(ValueError):
    """An event's data does not match its schema. On produce this is a bug in the producer."""


def dataschema_uri(event_type: str, version: int) -> str:
    """The CloudEvents `dataschema` of one schema version: `/schemas/<type>/v<N>`."""
    return f"/schemas/{event_type}/v{version}"


def parse_dataschema(uri: str) -> tuple[str, int]:
    """`(type, version)` from a `dataschema` URI written by `dataschema_uri`."""
    match = _DATASCHEMA.match(uri)
    if match is None:
        raise ValueError(f"not a Mercato dataschema URI: {uri!r}")
    return match["type"], int(match["version"])


def fingerprint(schema: Mapping[str, Any]) -> str:
    """SHA-256 of the schema's canonical JSON (sorted keys, no whitespace): equal schemas, equal
    fingerprints, however the file was formatted."""
    canonical = json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class Subject:
    """One event type's schema history, oldest first (`versions[0]` is v1)."""

    name: str
    compatibility: Compatibility
    versions: tuple[dict[str, Any], ...]

    @property
    def current_version(self) -> int:
        return len(self.versions)

    def schema(self, version: int) -> dict[str, Any]:
        if not 1 <= version <= len(self.versions):
            raise KeyError(f"{self.name} has no schema version {version}")
        return self.versions[version - 1]

    def problems(self) -> list[tuple[int, Incompatibility]]:
        """Each version checked against those before it under the declared mode."""
        found: list[tuple[int, Incompatibility]] = []
        for index in range(1, len(self.versions)):
            for problem in check_compatibility(
                self.compatibility, self.versions[index], self.versions[:index]
            ):
                found.append((index + 1, problem))
        return found


@dataclass(frozen=True)
class SchemaCatalog:
    """Every subject of a schema directory. Also the producer's `EventContract` (kit.sagas):
    `dataschema_for(type, data)` validates and returns the URI to stamp."""

    subjects: Mapping[str, Subject]
    _validators: dict[tuple[str, int, bool], Draft202012Validator] = field(
        default_factory=dict, repr=False, compare=False
    )

    @classmethod
    def load(cls, root: Path) -> SchemaCatalog:
        """Read `root`; raises `SchemaCatalogError` naming every file that is wrong."""
        declared = _declared_modes(root)
        on_disk = {p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
        errors = [
            f"{name}: schema directory without an entry in subjects.toml" for name in on_disk - set(declared)
        ]
        errors += [
            f"{name}: declared in subjects.toml but has no schema directory"
            for name in set(declared) - on_disk
        ]
        subjects: dict[str, Subject] = {}
        for name in sorted(set(declared) & on_disk):
            versions, problems = _read_versions(root / name)
            errors += [f"{name}: {problem}" for problem in problems]
            subjects[name] = Subject(name, declared[name], tuple(versions))
        if errors:
            raise SchemaCatalogError("; ".join(sorted(errors)))
        return cls(subjects)

    def subject(self, event_type: str) -> Subject:
        try:
            return self.subjects[event_type]
        except KeyError:
            raise KeyError(f"no schema for event type {event_type!r}") from None

    def current_version(self, event_type: str) -> int:
        return self.subject(event_type).current_version

    def problems(self) -> dict[str, list[tuple[int, Incompatibility]]]:
        """Every subject whose version chain breaks its declared mode, with the reasons."""
        found = {name: subject.problems() for name, subject in self.subjects.items()}
        return {name: items for name, items in found.items() if items}

    def errors(
        self, event_type: str, data: Any, *, version: int | None = None, strict: bool = False
    ) -> list[str]:
        """Why `data` is not valid under the schema (the current one unless `version` is given).

        `strict` validates against the closed form (`compat.closed`): what a producer may write.
        """
        subject = self.subject(event_type)
        number = subject.current_version if version is None else version
        key = (event_type, number, strict)
        validator = self._validators.get(key)
        if validator is None:
            schema = subject.schema(number)
            validator = Draft202012Validator(closed(schema) if strict else schema, format_checker=_FORMATS)
            self._validators[key] = validator
        return [
            f"{'/'.join(str(p) for p in error.absolute_path) or '(root)'}: {error.message}"
            for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path)))
        ]

    def validate(
        self, event_type: str, data: Any, *, version: int | None = None, strict: bool = False
    ) -> None:
        errors = self.errors(event_type, data, version=version, strict=strict)
        if errors:
            raise EventSchemaViolation(f"{event_type} data does not match its schema: " + "; ".join(errors))

    def dataschema_for(self, event_type: str, data: Mapping[str, Any]) -> str:
        """Validate `data` strictly against the current schema and return its `dataschema` URI."""
        try:
            version = self.current_version(event_type)
        except KeyError as exc:
            raise EventSchemaViolation(f"event type {event_type!r} has no registered schema") from exc
        self.validate(event_type, dict(data), version=version, strict=True)
        return dataschema_uri(event_type, version)

    @cached_property
    def fingerprints(self) -> dict[tuple[str, int], str]:
        return {
            (name, number): fingerprint(schema)
            for name, subject in self.subjects.items()
            for number, schema in enumerate(subject.versions, start=1)
        }


def _declared_modes(root: Path) -> dict[str, Compatibility]:
    path = root / "subjects.toml"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SchemaCatalogError(f"{path}: {exc}") from exc
    modes: dict[str, Compatibility] = {}
    for name, entry in (document.get("subjects") or {}).items():
        try:
            modes[name] = Compatibility(str(entry["compatibility"]).upper())
        except (KeyError, TypeError, ValueError) as exc:
            raise SchemaCatalogError(f"{path}: subject {name!r} needs a valid compatibility mode") from exc
    return modes


def _read_versions(directory: Path) -> tuple[list[dict[str, Any]], list[str]]:
    problems: list[str] = []
    numbered: dict[int, dict[str, Any]] = {}
    for path in sorted(directory.iterdir()):
        match = _VERSION_FILE.match(path.name)
        if match is None:
            problems.append(f"{path.name}: not a v<N>.json schema file")
            continue
        try:
            schema = json.loads(path.read_text(encoding="utf-8"))
            Draft202012Validator.check_schema(schema)
        except (OSError, ValueError, SchemaError) as exc:
            problems.append(f"{path.name}: not a valid Draft 2020-12 schema: {exc}")
            continue
        bad = unsupported_keywords(schema)
        if bad:
            problems.append(f"{path.name}: {UnsupportedSchema.__name__}: {', '.join(bad)}")
            continue
        numbered[int(match[1])] = schema
    expected = list(range(1, len(numbered) + 1))
    if sorted(numbered) != expected:
        problems.append(f"versions {sorted(numbered)} are not contiguous from v1")
    if not numbered and not problems:
        problems.append("no schema versions")
    return [numbered[n] for n in sorted(numbered)], problems
