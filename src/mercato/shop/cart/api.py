"""Cart HTTP routes: the caller's own cart at `/v1/carts/me`."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Header, Path, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field

from mercato.kit.auth import Principal
from mercato.kit.errors import Forbidden
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.etags import ETAG_HEADER_DOC, IF_NONE_MATCH_MAX_LENGTH, content_etag, not_modified
from mercato.kit.web.numbers import JsonInt
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.shop.cart.contracts import CartView
from mercato.shop.cart.model import STORAGE_MAX_QUANTITY
from mercato.shop.cart.service import CartService

router = APIRouter(prefix="/v1/carts/me", tags=["cart"], route_class=PrivateRoute)


class NotACustomer(Forbidden):
    slug = "customer-account-required"
    title = "Customer account required"
    description = "This resource belongs to a customer account; the token's subject is not one."


class CartLineOut(BaseModel):
    sku: str
    product_id: str | None = Field(description="Null only when the catalog no longer knows the SKU.")
    name: str
    quantity: int
    unit_price_minor: int = Field(description="Current catalog price; 0 when the product is unknown.")
    line_total_minor: int
    currency: str | None
    available: bool = Field(description="False when the line cannot be ordered; see unavailable_reason.")
    unavailable_reason: str | None = Field(description="archived | unknown | currency_changed")


class CartOut(BaseModel):
    lines: list[CartLineOut]
    currency: str | None = Field(description="The cart's currency; null for a cart with no sellable line.")
    total_minor: int = Field(description="Sum of the available lines, in minor units.")
    item_count: int = Field(description="Units across the available lines.")


class CartItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    quantity: JsonInt = Field(
        ge=1,
        le=STORAGE_MAX_QUANTITY,
        description="The line's new quantity (the shop's per-line limit applies).",
    )


def document_cart_limits(schema: dict[str, Any], *, max_quantity: int) -> None:
    """The OpenAPI's quantity maximum is the shop's configured per-line limit, not the storage bound."""
    quantity = schema.get("components", {}).get("schemas", {}).get("CartItemIn", {}).get("properties", {})
    if "quantity" in quantity:
        quantity["quantity"]["maximum"] = max_quantity


def cart_dict(cart: CartView) -> dict[str, Any]:
    return {
        "lines": [
            {
                "sku": line.sku,
                "product_id": str(line.product_id) if line.product_id else None,
                "name": line.name,
                "quantity": line.quantity,
                "unit_price_minor": line.unit_price_minor,
                "line_total_minor": line.line_total_minor,
                "currency": line.currency,
                "available": line.available,
                "unavailable_reason": line.unavailable_reason.value if line.unavailable_reason else None,
            }
            for line in cart.lines
        ],
        "currency": cart.currency,
        "total_minor": cart.total_minor,
        "item_count": cart.item_count,
    }


async def cart_service(request: Request) -> CartService:
    return cast(CartService, request.app.state.cart)


def customer_id(principal: Principal) -> uuid.UUID:
    try:
        return uuid.UUID(principal.subject)
    except ValueError as exc:
        raise NotACustomer("the caller is not a customer account") from exc


Service = Annotated[CartService, Depends(cart_service)]
Reader = Annotated[Principal, Depends(require_scopes("cart:read"))]
# The dependency object itself is named: the edge resolves the same one for its answer to PUT
# (gateway/fast_writes.py), so auth, scope and audit cannot drift from the route's.
CART_WRITE = require_scopes("cart:write")
Writer = Annotated[Principal, Depends(CART_WRITE)]
SKU_PATTERN = r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$"
SkuPath = Annotated[str, Path(min_length=3, max_length=64, pattern=SKU_PATTERN)]
PUT_ITEM_ROUTE = "/v1/carts/me/items/{sku}"

_PRIVATE_HEADER = PRIVATE_HEADER_DOC


# The cart is priced from the catalog each time it is read, so no stored version describes its
# representation: the ETag is a digest of the bytes sent. A price change changes it too.
IfNoneMatch = Annotated[
    str | None,
    Header(
        max_length=IF_NONE_MATCH_MAX_LENGTH,
        description="ETag(s) the client holds; a match answers 304 without a body.",
    ),
]


def _tagged(description: str) -> dict[int | str, dict[str, Any]]:
    return {200: {"description": description, "headers": {**_PRIVATE_HEADER, **ETAG_HEADER_DOC}}}


def _not_modified_doc() -> dict[int | str, dict[str, Any]]:
    return {
        304: {
            "description": "Not modified: If-None-Match matched the current ETag",
            "headers": {**_PRIVATE_HEADER, **ETAG_HEADER_DOC},
        }
    }


def _cart_response(cart: CartView, if_none_match: str | None = None) -> Response:
    body = orjson.dumps(cart_dict(cart))
    etag = content_etag(body)
    unchanged = not_modified(if_none_match, etag)
    if unchanged is not None:
        return unchanged
    return Response(body, media_type="application/json", headers={"ETag": etag})


def _no_content(description: str) -> dict[int | str, dict[str, Any]]:
    return {204: {"description": description, "headers": _PRIVATE_HEADER}}


@router.get(
    "",
    response_model=CartOut,
    summary="Get my cart",
    description="Lines priced from the catalog now; archived products are flagged unavailable.",
    responses={**problem_responses(401, 403), **_tagged("The cart"), **_not_modified_doc()},
)
async def get_cart(service: Service, principal: Reader, if_none_match: IfNoneMatch = None) -> Response:
    return _cart_response(await service.view(customer_id(principal)), if_none_match)


@router.put(
    "/items/{sku}",
    response_model=CartOut,
    summary="Add a product or set its quantity",
    description=(
        "Sets the line for `sku` to `quantity`, adding it if absent. 422 for an unknown or "
        "archived SKU, a quantity over the limit, a full cart or a product in another currency."
    ),
    responses={**problem_responses(401, 403, 422), **_tagged("The cart after the change")},
)
async def put_item(sku: SkuPath, body: CartItemIn, service: Service, principal: Writer) -> Response:
    return await put_item_answer(service, principal, sku, body.quantity)


async def put_item_answer(service: CartService, principal: Principal, sku: str, quantity: int) -> Response:
    """The route's work once its parameters are valid; the edge's answer to the same request calls it
    too (gateway/fast_writes.py)."""
    limit = service.limits.max_quantity
    if quantity > limit:
        # The schema's maximum is this configured limit (document_cart_limits): past it the request
        # breaks the contract, a 400 like any other schema violation (ADR 0028).
        raise RequestValidationError(
            [{"loc": ("body", "quantity"), "msg": f"must be at most {limit}", "type": "less_than_equal"}]
        )
    return _cart_response(await service.set_item(customer_id(principal), sku, quantity))


@router.delete(
    "/items/{sku}",
    status_code=204,
    summary="Remove a line",
    description="Idempotent: removing a line that is not in the cart also answers 204.",
    responses={**problem_responses(401, 403), **_no_content("Removed")},
)
async def delete_item(sku: SkuPath, service: Service, principal: Writer) -> Response:
    await service.remove_item(customer_id(principal), sku)
    return Response(status_code=204)


@router.delete(
    "",
    status_code=204,
    summary="Empty my cart",
    responses={**problem_responses(401, 403), **_no_content("Emptied")},
)
async def clear_cart(service: Service, principal: Writer) -> Response:
    await service.clear(customer_id(principal))
    return Response(status_code=204)
