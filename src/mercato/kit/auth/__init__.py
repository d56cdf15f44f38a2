"""Access tokens: issuing and verifying short-lived signed JWTs that carry roles and scopes."""

from mercato.kit.auth.tokens import InvalidToken, Principal, TokenCodec

__all__ = ["InvalidToken", "Principal", "TokenCodec"]
