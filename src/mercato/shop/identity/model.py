"""Identity entities and rules. Pure: no I/O, so every rule is tested without a database.

Refresh tokens follow the rotation-with-reuse-detection scheme of the OAuth 2.0 Security BCP
(RFC 9700 §4.14.2): every login starts a *family*; each refresh retires the presented token and
issues its successor in the same family; presenting a retired token again means two parties hold
copies of it, so the whole family is revoked and both must log in again.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum

from mercato.kit.auth import Principal
from mercato.kit.errors import Conflict, RuleViolated, Unauthenticated
from mercato.shop.identity.contracts import Role, Scope

__all__ = [
    "EMAIL_PATTERN",
    "MAX_DISPLAY_NAME_LENGTH",
    "MAX_EMAIL_LENGTH",
    "MAX_PASSWORD_LENGTH",
    "MAX_REFRESH_TOKEN_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "ROLE_SCOPES",
    "AccountUnavailable",
    "EmailTaken",
    "InvalidCredentials",
    "InvalidDisplayName",
    "InvalidEmail",
    "InvalidRefreshToken",
    "RefreshToken",
    "RefreshVerdict",
    "Role",
    "Scope",
    "TokenStatus",
    "User",
    "WeakPassword",
    "hash_refresh_token",
    "normalise_display_name",
    "normalise_email",
    "normalise_login_password",
    "prepare_password",
    "scopes_for",
    "start_family",
]

MIN_PASSWORD_LENGTH = 10
MAX_PASSWORD_LENGTH = 128
MAX_EMAIL_LENGTH = 254  # RFC 5321 path limit minus the angle brackets
MAX_LOCAL_PART_LENGTH = 64
MAX_DISPLAY_NAME_LENGTH = 100
# `secrets.token_urlsafe(32)` gives 43 characters; anything far longer is not one of ours.
MAX_REFRESH_TOKEN_LENGTH = 256

_CUSTOMER_SCOPES = frozenset({Scope.CART_READ, Scope.CART_WRITE, Scope.ORDERS_READ, Scope.ORDERS_WRITE})
ROLE_SCOPES: dict[Role, frozenset[Scope]] = {
    Role.CUSTOMER: _CUSTOMER_SCOPES,
    Role.ADMIN: _CUSTOMER_SCOPES
    | {
        Scope.CATALOG_WRITE,
        Scope.INVENTORY_READ,
        Scope.INVENTORY_WRITE,
        Scope.ORDERS_READ_ALL,
        Scope.USERS_WRITE,
    },
    Role.SERVICE: frozenset({Scope.INVENTORY_READ, Scope.INVENTORY_WRITE, Scope.ORDERS_READ_ALL}),
}

# A deliberately plain address grammar (dot-atom local part, LDH domain labels): it accepts what
# real mail systems deliver to and refuses quoted local parts, IP literals and non-ASCII, which
# are rare and a frequent source of spoofing and normalisation bugs.
_LOCAL_PART = re.compile(r"^[a-z0-9!#$%&'*+/=?^_`{|}~-]+(\.[a-z0-9!#$%&'*+/=?^_`{|}~-]+)*$")
_DOMAIN_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# The same rule as one pattern, for the OpenAPI (ECMA-262 and Python `re` read it alike): what it
# matches, `normalise_email` accepts, so a client's own validation and the server's agree (ADR 0028).
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
EMAIL_PATTERN = rf"^(?=[^@]{{1,{MAX_LOCAL_PART_LENGTH}}}@){_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})+$"


class EmailTaken(Conflict):
    slug = "email-taken"
    title = "E-mail already registered"
    description = "An account with this e-mail address already exists; addresses are case-insensitive."


class InvalidEmail(RuleViolated):
    slug = "invalid-email"
    title = "Invalid e-mail address"
    description = "The e-mail address is not of the form local@domain.tld (ASCII, at most 254 characters)."


class WeakPassword(RuleViolated):
    slug = "weak-password"
    title = "Password does not meet the policy"
    description = (
        f"Passwords must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters and not only spaces."
    )


class InvalidDisplayName(RuleViolated):
    slug = "invalid-display-name"
    title = "Invalid display name"
    description = f"Display names are 1 to {MAX_DISPLAY_NAME_LENGTH} printable characters."


class InvalidCredentials(Unauthenticated):
    slug = "invalid-credentials"
    title = "Invalid credentials"
    description = "The e-mail address and password do not match an active account."


class InvalidRefreshToken(Unauthenticated):
    slug = "invalid-refresh-token"
    title = "Invalid refresh token"
    description = "The refresh token is unknown, expired, revoked or already used; log in again."


class AccountUnavailable(Unauthenticated):
    slug = "account-unavailable"
    title = "Account unavailable"
    description = "The account this access token was issued to no longer exists or is disabled."


def scopes_for(role: Role) -> frozenset[Scope]:
    return ROLE_SCOPES[role]


def normalise_email(raw: str) -> str:
    """Trimmed and lower-cased, so uniqueness and lookups are case-insensitive on every backend.

    Lower-casing the local part is technically lossy (RFC 5321 lets it be case-sensitive), but no
    mainstream provider treats it so, and two accounts differing only in case invite takeover.
    """
    email = raw.strip().lower()
    if len(email) > MAX_EMAIL_LENGTH:
        raise InvalidEmail(f"e-mail address is longer than {MAX_EMAIL_LENGTH} characters", field="email")
    local, at, domain = email.rpartition("@")
    if not at or not local or not domain:
        raise InvalidEmail("e-mail address must look like name@example.com", field="email")
    if len(local) > MAX_LOCAL_PART_LENGTH or not _LOCAL_PART.match(local):
        raise InvalidEmail("the part before @ is not a valid mailbox name", field="email")
    labels = domain.split(".")
    if len(labels) < 2 or not all(_DOMAIN_LABEL.match(label) for label in labels):
        raise InvalidEmail("the part after @ is not a valid domain name", field="email")
    return email


def prepare_password(raw: str) -> str:
    """Apply the policy and return the form to hash.

    NFKC normalisation (NIST SP 800-63B §5.1.1.2) makes a password typed on another keyboard
    or OS, which may compose accented characters differently, hash to the same value.
    """
    password = unicodedata.normalize("NFKC", raw)
    if len(password) < MIN_PASSWORD_LENGTH:
        raise WeakPassword(f"password must be at least {MIN_PASSWORD_LENGTH} characters", field="password")
    if len(password) > MAX_PASSWORD_LENGTH:
        raise WeakPassword(f"password must be at most {MAX_PASSWORD_LENGTH} characters", field="password")
    if not password.strip():
        raise WeakPassword("password must not be only whitespace", field="password")
    return password


def normalise_login_password(raw: str) -> str:
    """The form a login attempt is verified in: the same normalisation, but no policy.

    The policy is not re-applied at login so tightening it never locks existing accounts out.
    """
    return unicodedata.normalize("NFKC", raw)


def normalise_display_name(raw: str | None, *, email: str) -> str:
    """Trimmed; defaults to the mailbox name so every account has something to greet."""
    name = (raw or "").strip()
    if not name:
        name = email.partition("@")[0][:MAX_DISPLAY_NAME_LENGTH]
    if len(name) > MAX_DISPLAY_NAME_LENGTH:
        raise InvalidDisplayName(
            f"display name is longer than {MAX_DISPLAY_NAME_LENGTH} characters", field="display_name"
        )
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise InvalidDisplayName("display name contains control characters", field="display_name")
    return name


@dataclass(frozen=True, slots=True)
class User:
    id: uuid.UUID
    email: str
    role: Role
    display_name: str
    disabled: bool
    created_at: datetime
    updated_at: datetime
    # Kept out of repr so a logged or printed user never carries the hash.
    password_hash: str = field(repr=False)

    @property
    def scopes(self) -> frozenset[Scope]:
        return scopes_for(self.role)

    def principal(self) -> Principal:
        """What an access token for this user asserts."""
        return Principal(
            subject=str(self.id),
            roles=frozenset({self.role.value}),
            scopes=frozenset(scope.value for scope in self.scopes),
        )

    def with_password_hash(self, password_hash: str, *, now: datetime) -> User:
        return replace(self, password_hash=password_hash, updated_at=now)


class TokenStatus(StrEnum):
    ACTIVE = "active"
    ROTATED = "rotated"
    REVOKED = "revoked"


class RefreshVerdict(StrEnum):
    """What to do with a presented refresh token."""

    ROTATE = "rotate"
    REUSED = "reused"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class RefreshToken:
    id: uuid.UUID
    user_id: uuid.UUID
    family_id: uuid.UUID
    token_hash: str = field(repr=False)
    status: TokenStatus
    issued_at: datetime
    expires_at: datetime
    rotated_at: datetime | None = None
    replaced_by: uuid.UUID | None = None

    def verdict(self, now: datetime) -> RefreshVerdict:
        """Rotated wins over expired: a retired token showing up again is reuse however old it is."""
        if self.status is TokenStatus.ROTATED:
            return RefreshVerdict.REUSED
        if self.status is TokenStatus.REVOKED or now >= self.expires_at:
            return RefreshVerdict.REJECT
        return RefreshVerdict.ROTATE

    def successor(self, *, token_id: uuid.UUID, token_hash: str, now: datetime, ttl_s: int) -> RefreshToken:
        """The next token of the family. Its lifetime slides: `ttl_s` is an inactivity timeout."""
        return RefreshToken(
            id=token_id,
            user_id=self.user_id,
            family_id=self.family_id,
            token_hash=token_hash,
            status=TokenStatus.ACTIVE,
            issued_at=now,
            expires_at=now + timedelta(seconds=ttl_s),
        )


def start_family(
    *,
    token_id: uuid.UUID,
    family_id: uuid.UUID,
    user_id: uuid.UUID,
    token_hash: str,
    now: datetime,
    ttl_s: int,
) -> RefreshToken:
    """The first token of a new family, issued at login."""
    return RefreshToken(
        id=token_id,
        user_id=user_id,
        family_id=family_id,
        token_hash=token_hash,
        status=TokenStatus.ACTIVE,
        issued_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def hash_refresh_token(raw: str) -> str:
    """SHA-256 hex. A fast hash is right here: the token has 256 bits of entropy, nothing to brute-force."""
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()
