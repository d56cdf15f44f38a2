"""Column types and the shared SQLAlchemy metadata every context registers its tables on."""

from __future__ import annotations

import json
import json.encoder
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, MetaData
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

# Stable constraint names so migrations and error mapping can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend.

    SQLite has no timezone type and hands back naive values; PostgreSQL gives `timestamptz`.
    Both come back as aware UTC so domain code never compares naive with aware times.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        if dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def bind_processor(self, dialect: Dialect) -> Any:
        """On SQLite, `process_bind_param` and the dialect's DATETIME formatting in one step: the
        same text (`YYYY-MM-DD HH:MM:SS.ffffff`, naive UTC) for a third of the CPU, since every
        event-store append binds one (ADR 0064)."""
        if dialect.name != "sqlite":
            return super().bind_processor(dialect)

        def process(value: datetime | None) -> str | None:
            if value is None:
                return None
            if value.tzinfo is None:
                raise ValueError("naive datetime given to a UTC column")
            if value.tzinfo is not UTC:
                value = value.astimezone(UTC)
            # "YYYY-MM-DD HH:MM:SS.ffffff+00:00" (the year always four digits) without the offset:
            # the naive text, without the copy `replace(tzinfo=None)` made (ADR 0069).
            return value.isoformat(" ", "microseconds")[:26]

        return process

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        moment: datetime = value
        if moment.tzinfo is None:
            return moment.replace(tzinfo=UTC)
        return moment.astimezone(UTC)


def _json_text_encoder() -> Any:
    """`json.dumps`'s own C encoder with `json.dumps`'s default settings, made once. `json.dumps`
    builds it (and a closure) on every call: three quarters of its cost for a small event's data."""
    make = getattr(json.encoder, "c_make_encoder", None)  # not in the module's stubs
    if make is None:  # a Python without the C accelerator: the plain call
        return None
    defaults = json.JSONEncoder()
    # No circular-reference markers: a self-containing value fails with RecursionError instead
    # of ValueError; neither can be stored.
    return make(
        None,
        defaults.default,
        json.encoder.encode_basestring_ascii,
        None,
        defaults.key_separator,
        defaults.item_separator,
        defaults.sort_keys,
        defaults.skipkeys,
        defaults.allow_nan,
    )


_ENCODER = _json_text_encoder()


def json_text(value: Any) -> str:
    """The text `json.dumps(value)` returns, which is what the JSON column type stores (ADR 0069).
    For values bound as text on the driver path (the event store's append, ADR 0064)."""
    if _ENCODER is None or isinstance(value, (str, int, float)) or value is None:
        return json.dumps(value)  # the C encoder's entry point takes containers only
    return "".join(_ENCODER(value, 0))
