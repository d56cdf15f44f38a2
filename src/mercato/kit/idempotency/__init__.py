"""Idempotency-Key support: a database-backed key store and the ASGI middleware that uses it.

Wire `IdempotencyMiddleware(app, store=IdempotencyStore(db, clock=clock), ...)` inside the body-size
limit, and run `purge_expired` periodically. See docs/decisions/0006-idempotency-keys.md.
"""

from mercato.kit.idempotency.fingerprint import (
    MAX_KEY_LENGTH,
    InvalidIdempotencyKey,
    parse_idempotency_key,
    request_fingerprint,
)
from mercato.kit.idempotency.metrics import (
    IdempotencyHook,
    NullIdempotencyHook,
    PrometheusIdempotencyMetrics,
)
from mercato.kit.idempotency.middleware import (
    DEFAULT_REPLAY_HEADERS,
    IdempotencyMiddleware,
    PathRule,
    ScopeResolver,
    default_scope_resolver,
)
from mercato.kit.idempotency.problems import (
    IdempotencyKeyInFlight,
    IdempotencyKeyMalformed,
    IdempotencyKeyMissing,
    IdempotencyKeyReused,
)
from mercato.kit.idempotency.store import (
    Claimed,
    ClaimOutcome,
    IdempotencyRecord,
    IdempotencyStore,
    InFlight,
    Mismatch,
    Replay,
    StoredResponse,
    purge_expired,
)
from mercato.kit.idempotency.tables import idempotency_keys

__all__ = [
    "DEFAULT_REPLAY_HEADERS",
    "MAX_KEY_LENGTH",
    "ClaimOutcome",
    "Claimed",
    "IdempotencyHook",
    "IdempotencyKeyInFlight",
    "IdempotencyKeyMalformed",
    "IdempotencyKeyMissing",
    "IdempotencyKeyReused",
    "IdempotencyMiddleware",
    "IdempotencyRecord",
    "IdempotencyStore",
    "InFlight",
    "InvalidIdempotencyKey",
    "Mismatch",
    "NullIdempotencyHook",
    "PathRule",
    "PrometheusIdempotencyMetrics",
    "Replay",
    "ScopeResolver",
    "StoredResponse",
    "default_scope_resolver",
    "idempotency_keys",
    "parse_idempotency_key",
    "purge_expired",
    "request_fingerprint",
]
