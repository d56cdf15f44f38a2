"""`GET /.well-known/jwks.json`: the public keys that verify access tokens (RFC 7517, ADR 0036).

Only the keys that verify now are listed (the signing one and the retired ones still in their
overlap), never a private half. Caches may keep the set for the reload bound: a verifier that meets
an unknown `kid` refetches (RFC 7515 practice), and a new key signs only in the process that rotated
until the others reload.
"""

from __future__ import annotations

import math

import orjson
from fastapi import APIRouter, Request, Response

from mercato.shop.identity.signing_keys import SigningKeyStore

router = APIRouter(tags=["identity"])

_JWKS_DOC = {
    "description": "The JWK Set",
    "content": {"application/jwk-set+json": {}},
    "headers": {"Cache-Control": {"schema": {"type": "string"}, "description": "`public, max-age=…`"}},
}


@router.get(
    "/.well-known/jwks.json",
    summary="Public keys that verify access tokens",
    response_class=Response,
    responses={200: _JWKS_DOC},
)
async def jwks(request: Request) -> Response:
    store: SigningKeyStore = request.app.state.signing_keys
    await store.ready()  # no statement while the keys are fresh
    body = store.ring.jwks(request.app.state.container.clock.now())
    max_age = max(1, min(300, math.floor(store.reload_s)))
    return Response(
        content=orjson.dumps(body),
        media_type="application/jwk-set+json",
        headers={"Cache-Control": f"public, max-age={max_age}"},
    )
