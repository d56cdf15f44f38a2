from __future__ import annotations

import base64
import json
from datetime import UTC, datetime

import jwt
import pytest

from mercato.kit.auth import InvalidToken, Principal, TokenCodec
from mercato.kit.auth.keys import KeyRing, KeySealer, SigningKey
from mercato.kit.clock import ManualClock

SECRET = "unit-test-secret-0123456789abcdef0123456789"
START = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
# The ring every `codec()` shares unless told otherwise: one key, as a process loads it.
RING = KeyRing((SigningKey.generate(generation=1, now=START),), overlap_s=900 + 30)


def codec(clock: ManualClock, ring: KeyRing = RING) -> TokenCodec:
    return TokenCodec(keys=ring, issuer="mercato", audience="mercato-api", access_ttl_s=900, clock=clock)


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


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
    # Another deployment's key under the same kid is still the wrong key.
    other = SigningKey.generate(generation=1, now=START)
    impostor = SigningKey(
        kid=RING.keys[0].kid, generation=1, public=other.public, private=other.private, created_at=START
    )
    token = codec(clock, KeyRing((impostor,), overlap_s=930)).issue(Principal("u1")).token
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
        KeySealer("short")


def _claims(clock: ManualClock) -> dict[str, object]:
    now = int(clock.now().timestamp())
    return {
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


def test_tokens_are_eddsa_with_the_signing_kid(clock: ManualClock) -> None:
    header = jwt.get_unverified_header(codec(clock).issue(Principal("u1")).token)
    assert header["alg"] == "EdDSA"
    assert header["kid"] == RING.keys[0].kid


def test_hs256_keyed_with_the_public_key_is_rejected(clock: ManualClock) -> None:
    """Algorithm confusion: the public key (as published in the JWKS) used as an HMAC secret."""
    key = RING.keys[0]
    for secret in (key.public_bytes(), key.jwk()["x"].encode()):
        forged = jwt.encode(_claims(clock), secret, algorithm="HS256", headers={"kid": key.kid})
        with pytest.raises(InvalidToken):
            codec(clock).verify(forged)


def test_unknown_kid_is_rejected(clock: ManualClock) -> None:
    stranger = SigningKey.generate(generation=1, now=START)
    assert stranger.private is not None
    forged = jwt.encode(_claims(clock), stranger.private, algorithm="EdDSA", headers={"kid": stranger.kid})
    with pytest.raises(InvalidToken, match="unknown or retired"):
        codec(clock).verify(forged)
    no_kid = jwt.encode(_claims(clock), stranger.private, algorithm="EdDSA")
    with pytest.raises(InvalidToken):
        codec(clock).verify(no_kid)


def test_retired_key_verifies_for_the_overlap_only(clock: ManualClock) -> None:
    old = SigningKey.generate(generation=1, now=START)
    ring = KeyRing((old,), overlap_s=930)
    token = codec(clock, ring).issue(Principal("u1")).token
    new = SigningKey.generate(generation=2, now=START)
    retired = SigningKey(
        kid=old.kid, generation=1, public=old.public, private=old.private, created_at=START, retired_at=START
    )
    ring.replace([retired, new])
    assert jwt.get_unverified_header(codec(clock, ring).issue(Principal("u2")).token)["kid"] == new.kid
    assert codec(clock, ring).verify(token).subject == "u1"
    assert [k.kid for k in ring.verifying(clock.now())] == [new.kid, old.kid]
    # A token it signed could be 900 s old by then; the key outlives it by the reload bound (30 s).
    clock.advance(930)
    assert ring.verifier(old.kid, clock.now()) is not None
    clock.advance(1)
    assert ring.verifier(old.kid, clock.now()) is None
    assert [k["kid"] for k in ring.jwks(clock.now())["keys"]] == [new.kid]


def test_a_token_seen_before_skips_the_signature_but_not_the_time_or_key_checks(
    clock: ManualClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    ring = KeyRing((SigningKey.generate(generation=1, now=START),), overlap_s=930)
    verifying = codec(clock, ring)
    token = verifying.issue(Principal("u1", frozenset({"customer"}), frozenset({"orders:write"}))).token
    decodes = 0
    real_decode = jwt.decode

    def counting_decode(*args: object, **kwargs: object) -> object:
        nonlocal decodes
        decodes += 1
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(jwt, "decode", counting_decode)
    first = verifying.verify(token)
    again = verifying.verify(token)
    assert again == first
    assert again.scopes == {"orders:write"}
    assert decodes == 1  # the second request's signature check was remembered
    # Expiry is still judged on every use.
    clock.advance(901 + 10)
    with pytest.raises(InvalidToken, match="expired"):
        verifying.verify(token)
    # And so is the key: once it stops verifying, a remembered token is refused too.
    fresh = codec(ManualClock(START), ring)
    later = fresh.issue(Principal("u2")).token
    fresh.verify(later)
    retired = KeyRing((), overlap_s=930)
    fresh._keys = retired
    with pytest.raises(InvalidToken, match="retired"):
        fresh.verify(later)


def test_a_tampered_copy_of_a_remembered_token_is_still_checked(clock: ManualClock) -> None:
    verifying = codec(clock)
    token = verifying.issue(Principal("u1", frozenset({"customer"}))).token
    verifying.verify(token)
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    with pytest.raises(InvalidToken):
        verifying.verify(f"{header}.{forged}.{signature}")


def test_a_remembered_token_still_verifies_after_the_ring_reloads_the_same_key(clock: ManualClock) -> None:
    # Every process reloads its ring from the database (every 30 s), which hands out new key
    # objects for the same keys: a token remembered under the old object must not be refused
    # (it was: a burst of 401s for every remembered token after each reload, seen in the bench).
    key = SigningKey.generate(generation=1, now=START)
    ring = KeyRing((key,), overlap_s=930)
    verifying = codec(clock, ring)
    token = verifying.issue(Principal("u1")).token
    verifying.verify(token)
    reloaded = SigningKey(
        kid=key.kid, generation=1, public=key.public, private=key.private, created_at=key.created_at
    )
    ring.replace((reloaded,))
    assert verifying.verify(token).subject == "u1"
