"""The schema registry in the database: subjects with a compatibility mode, and their versions.

`register` is the gate (Confluent Schema Registry's model): a new schema for a subject is checked
against the latest version (or every version, for a transitive mode) inside the same write
transaction that would store it, and refused with the reasons when it breaks the mode. The same
schema registered again (same canonical fingerprint) returns the version it already has, so a
deploy can push every shipped schema on each start.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from sqlalchemy import (
    CheckConstraint,
    Column,
    ForeignKeyConstraint,
    Integer,
    PrimaryKeyConstraint,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    select,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from mercato.kit.clock import Clock
from mercato.kit.schemas.catalog import fingerprint
from mercato.kit.schemas.compat import (
    Compatibility,
    Incompatibility,
    UnsupportedSchema,
    check_compatibility,
    unsupported_keywords,
)
from mercato.kit.storage import Database, UTCDateTime, metadata

__all__ = [
    "IncompatibleSchema",
    "RegisteredSchema",
    "SchemaNotFound",
    "SchemaRegistry",
    "schema_subjects",
    "schema_versions",
]

_MODES = ", ".join(f"'{mode.value}'" for mode in Compatibility)

schema_subjects = Table(
    "schema_subjects",
    metadata,
    Column("name", String(200), nullable=False),
    Column("compatibility", String(32), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("name"),
    CheckConstraint(f"compatibility IN ({_MODES})", name="compatibility_known"),
)

schema_versions = Table(
    "schema_versions",
    metadata,
    Column("subject", String(200), nullable=False),
    Column("version", Integer, nullable=False),
    # Canonical JSON text (sorted keys): the bytes the fingerprint is computed over.
    Column("schema", Text, nullable=False),
    Column("fingerprint", String(64), nullable=False),
    Column("registered_at", UTCDateTime, nullable=False),
    PrimaryKeyConstraint("subject", "version"),
    ForeignKeyConstraint(
        ["subject"],
        ["schema_subjects.name"],
        ondelete="CASCADE",
    ),
    UniqueConstraint("subject", "fingerprint"),
    CheckConstraint("version >= 1", name="version_positive"),
)


class SchemaNotFound(LookupError):
    """No such subject, or no such version of it."""


class IncompatibleSchema(ValueError):
    """The schema breaks its subject's compatibility mode; `problems` says where and why."""

    def __init__(self, subject: str, mode: Compatibility, problems: list[Incompatibility]) -> None:
        self.subject = subject
        self.mode = mode
        self.problems = problems
        reasons = "; ".join(str(p) for p in problems)
        super().__init__(f"schema for {subject!r} is not {mode.value}-compatible: {reasons}")


@dataclass(frozen=True, slots=True)
class RegisteredSchema:
    subject: str
    version: int
    schema: dict[str, Any]
    fingerprint: str
    registered_at: datetime


