"""Envelope encryption of personal data: one data key per person, wrapped by a master key.

Each data subject (a customer) gets a random 256-bit data key. Their personal fields are sealed
with it (AES-256-GCM, the field's name and the subject's id as associated data, so a sealed value
copied onto another row or column does not open). The data key itself is stored only *wrapped*
(AES-256-GCM under the master key, derived by HKDF from the deployment's secret). Destroying the
wrapped data key makes every copy of the sealed fields unreadable at once — in the live tables,
in the event store, in replicas and in backups: that is crypto-shredding (guide §12).

Lookups by e-mail cannot use the sealed value (a fresh nonce each time), so a keyed hash
(HMAC-SHA256 under a second HKDF-derived key) of the normalised address is stored beside it: it
finds the row and enforces uniqueness, and without the secret it cannot be tested against guesses.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = ["DataKey", "FieldUnreadable", "MasterKey"]

_NONCE_BYTES = 12
_KEY_BYTES = 32
# The first byte of every sealed value names its format, so a later format can be read beside it.
_FORMAT_V1 = b"\x01"


class FieldUnreadable(Exception):
    """A sealed value that does not open: its data key was shredded, or the value was tampered with."""


def _derive(secret: str, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=_KEY_BYTES, salt=None, info=info).derive(secret.encode())


@dataclass(frozen=True, slots=True)
class DataKey:
    """One subject's data key, unwrapped (in memory only, never stored like this)."""

    subject_id: uuid.UUID
    material: bytes

    def seal(self, field: str, plaintext: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        sealed = AESGCM(self.material).encrypt(nonce, plaintext.encode(), self._aad(field))
        return _FORMAT_V1 + nonce + sealed

    def open(self, field: str, sealed: bytes) -> str:
        if not sealed.startswith(_FORMAT_V1):
            raise FieldUnreadable(f"unknown sealed-value format for {field}")
        nonce, body = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return AESGCM(self.material).decrypt(nonce, body, self._aad(field)).decode()
        except InvalidTag as exc:
            raise FieldUnreadable(f"{field} does not open with this subject's key") from exc

    def _aad(self, field: str) -> bytes:
        return f"{self.subject_id}/{field}".encode()


class MasterKey:
    """Wraps data keys and computes lookup hashes; both keys derived from one deployment secret."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 32:
            raise ValueError("the privacy master secret must be at least 32 characters")
        self._wrapping = AESGCM(_derive(secret, b"mercato/privacy/data-key-wrapping/v1"))
        self._lookup = _derive(secret, b"mercato/privacy/lookup-hash/v1")

    def new_data_key(self, subject_id: uuid.UUID) -> DataKey:
        return DataKey(subject_id, AESGCM.generate_key(bit_length=256))

    def wrap(self, key: DataKey) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _FORMAT_V1 + nonce + self._wrapping.encrypt(nonce, key.material, key.subject_id.bytes)

    def unwrap(self, subject_id: uuid.UUID, wrapped: bytes) -> DataKey:
        if not wrapped.startswith(_FORMAT_V1):
            raise FieldUnreadable("unknown wrapped-key format")
        nonce, body = wrapped[1 : 1 + _NONCE_BYTES], wrapped[1 + _NONCE_BYTES :]
        try:
            return DataKey(subject_id, self._wrapping.decrypt(nonce, body, subject_id.bytes))
        except InvalidTag as exc:
            raise FieldUnreadable("the data key does not unwrap under this master key") from exc

    def lookup_hash(self, kind: str, value: str) -> str:
        """Hex HMAC-SHA256 of `kind:value`: equal inputs give equal hashes, nothing else is learnt."""
        return hmac.new(self._lookup, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
