"""Keyset pagination: opaque cursors that carry the last row's sort key and id.

A cursor is base64url(JSON) of `[sort_name, sort_value, id]`, so it stays valid under inserts
(unlike OFFSET) and the next page is one index range scan.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import orjson
from pydantic import BaseModel, Field

from mercato.kit.errors import RuleViolated

T = TypeVar("T")

MAX_PAGE_SIZE = 100
DEFAULT_PAGE_SIZE = 20


# What the OpenAPI promises about a cursor (base64url, unpadded). A string outside it is a malformed
# request (400); one inside it that we did not issue, or issued for another sort, is 422 (ADR 0028).
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"
CURSOR_MAX_LENGTH = 512


class CursorError(ValueError):
    """The cursor is not one we issued, or was issued for another sort order."""


class InvalidCursor(RuleViolated):
    """A well-formed cursor that this server did not issue for this listing and sort order."""

    slug = "invalid-cursor"
    title = "Invalid cursor"
    description = (
        "The pagination cursor has the documented form but was not issued by this listing, or was "
        "issued for a different sort order: start again without `cursor`."
    )

    def __init__(self, detail: str) -> None:
        super().__init__(detail, field="query.cursor")


@dataclass(frozen=True, slots=True)
class Cursor:
    sort: str
    value: Any
    id: str

    def encode(self) -> str:
        raw = orjson.dumps([self.sort, self.value, self.id])
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")

    @classmethod
    def decode(cls, token: str, *, expected_sort: str) -> Cursor:
        if len(token) > 512:
            raise CursorError("cursor too long")
        try:
            padded = token + "=" * (-len(token) % 4)
            data = orjson.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        except (ValueError, binascii.Error, UnicodeEncodeError) as exc:
            raise CursorError("malformed cursor") from exc
        if not (
            isinstance(data, list)
            and len(data) == 3
            and isinstance(data[0], str)
            and isinstance(data[2], str)
        ):
            raise CursorError("malformed cursor")
        if data[0] != expected_sort:
            raise CursorError("cursor was issued for a different sort order")
        if data[1] is not None and (not isinstance(data[1], (str, int)) or isinstance(data[1], bool)):
            raise CursorError("malformed cursor")
        return cls(sort=data[0], value=data[1], id=data[2])


class Page(BaseModel, Generic[T]):
    items: list[T] = Field(default_factory=list)
    next_cursor: str | None = None
