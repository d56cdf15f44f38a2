from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.kit.web import Cursor, CursorError


@given(
    value=st.one_of(st.none(), st.integers(min_value=0, max_value=10**12), st.text(max_size=50)),
    ident=st.uuids().map(str),
)
def test_cursor_round_trips(value: object, ident: str) -> None:
    cursor = Cursor(sort="price", value=value, id=ident)
    assert Cursor.decode(cursor.encode(), expected_sort="price") == cursor


def test_cursor_for_another_sort_is_refused() -> None:
    token = Cursor(sort="price", value=1, id="x").encode()
    with pytest.raises(CursorError):
        Cursor.decode(token, expected_sort="name")


@given(st.text(max_size=100))
def test_garbage_never_raises_anything_but_cursor_error(garbage: str) -> None:
    with contextlib.suppress(CursorError):
        Cursor.decode(garbage, expected_sort="price")