def _canonical(schema: Mapping[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _row(row: Any) -> RegisteredSchema:
    return RegisteredSchema(
        subject=row.subject,
        version=int(row.version),
        schema=json.loads(row.schema),
        fingerprint=row.fingerprint,
        registered_at=row.registered_at,
    )


class SchemaRegistry:
    def __init__(
        self, db: Database, *, clock: Clock, default_compatibility: Compatibility = Compatibility.BACKWARD
    ) -> None:
        self._db = db
        self._clock = clock
        self._default = default_compatibility

    async def register(
        self, subject: str, schema: Mapping[str, Any], *, compatibility: Compatibility | None = None
    ) -> RegisteredSchema:
        """Store `schema` as the subject's next version, or return the version it already is.

        A new subject takes `compatibility` (else the registry default); for an existing one the
        argument is ignored: a mode changes only through `set_compatibility`, on purpose.
        Raises `IncompatibleSchema` or `UnsupportedSchema` and stores nothing.
        """
        _check_schema(schema)
        print_ = fingerprint(schema)
        async with self._db.write() as conn:
            mode = await self._lock_subject(conn, subject, compatibility or self._default)
            history = await self._versions(conn, subject)
            for known in history:
                if known.fingerprint == print_:
                    return known
            problems = check_compatibility(mode, schema, [h.schema for h in history])
            if problems:
                raise IncompatibleSchema(subject, mode, problems)
            registered = RegisteredSchema(
                subject=subject,
                version=len(history) + 1,
                schema=json.loads(_canonical(schema)),
                fingerprint=print_,
                registered_at=self._clock.now(),
            )
            await conn.execute(
                insert(schema_versions).values(
                    subject=subject,
                    version=registered.version,
                    schema=_canonical(schema),
                    fingerprint=print_,
                    registered_at=registered.registered_at,
                )
            )
            return registered

    async def test_compatibility(self, subject: str, schema: Mapping[str, Any]) -> list[Incompatibility]:
        """What `register` would refuse, without storing anything (empty: it would be accepted)."""
        _check_schema(schema)
        async with self._db.read() as conn:
            mode = await self._mode(conn, subject)
            history = await self._versions(conn, subject)
        return check_compatibility(mode or self._default, schema, [h.schema for h in history])

    async def set_compatibility(self, subject: str, compatibility: Compatibility) -> None:
        """Create the subject with this mode, or change an existing subject's mode."""
        async with self._db.write() as conn:
            now = self._clock.now()
            if await self._mode(conn, subject) is None:
                await conn.execute(
                    insert(schema_subjects).values(
                        name=subject, compatibility=compatibility.value, created_at=now, updated_at=now
                    )
                )
            else:
                await conn.execute(
                    update(schema_subjects)
                    .where(schema_subjects.c.name == subject)
                    .values(compatibility=compatibility.value, updated_at=now)
                )

    async def subjects(self) -> dict[str, Compatibility]:
        async with self._db.read() as conn:
            rows = await conn.execute(select(schema_subjects).order_by(schema_subjects.c.name))
            return {row.name: Compatibility(row.compatibility) for row in rows}

    async def compatibility(self, subject: str) -> Compatibility:
        async with self._db.read() as conn:
            mode = await self._mode(conn, subject)
        if mode is None:
            raise SchemaNotFound(f"no subject {subject!r}")
        return mode

    async def versions(self, subject: str) -> list[RegisteredSchema]:
        async with self._db.read() as conn:
            return await self._versions(conn, subject)

    async def get(self, subject: str, version: int | None = None) -> RegisteredSchema:
        """One version of a subject; the latest when `version` is None."""
        history = await self.versions(subject)
        if not history:
            raise SchemaNotFound(f"no schema registered for {subject!r}")
        if version is None:
            return history[-1]
        for item in history:
            if item.version == version:
                return item
        raise SchemaNotFound(f"{subject!r} has no version {version}")

    async def _mode(self, conn: AsyncConnection, subject: str) -> Compatibility | None:
        value = (
            await conn.execute(
                select(schema_subjects.c.compatibility).where(schema_subjects.c.name == subject)
            )
        ).scalar_one_or_none()
        return None if value is None else Compatibility(value)

    async def _lock_subject(
        self, conn: AsyncConnection, subject: str, default: Compatibility
    ) -> Compatibility:
        """The subject's mode, its row locked until commit so concurrent registrations of one
        subject take turns (PostgreSQL: FOR UPDATE; SQLite: the write lock is already held)."""
        value = (
            await conn.execute(
                select(schema_subjects.c.compatibility)
                .where(schema_subjects.c.name == subject)
                .with_for_update()
            )
        ).scalar_one_or_none()
        if value is not None:
            return Compatibility(value)
        now = self._clock.now()
        await conn.execute(
            insert(schema_subjects).values(
                name=subject, compatibility=default.value, created_at=now, updated_at=now
            )
        )
        return default

    async def _versions(self, conn: AsyncConnection, subject: str) -> list[RegisteredSchema]:
        rows = await conn.execute(
            select(schema_versions)
            .where(schema_versions.c.subject == subject)
            .order_by(schema_versions.c.version)
        )
        return [_row(row) for row in rows]


def _check_schema(schema: Mapping[str, Any]) -> None:
    try:
        Draft202012Validator.check_schema(dict(schema))
    except SchemaError as exc:
        raise UnsupportedSchema(f"not a valid Draft 2020-12 schema: {exc.message}") from exc
    bad = unsupported_keywords(schema)
    if bad:
        raise UnsupportedSchema("keywords outside the supported subset: " + ", ".join(bad))
