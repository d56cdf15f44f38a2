"""Access tokens: issuing and verifying short-lived signed JWTs that carry roles and scopes."""

from mercato.kit.auth.guard import CredentialVerifier, TokenGuard
from mercato.kit.auth.tokens import InvalidToken, Principal, TokenCodec

__all__ = ["CredentialVerifier", "InvalidToken", "Principal", "TokenCodec", "TokenGuard"]
