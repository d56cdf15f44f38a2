"""Signed, expiring URLs: HMAC-SHA256 over the path and the expiry, with a key id for rotation.

    sig = base64url(HMAC-SHA256(key[kid], path + "\\n" + str(expires)))     (no padding)
    URL = path ? expires=<unix seconds> & kid=<key id> & sig=<sig>

The method is not signed (a signed URL is for GET/HEAD only, which is all the media route serves),
nor the host (the same URL is valid behind any CDN hostname). Rotation: the current key signs and
every configured key verifies, so a new key is deployed, made current, and the old one removed only
once the URLs it signed have expired. Verification checks the key id, then the MAC in constant time,
then the expiry, so a forged URL learns nothing about which keys exist beyond "unknown kid".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from mercato.kit.clock import Clock, SystemClock

__all__ = ["InvalidSignature", "SignedUrl", "UrlSigner"]

_KID = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
MIN_KEY_BYTES = 32


class InvalidSignature(Exception):
    """The URL was not signed by us, was altered, or has expired; `reason` says which (for logs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "unknown_kid" | "bad_signature" | "expired" | "malformed"


@dataclass(frozen=True, slots=True)
class SignedUrl:
    path: str
    expires: int
    kid: str
    sig: str

    @property
    def url(self) -> str:
        return f"{self.path}?{urlencode({'expires': self.expires, 'kid': self.kid, 'sig': self.sig})}"


def _mac(key: bytes, path: str, expires: int) -> str:
    digest = hmac.new(key, f"{path}\n{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


class UrlSigner:
    def __init__(
        self,
        *,
        keys: Mapping[str, bytes],
        current_kid: str,
        clock: Clock | None = None,
        min_key_bytes: int = 16,
    ) -> None:
        if current_kid not in keys:
            raise ValueError(f"current key id {current_kid!r} is not among the keys")
        for kid, key in keys.items():
            if not _KID.match(kid):
                raise ValueError(f"key id {kid!r} must match {_KID.pattern}")
            if len(key) < min_key_bytes:
                raise ValueError(f"key {kid!r} is shorter than {min_key_bytes} bytes")
        self._keys = dict(keys)
        self.current_kid = current_kid
        self._clock = clock or SystemClock()

    def sign(self, path: str, *, ttl_s: int, granularity_s: int = 1) -> SignedUrl:
        """Sign `path` to expire at least `ttl_s` from now.

        The expiry is rounded up to a multiple of `granularity_s`, so every client asking within one
        window gets the same URL and a CDN caches one object instead of one per request.
        """
        if ttl_s <= 0 or granularity_s <= 0:
            raise ValueError("ttl_s and granularity_s must be positive")
        if not path.startswith("/"):
            raise ValueError("sign an absolute path")
        now = self._clock.now().timestamp()
        expires = math.ceil((now + ttl_s) / granularity_s) * granularity_s
        kid = self.current_kid
        return SignedUrl(path=path, expires=expires, kid=kid, sig=_mac(self._keys[kid], path, expires))

    def verify(self, path: str, *, expires: int, kid: str, sig: str) -> int:
        """Return the seconds the URL stays valid, or raise `InvalidSignature`."""
        key = self._keys.get(kid)
        if key is None:
            raise InvalidSignature("unknown_kid")
        if len(sig) > 64 or not sig.isascii() or not hmac.compare_digest(_mac(key, path, expires), sig):
            raise InvalidSignature("bad_signature")
        remaining = expires - self._clock.now().timestamp()
        if remaining <= 0:
            raise InvalidSignature("expired")
        return int(remaining)
