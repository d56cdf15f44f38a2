"""The problem types the middleware answers with, registered in the gateway's problem catalogue.

The middleware renders these itself (it runs outside the routes), so the classes are never raised
through the gateway's handler; subclassing the kit's error kinds is what puts their slug, title and
description in `GET /problems`, and keeps the kind consistent with the status the middleware uses.
"""

from __future__ import annotations

from typing import ClassVar

from mercato.kit.errors import Conflict, DomainError, RuleViolated

__all__ = [
    "IdempotencyKeyInFlight",
    "IdempotencyKeyMalformed",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
]


class IdempotencyKeyMissing(DomainError):
    slug = "idempotency-key-missing"
    title = "Idempotency-Key required"
    description = (
        "This operation must carry an `Idempotency-Key` header (a unique value per logical operation, "
        "for example a UUID) so that it can be retried safely."
    )
    status: ClassVar[int] = 400


class IdempotencyKeyMalformed(DomainError):
    slug = "idempotency-key-malformed"
    title = "Idempotency-Key malformed"
    description = "The `Idempotency-Key` header must appear once and be 1-255 visible ASCII characters."
    status: ClassVar[int] = 400


class IdempotencyKeyReused(RuleViolated):
    slug = "idempotency-key-reused"
    title = "Idempotency-Key reused for a different request"
    description = (
        "The key was already used with a different method, path or body. Use a new key for a new "
        "operation; retry an operation with exactly the same request."
    )
    status: ClassVar[int] = 422


class IdempotencyKeyInFlight(Conflict):
    slug = "idempotency-key-in-flight"
    title = "Request with this Idempotency-Key in progress"
    description = (
        "A request with the same key is still being processed. Retry after `Retry-After` seconds to "
        "receive its stored response."
    )
    status: ClassVar[int] = 409
