from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from mercato.kit.errors import Conflict, RuleViolated, Unauthenticated, registered_errors
from mercato.shop.identity.contracts import Role, Scope
from mercato.shop.identity.model import (
    ROLE_SCOPES,
    EmailTaken,
    InvalidCredentials,
    InvalidDisplayName,
    InvalidEmail,
    InvalidRefreshToken,
    RefreshToken,
    RefreshVerdict,
    TokenStatus,
    User,
    WeakPassword,
    hash_refresh_token,
    normalise_display_name,
    normalise_email,
    normalise_login_password,
    prepare_password,
    start_family,
)

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)


def test_scope_vocabulary_is_the_published_one() -> None:
    assert {s.value for s in ROLE_SCOPES[Role.CUSTOMER]} == {
        "cart:read",
        "cart:write",
        "orders:read",
        "orders:write",
    }
    assert {s.value for s in ROLE_SCOPES[Role.ADMIN]} == {
        "cart:read",
        "cart:write",
        "orders:read",
        "orders:write",
        "catalog:write",
        "inventory:read",
        "inventory:write",
        "orders:read_all",
        "users:write",
    }
    assert {s.value for s in ROLE_SCOPES[Role.SERVICE]} == {
        "inventory:read",
        "inventory:write",
        "orders:read_all",
    }
    assert set(ROLE_SCOPES) == set(Role)


def test_admin_has_everything_a_customer_has() -> None:
    assert ROLE_SCOPES[Role.CUSTOMER] <= ROLE_SCOPES[Role.ADMIN]


def test_user_principal_carries_role_and_scopes_as_plain_strings() -> None:
    user = User(
        id=uuid.uuid4(),
        email="a@example.com",
        role=Role.ADMIN,
        display_name="a",
        disabled=False,
        created_at=NOW,
        updated_at=NOW,
        password_hash="$argon2id$secret-hash",
    )
    principal = user.principal()
    assert principal.subject == str(user.id)
    assert principal.roles == {"admin"}
    assert principal.has_scopes("catalog:write", "users:write")
    assert all(type(scope) is str for scope in principal.scopes)
    assert "secret-hash" not in repr(user)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  Ada@Example.COM ", "ada@example.com"),
        ("first.last+tag@sub.example.org", "first.last+tag@sub.example.org"),
        ("admin@mercato.local", "admin@mercato.local"),
    ],
)
def test_email_is_trimmed_and_lower_cased(raw: str, expected: str) -> None:
    assert normalise_email(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "plain",
        "@example.com",
        "ada@",
        "ada@localhost",
        "ada@@example.com",
        "ada..lovelace@example.com",
        ".ada@example.com",
        "ada@-example.com",
        "ada@exa mple.com",
        "ädä@example.com",
        "a" * 65 + "@example.com",
        "a@" + "b" * 250 + ".com",
    ],
)
def test_invalid_emails_are_refused_with_the_field(raw: str) -> None:
    with pytest.raises(InvalidEmail) as caught:
        normalise_email(raw)
    assert caught.value.extensions["field"] == "email"


def test_password_policy_bounds() -> None:
    assert prepare_password("x" * 10) == "x" * 10
    assert prepare_password("y" * 128) == "y" * 128
    for bad in ("x" * 9, "z" * 129, " " * 12):
        with pytest.raises(WeakPassword) as caught:
            prepare_password(bad)
        assert caught.value.extensions["field"] == "password"


def test_password_is_nfkc_normalised_the_same_way_at_sign_up_and_login() -> None:
    composed = "caf\u00e9-password"
    decomposed = "cafe\u0301-password"
    assert prepare_password(decomposed) == prepare_password(composed)
    assert normalise_login_password(decomposed) == prepare_password(composed)


def test_login_normalisation_applies_no_policy() -> None:
    assert normalise_login_password("short") == "short"


def test_display_name_defaults_to_the_mailbox_and_is_bounded() -> None:
    assert normalise_display_name(None, email="ada@example.com") == "ada"
    assert normalise_display_name("  Ada L. ", email="ada@example.com") == "Ada L."
    with pytest.raises(InvalidDisplayName):
        normalise_display_name("x" * 101, email="ada@example.com")
    with pytest.raises(InvalidDisplayName):
        normalise_display_name("bell\x07", email="ada@example.com")


def _token(status: TokenStatus = TokenStatus.ACTIVE, ttl_s: int = 3600) -> RefreshToken:
    token = start_family(
        token_id=uuid.uuid4(),
        family_id=uuid.uuid4(),
        user_id=uuid.uuid4(),
        token_hash=hash_refresh_token("raw"),
        now=NOW,
        ttl_s=ttl_s,
    )
    return replace(token, status=status)


def test_active_unexpired_token_rotates() -> None:
    assert _token().verdict(NOW + timedelta(seconds=3599)) is RefreshVerdict.ROTATE


def test_expired_token_is_rejected_at_the_boundary() -> None:
    assert _token().verdict(NOW + timedelta(seconds=3600)) is RefreshVerdict.REJECT


def test_revoked_token_is_rejected() -> None:
    assert _token(TokenStatus.REVOKED).verdict(NOW) is RefreshVerdict.REJECT


def test_rotated_token_is_reuse_even_after_it_expired() -> None:
    token = _token(TokenStatus.ROTATED)
    assert token.verdict(NOW) is RefreshVerdict.REUSED
    assert token.verdict(NOW + timedelta(days=365)) is RefreshVerdict.REUSED


def test_successor_stays_in_the_family_with_a_sliding_expiry() -> None:
    first = _token()
    later = NOW + timedelta(seconds=1000)
    nxt = first.successor(token_id=uuid.uuid4(), token_hash="h", now=later, ttl_s=3600)
    assert nxt.family_id == first.family_id
    assert nxt.user_id == first.user_id
    assert nxt.status is TokenStatus.ACTIVE
    assert nxt.expires_at == later + timedelta(seconds=3600)


def test_refresh_tokens_are_stored_as_sha256_hex() -> None:
    assert hash_refresh_token("abc") == hashlib.sha256(b"abc").hexdigest()
    assert len(hash_refresh_token("abc")) == 64


def test_errors_have_the_right_kind_and_are_in_the_catalogue() -> None:
    assert issubclass(EmailTaken, Conflict)
    assert issubclass(InvalidCredentials, Unauthenticated)
    assert issubclass(InvalidRefreshToken, Unauthenticated)
    assert issubclass(WeakPassword, RuleViolated)
    catalogue = registered_errors()
    for cls in (EmailTaken, InvalidCredentials, InvalidRefreshToken, WeakPassword, InvalidEmail):
        assert catalogue[cls.slug] is cls
        assert cls.title
        assert cls.description


def test_scope_constants_are_plain_strings_for_other_contexts() -> None:
    assert Scope.CATALOG_WRITE == "catalog:write"
    assert f"{Scope.ORDERS_READ_ALL}" == "orders:read_all"
