"""Signed, expiring URLs (HMAC-SHA256 with key ids for rotation): see `urls`."""

from mercato.kit.signing.urls import MIN_KEY_BYTES, InvalidSignature, SignedUrl, UrlSigner

__all__ = ["MIN_KEY_BYTES", "InvalidSignature", "SignedUrl", "UrlSigner"]
