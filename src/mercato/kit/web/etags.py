"""Entity tags and conditional requests (RFC 9110 §8.8.3, §13): ETag, If-None-Match, If-Match.

Two kinds of strong tag:

- a *version tag* names a stored version of one resource in one representation,
  `"<kind>.<id>.r<version>.<representation>"` (`"product.0190….r7.v1"`). It is what a write's
  `If-Match` must carry, because the version in it becomes the expected version of the conditional
  UPDATE: the check and the write are one statement, not a read followed by a write.
- a *content tag* is a digest of the exact body bytes, for representations that are not a function
  of one stored version (a cart priced from the catalog now, an order with its saga's progress).
  It is only ever compared, never turned back into a version.

`If-None-Match` uses the weak comparison and `If-Match` the strong one, as RFC 9110 §13.1 says.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any, Final

from starlette.requests import Request
from starlette.responses import Response

from mercato.kit.errors import DomainError
from mercato.kit.observability import current_request_id
from mercato.kit.web.problems import problem_response

__all__ = [
    "ETAG_HEADER_DOC",
    "IF_MATCH_MAX_LENGTH",
    "IF_NONE_MATCH_MAX_LENGTH",
    "PreconditionRequired",
    "VersionTag",
    "content_etag",
    "if_match_versions",
    "if_none_match_hits",
    "not_modified",
    "not_modified_response",
    "precondition_required_handler",
]

# Bounded so a header cannot be used to make the parser do unbounded work; a list of a few
# dozen tags fits easily.
IF_MATCH_MAX_LENGTH: Final = 2048
IF_NONE_MATCH_MAX_LENGTH: Final = 2048

# OpenAPI response-header entry for routes that send an ETag.
ETAG_HEADER_DOC: Final[dict[str, Any]] = {
    "ETag": {
        "schema": {"type": "string"},
        "description": "Strong entity tag of this representation; send it back in If-None-Match / If-Match.",
    }
}

# One entity tag inside a list: optional weak prefix, then a quoted opaque string (RFC 9110 §8.8.3).
_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')


class PreconditionRequired(DomainError):
    """The write must be conditional; rendered as 428 by `precondition_required_handler`."""

    slug = "precondition-required"
    title = "Precondition required"
    description = (
        "This write must be conditional: send `If-Match` with the ETag of the representation you "
        "based the change on (GET the resource to obtain it)."
    )


@dataclass(frozen=True, slots=True)
class VersionTag:
    kind: str
    id: str
    version: int
    representation: str

    def render(self) -> str:
        return f'"{self.kind}.{self.id}.r{self.version}.{self.representation}"'

    @classmethod
    def parse(cls, opaque: str) -> VersionTag | None:
        """The tag from its opaque part (without quotes), or None if it is not one of ours."""
        parts = opaque.split(".")
        if len(parts) != 4 or not parts[2].startswith("r") or not parts[2][1:].isdigit():
            return None
        if not (parts[0] and parts[1] and parts[3]) or len(parts[2]) > 20:
            return None
        return cls(kind=parts[0], id=parts[1], version=int(parts[2][1:]), representation=parts[3])


def content_etag(body: bytes) -> str:
    """A strong tag for exactly these bytes (128 bits of SHA-256: collisions are not a concern)."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


def _parse_list(header: str) -> list[tuple[bool, str]] | None:
    """`[(weak, opaque), ...]`, or None for `*`.

    A malformed header yields the tags read before the first unreadable one: a tag we cannot read
    cannot match, and refusing the whole request would only turn a miss into an error.
    """
    if header.strip() == "*":
        return None
    tags: list[tuple[bool, str]] = []
    position = 0
    while position < len(header):
        match = _TAG.match(header, position)
        if match is None:
            break
        tags.append((match.group(1) is not None, match.group(2)))
        position = match.end()
    return tags


def if_none_match_hits(header: str | None, etag: str) -> bool:
    """True when `If-None-Match` matches `etag` (weak comparison), i.e. the answer is 304."""
    if header is None:
        return False
    tags = _parse_list(header)
    if tags is None:
        return True
    current = etag.removeprefix("W/").strip('"')
    return any(opaque == current for _, opaque in tags)


def if_match_versions(header: str | None, *, kind: str, resource_id: str) -> frozenset[int] | None:
    """The versions an `If-Match` header accepts for this resource; None for `*` (any version).

    Raises `PreconditionRequired` without the header. Weak tags never match (strong comparison),
    nor do tags of other resources or malformed ones; an empty set therefore means "cannot match".
    Tags of any representation of the resource count: they all name the same stored version.
    """
    if header is None or not header.strip():
        raise PreconditionRequired(f"send If-Match with the ETag of this {kind} to change it")
    tags = _parse_list(header)
    if tags is None:
        return None
    versions = set()
    for weak, opaque in tags:
        tag = VersionTag.parse(opaque)
        if not weak and tag is not None and tag.kind == kind and tag.id == resource_id:
            versions.add(tag.version)
    return frozenset(versions)


def not_modified(if_none_match: str | None, etag: str) -> Response | None:
    """The 304 to send when the request's `If-None-Match` matches `etag`, else None."""
    if if_none_match_hits(if_none_match, etag):
        return not_modified_response(etag)
    return None


def not_modified_response(etag: str) -> Response:
    # A 304 carries the validator and no body (RFC 9110 §15.4.5).
    return Response(status_code=304, headers={"ETag": etag})


async def precondition_required_handler(request: Request, exc: Exception) -> Response:
    """Renders `PreconditionRequired` as a 428 problem (RFC 6585 §3)."""
    assert isinstance(exc, PreconditionRequired)
    return problem_response(
        status=428,
        slug=exc.slug,
        title=exc.title,
        detail=exc.detail,
        instance=request.url.path,
        request_id=current_request_id(),
    )
