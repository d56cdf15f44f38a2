"""Access-token signing keys (ADR 0036): Ed25519 key pairs named by a `kid`, the in-process key ring
every `TokenCodec` signs and verifies with, and the sealing of private keys at rest.

The ring is a snapshot swapped whole (`KeyRing.replace`), so a verification on the request path
never waits for, nor issues, a database statement: whoever stores the keys (the identity context's
`SigningKeyStore`) reloads the ring in the background.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

ALGORITHM = "EdDSA"
_NONCE_BYTES = 12


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One key pair. `private` is None where only verification is needed (never in JWKS)."""

    kid: str
    generation: int
    public: Ed25519PublicKey
    private: Ed25519PrivateKey | None
    created_at: datetime
    # When a newer key took over signing; the key still verifies for `KeyRing.overlap_s` after.
    retired_at: datetime | None = None

    @classmethod
    def generate(cls, *, generation: int, now: datetime) -> SigningKey:
        private = Ed25519PrivateKey.generate()
        public = private.public_key()
        return cls(kid=kid_of(public), generation=generation, public=public, private=private, created_at=now)

    def public_bytes(self) -> bytes:
        return self.public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)

    def private_bytes(self) -> bytes:
        if self.private is None:
            raise ValueError(f"key {self.kid} has no private half")
        return self.private.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )

    def verifies_until(self, overlap_s: float) -> datetime | None:
        """The last instant a token signed by this key can still be accepted (None: while it signs)."""
        return None if self.retired_at is None else self.retired_at + timedelta(seconds=overlap_s)

    def jwk(self) -> dict[str, str]:
        """RFC 8037 public JWK (OKP, Ed25519)."""
        return {
            "kty": "OKP",
            "crv": "Ed25519",
            "x": _b64url(self.public_bytes()),
            "kid": self.kid,
            "alg": ALGORITHM,
            "use": "sig",
        }


def kid_of(public: Ed25519PublicKey) -> str:
    """The key's RFC 7638 JWK thumbprint: stable, derived from the key, never guessable before it."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    canonical = f'{{"crv":"Ed25519","kty":"OKP","x":"{_b64url(raw)}"}}'.encode()
    return _b64url(hashlib.sha256(canonical).digest())


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class KeyRing:
    """The keys one process signs and verifies with: the newest signs, the retired verify for
    `overlap_s` after their retirement (the access-token TTL plus the reload bound, so a token
    signed by a process that has not yet seen the rotation still outlives its own expiry)."""

    def __init__(self, keys: tuple[SigningKey, ...] = (), *, overlap_s: float) -> None:
        self._overlap_s = overlap_s
        self._keys: tuple[SigningKey, ...] = ()
        self._by_kid: dict[str, SigningKey] = {}
        self.replace(keys)

    @property
    def overlap_s(self) -> float:
        return self._overlap_s

    @property
    def keys(self) -> tuple[SigningKey, ...]:
        """Every key known, newest first."""
        return self._keys

    def replace(self, keys: tuple[SigningKey, ...] | list[SigningKey]) -> None:
        ordered = tuple(sorted(keys, key=lambda k: k.generation, reverse=True))
        # One assignment each: a reader sees either the old or the new set, never a mix that matters.
        self._by_kid = {key.kid: key for key in ordered}
        self._keys = ordered

    def signer(self) -> SigningKey | None:
        """The newest key with a private half that has not been retired."""
        for key in self._keys:
            if key.retired_at is None and key.private is not None:
                return key
        return None

    def verifier(self, kid: str, now: datetime) -> SigningKey | None:
        """The key named `kid` if it may still verify at `now`; None for unknown or expired keys."""
        key = self._by_kid.get(kid)
        if key is None:
            return None
        until = key.verifies_until(self._overlap_s)
        return key if until is None or now <= until else None

    def verifying(self, now: datetime) -> list[SigningKey]:
        return [key for key in self._keys if self.verifier(key.kid, now) is not None]

    def jwks(self, now: datetime) -> dict[str, list[dict[str, str]]]:
        """RFC 7517 JWK Set of the public keys that verify at `now` (never a private half)."""
        return {"keys": [key.jwk() for key in self.verifying(now)]}


class KeyLoader(Protocol):
    """Whoever fills a `KeyRing` from shared storage."""

    async def ensure_loaded(self) -> None:
        """Load the keys if this process never has; no I/O otherwise."""
        ...


class KeySealer:
    """AES-256-GCM for private keys at rest, keyed by HKDF-SHA256 of the deployment's auth secret.

    The `kid` is the associated data, so a sealed private key copied onto another row does not open.
    """

    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("token secret must be at least 32 characters")
        key = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=None, info=b"mercato/auth/signing-keys/v1"
        ).derive(secret.encode())
        self._aead = AESGCM(key)

    def seal(self, key: SigningKey) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return nonce + self._aead.encrypt(nonce, key.private_bytes(), key.kid.encode())

    def open(self, kid: str, sealed: bytes) -> Ed25519PrivateKey:
        """The private key; `cryptography.exceptions.InvalidTag` when the secret is not the one that
        sealed it (or the row was tampered with)."""
        raw = self._aead.decrypt(sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], kid.encode())
        return Ed25519PrivateKey.from_private_bytes(raw)


def public_key_from(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)
