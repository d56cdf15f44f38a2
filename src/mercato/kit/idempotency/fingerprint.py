"""Idempotency keys and request fingerprints: pure functions, no I/O.

A fingerprint says "this is the same request": SHA-256 over the method, path, query string and
body. A JSON body is canonicalised first (keys sorted, insignificant whitespace dropped), so a
client that re-serialises the same document on retry is not accused of reusing its key for a
different request. Any other body (or JSON that does not parse) is hashed byte for byte.
"""

from __future__ import annotations

import hashlib

import orjson

__all__ = ["MAX_KEY_LENGTH", "InvalidIdempotencyKey", "parse_idempotency_key", "request_fingerprint"]

MAX_KEY_LENGTH = 255

# Bumped if the encoding below ever changes, so old fingerprints can never match new ones by accident.
_FINGERPRINT_VERSION = b"mercato-idempotency-v1"


# What the OpenAPI promises for the header (ADR 0028): every value it matches, parse_idempotency_key
# accepts - a bare key, or a quoted one, of visible ASCII without `"` or `\`.
_KEY_CHAR = r"[!#-\[\]-~]"
IDEMPOTENCY_KEY_PATTERN = rf'^(?:{_KEY_CHAR}{{1,{MAX_KEY_LENGTH}}}|"{_KEY_CHAR}{{1,{MAX_KEY_LENGTH - 2}}}")$'


class InvalidIdempotencyKey(ValueError):
    """The header value is not 1-255 visible ASCII characters (optionally a quoted sf-string)."""


def parse_idempotency_key(raw: str) -> str:
    """The key from an `Idempotency-Key` header value.

    The IETF draft defines the value as a Structured Field string (`"abc"`), while most clients send
    it bare (`abc`, Stripe-style); both are accepted and mean the same key. The key itself must be
    1-255 visible ASCII characters (0x21-0x7E): bounded so it fits its column, visible so it can be
    logged and compared without normalisation surprises.
    """
    value = raw.strip(" \t")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
        # An sf-string may escape `"` and `\`; rather than unescape, refuse them: no real key needs them.
        if '"' in value or "\\" in value:
            raise InvalidIdempotencyKey("quoted key must not contain quotes or backslashes")
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(f"key must be 1-{MAX_KEY_LENGTH} characters")
    if not all(0x21 <= ord(ch) <= 0x7E for ch in value):
        raise InvalidIdempotencyKey("key must be visible ASCII characters (no spaces or control characters)")
    return value


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _canonical_body(body: bytes, content_type: str | None) -> tuple[bytes, bytes]:
    """(kind, payload): the canonical JSON text for a JSON body, else the raw bytes."""
    if body and _is_json(content_type):
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            return b"raw", body
        # OPT_SORT_KEYS sorts nested objects too; orjson's output has no insignificant whitespace.
        return b"json", orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    return b"raw", body


def request_fingerprint(
    *, method: str, path: str, body: bytes, content_type: str | None = None, query_string: bytes = b""
) -> str:
    """Hex SHA-256 of the request's identity.

    `H = SHA-256(version ‖ len·method ‖ len·path ‖ len·query ‖ len·kind ‖ len·payload)`, each part
    prefixed by its 8-byte big-endian length so no two different requests frame to the same bytes
    (a path may contain any character once percent-decoded, so no separator would be safe).
    """
    kind, payload = _canonical_body(body, content_type)
    digest = hashlib.sha256(_FINGERPRINT_VERSION)
    for part in (
        method.upper().encode("ascii"),
        path.encode("utf-8", "surrogatepass"),
        query_string,
        kind,
        payload,
    ):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()
