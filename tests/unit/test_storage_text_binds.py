"""Values the SQLite driver path binds as text must be the text SQLAlchemy's column types store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from sqlalchemy import DateTime
from sqlalchemy.dialects import sqlite

from mercato.kit.storage import UTCDateTime
from mercato.kit.storage.types import json_text

VALUES: list[Any] = [
    {"amount_minor": 101, "currency": "EUR", "note": "event 1"},
    {},
    [],
    {"nested": {"list": [1, 2.5, None, True, False], "tuple": (1, "x")}},
    {"unicode": "café ☕ \u2028", "quote": 'a"b\\c', "control": "\n\t"},
    {1: "int key", 2.5: "float key", False: "bool key", None: "none key"},
    {"big": 10**30, "negative": -(2**63), "float": 1e-300},
    {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")},
    [{"a": [{"b": []}]}],
    "a string",
    42,
    None,
]


@pytest.mark.parametrize("value", VALUES)
def test_json_text_is_what_json_dumps_returns(value: Any) -> None:
    assert json_text(value) == json.dumps(value)


def test_json_text_refuses_what_json_dumps_refuses_and_works_after() -> None:
    class NotJson:
        pass

    with pytest.raises(TypeError, match="not JSON serializable"):
        json_text({"x": [NotJson()]})
    circular: dict[str, Any] = {}
    circular["self"] = circular
    with pytest.raises(RecursionError):
        json_text(circular)
    assert json_text({"after": [1]}) == '{"after": [1]}'


@pytest.mark.parametrize(
    "moment",
    [
        datetime(2026, 12, 6, 16, 13, 39, 123456, tzinfo=UTC),
        datetime(2026, 12, 6, 16, 13, 39, tzinfo=UTC),  # no microseconds: still printed
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(2026, 3, 29, 2, 30, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        datetime(2026, 3, 29, 2, 30, 0, 1, tzinfo=timezone(timedelta(hours=-8))),
    ],
)
def test_utc_datetime_binds_on_sqlite_as_the_two_step_conversion_did(moment: datetime) -> None:
    dialect = sqlite.dialect()
    column = UTCDateTime()
    one_step = column.bind_processor(dialect)
    # The TypeDecorator's own path: naive UTC, then SQLite's DATETIME text.
    two_step = DateTime().dialect_impl(dialect).bind_processor(dialect)
    assert one_step is not None
    assert two_step is not None
    assert one_step(moment) == two_step(column.process_bind_param(moment, dialect))
    assert one_step(None) is None
    with pytest.raises(ValueError):
        one_step(moment.replace(tzinfo=None))


def test_driver_statement_args_are_the_values_in_order_with_their_conversions() -> None:
    from sqlalchemy import Integer, String, bindparam, literal_column, select

    from mercato.kit.storage.statements import DriverStatement

    dialect = sqlite.dialect()
    moment = datetime(2026, 12, 6, 16, 13, 39, 5, tzinfo=UTC)
    many = DriverStatement.compile(
        select(
            bindparam("a", type_=String),
            bindparam("at", type_=UTCDateTime),
            bindparam("b", type_=Integer),
            bindparam("a", type_=String),
            bindparam("fixed", 7, type_=Integer),
        ),
        dialect,
    )
    assert many.names == ("a", "at", "b", "a", "fixed")
    assert many.args({"a": "x", "at": moment, "b": 2}) == ["x", "2026-12-06 16:13:39.000005", 2, "x", 7]
    with pytest.raises(KeyError):
        many.args({"a": "x", "b": 2})
    one = DriverStatement.compile(select(bindparam("only", type_=String)), dialect)
    assert one.args({"only": "y", "ignored": 1}) == ["y"]
    none = DriverStatement.compile(select(literal_column("1")), dialect)
    assert none.args({}) == []
