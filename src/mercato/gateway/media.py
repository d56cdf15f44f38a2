"""Product images behind signed, expiring URLs (guide §37: "protect with signed URLs").

`GET /v1/products/{id}/image-url` hands out a URL signed with the current key; `GET /media/products/
{id}.svg` checks the signature and the expiry before anything else (no database work for a forged
URL) and serves a deterministic SVG drawn from the product's name. Because the expiry is rounded up
to a window, everyone asking within one window gets the same URL, so a CDN stores one object per
product and window; the media response may be cached until the URL expires, never longer, so an
edge copy cannot outlive the signature that let it in.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, cast
from xml.sax.saxutils import escape

import orjson
from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel

from mercato.config import SigningSettings
from mercato.kit.clock import Clock
from mercato.kit.errors import Forbidden
from mercato.kit.ids import parse_id
from mercato.kit.signing import InvalidSignature, UrlSigner
from mercato.kit.web import problem_responses
from mercato.shop.catalog.model import Product, ProductNotFound
from mercato.shop.catalog.service import CatalogService

__all__ = ["build_signer", "render_product_svg", "router"]

router = APIRouter(tags=["catalog"])

SVG_MEDIA_TYPE = "image/svg+xml"
_YEAR_S = 365 * 86_400


class InvalidMediaSignature(Forbidden):
    slug = "invalid-signature"
    title = "Invalid or expired signature"
    description = (
        "The media URL was not signed by this service, was altered, or has expired; "
        "ask GET /v1/products/{id}/image-url for a fresh one."
    )


class ImageUrlOut(BaseModel):
    url: str
    expires_at: datetime
    expires_in: int


def build_signer(settings: SigningSettings, *, clock: Clock | None = None) -> UrlSigner:
    keys = {kid: secret.get_secret_value().encode() for kid, secret in settings.keys.items()}
    return UrlSigner(keys=keys, current_kid=settings.current_kid, clock=clock)


def media_path(product_id: uuid.UUID) -> str:
    return f"/media/products/{product_id}.svg"


def _signer(request: Request) -> UrlSigner:
    return cast(UrlSigner, request.app.state.url_signer)


def _catalog(request: Request) -> CatalogService:
    return cast(CatalogService, request.app.state.catalog)


def _product_id(raw: str) -> uuid.UUID:
    parsed = parse_id(raw)
    if parsed is None:
        raise ProductNotFound(f"product {raw} not found")
    return parsed


_CACHE_DOC = {"Cache-Control": {"schema": {"type": "string"}, "description": "Shared caches may store it"}}


@router.get(
    "/v1/products/{product_id}/image-url",
    response_model=ImageUrlOut,
    summary="A signed, expiring URL for the product's image",
    responses={**problem_responses(404), 200: {"description": "Successful Response", "headers": _CACHE_DOC}},
)
async def product_image_url(
    request: Request, product_id: Annotated[str, Path(min_length=1, max_length=64)]
) -> Response:
    product = await _catalog(request).get(_product_id(product_id))
    settings: SigningSettings = request.app.state.signing_settings
    signed = _signer(request).sign(
        media_path(product.id), ttl_s=settings.url_ttl_s, granularity_s=settings.url_granularity_s
    )
    expires_at = datetime.fromtimestamp(signed.expires, UTC)
    now = request.app.state.clock.now()
    body = {
        "url": signed.url,
        "expires_at": expires_at.isoformat().replace("+00:00", "Z"),
        "expires_in": int((expires_at - now).total_seconds()),
    }
    # Identical for the whole signing window, so the edge may keep it that long (the URL inside
    # then still has at least url_ttl_s - window seconds to live).
    headers = {"Cache-Control": f"public, max-age={settings.url_granularity_s}", "Vary": "Accept"}
    return Response(orjson.dumps(body), media_type="application/json", headers=headers)


@router.get(
    "/media/products/{product_id}.svg",
    summary="A product image (signed URL only)",
    response_class=Response,
    responses={
        **problem_responses(403, 404),
        200: {
            "description": "The image",
            "content": {SVG_MEDIA_TYPE: {"schema": {"type": "string"}}},
            "headers": _CACHE_DOC,
        },
    },
)
async def product_image(
    request: Request,
    product_id: Annotated[str, Path(min_length=1, max_length=64)],
    expires: Annotated[int, Query(ge=0, le=2**40, description="Unix seconds")],
    kid: Annotated[str, Query(min_length=1, max_length=32)],
    sig: Annotated[str, Query(min_length=1, max_length=64)],
) -> Response:
    try:
        remaining_s = _signer(request).verify(request.url.path, expires=expires, kid=kid, sig=sig)
    except InvalidSignature as exc:
        raise InvalidMediaSignature(_REASONS.get(exc.reason, "invalid signature")) from exc
    product = await _catalog(request).get(_product_id(product_id))
    headers = {
        "Cache-Control": f"public, max-age={min(remaining_s, _YEAR_S)}, immutable",
        # An SVG is a document: forbid scripts and outside fetches should one ever be injected.
        "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'",
        "X-Content-Type-Options": "nosniff",
    }
    return Response(render_product_svg(product), media_type=SVG_MEDIA_TYPE, headers=headers)


_REASONS = {
    "unknown_kid": "the URL was signed with a key this service no longer accepts",
    "bad_signature": "the signature does not match the URL",
    "expired": "the URL has expired",
}


def render_product_svg(product: Product) -> bytes:
    """A 320x240 card: a colour derived from the id, the name and the price. Same product, same bytes."""
    digest = hashlib.sha256(product.id.bytes).digest()
    hue = int.from_bytes(digest[:2], "big") % 360
    name = escape(product.name if len(product.name) <= 40 else product.name[:39] + "…")
    price = f"{product.price_minor // 100}.{product.price_minor % 100:02d} {escape(product.currency)}"
    return (
        '<svg xmlns="http://www.w3.org/2000/svg" width="320" height="240" viewBox="0 0 320 240">'
        f'<rect width="320" height="240" fill="hsl({hue},55%,45%)"/>'
        f'<circle cx="260" cy="60" r="40" fill="hsl({(hue + 180) % 360},60%,70%)" opacity="0.6"/>'
        '<text x="20" y="200" font-family="sans-serif" font-size="18" fill="#fff">'
        f"{name}</text>"
        f'<text x="20" y="225" font-family="sans-serif" font-size="14" fill="#fff">{price}</text>'
        "</svg>"
    ).encode()
