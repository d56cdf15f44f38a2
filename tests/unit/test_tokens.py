from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import jwt
import pytest

from mercato.kit.auth import InvalidToken, Principal, TokenCodec
from mercato.kit.clock import ManualClock

SECRET = "unit-test-secret-0123456789abcdef0123456789"


def codec(clock: ManualClock, secret: str = SECRET) -> TokenCodec:
    return TokenCodec(secret=secret, issuer="mercato", audience="mercato-api", access_ttl_s=900, clock=clock)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))


def test_round_trip_carries_roles_and_scopes(clock: ManualClock) -> None:
    issued = codec(clock).issue(
        Principal("u1", frozenset({"admin"}), frozenset({"catalog:write", "orders:read"}))
    )
    principal = codec(clock).verify(issued.token)
    assert principal.subject == "u1"
    assert principal.roles == {"admin"}
    assert principal.scopes == {"catalog:write", "orders:read"}
    assert issued.expires_in == 900


def test_expired_token_is_rejected(clock: ManualClock) -> None:
    token = codec(clock).issue(Principal("u1")).token
    clock.advance(901 + 10)
    with pytest.raises(InvalidToken):
        codec(clock).verify(token)


def test_wrong_key_is_rejected(clock: ManualClock) -> None:
    token = codec(clock, secret="another-secret-0123456789abcdef0123456789").issue(Principal("u1")).token
    with pytest.raises(InvalidToken):
        codec(clock).verify(token)


def test_tampered_payload_is_rejected(clock: ManualClock) -> None:
    token = codec(clock).issue(Principal("u1", frozenset({"customer"}))).token
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        codec(clock).verify(f"{header}.{forged}.{signature}")


def test_alg_none_is_rejected(clock: ManualClock) -> None:
    now = int(clock.now().timestamp())
    claims = {
        "sub": "u1",
        "iss": "mercato",
        "aud": "mercato-api",
        "iat": now,
        "nbf": now,
        "exp": now + 600,
        "jti": "x",
        "roles": ["admin"],
        "scope": "catalog:write",
    }
    unsigned = jwt.encode(claims, key=None, algorithm="none")  # type: ignore[arg-type]
    with pytest.raises(InvalidToken):
        codec(clock).verify(unsigned)


def test_short_secret_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenCodec(secret="short", issuer="i", audience="a", access_ttl_s=60)
