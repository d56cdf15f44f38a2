"""Cart entities and rules. Pure: no I/O.

The cart stores only SKUs and quantities; prices are the catalog's, looked up each time the cart
is read, so a price change or an archived product shows at once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from mercato.kit.errors import Conflict, RuleViolated
from mercato.shop.cart.contracts import CartLineView, CartView, UnavailableReason

SKU_PATTERN = re.compile(r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$")
# The table's CHECK constraint; a configured per-line limit above it is capped here.
STORAGE_MAX_QUANTITY = 999


class InvalidCartItem(RuleViolated):
    slug = "invalid-cart-item"
    title = "Invalid cart item"
    description = "The quantity is outside the allowed range or the SKU is malformed."


class ProductUnavailable(RuleViolated):
    slug = "product-unavailable"
    title = "Product unavailable"
    description = "The SKU is not in the catalog or its product was archived, so it cannot be added."


class CartFull(RuleViolated):
    slug = "cart-full"
    title = "Cart is full"
    description = "The cart already holds the maximum number of distinct lines."


class CurrencyMismatch(RuleViolated):
    slug = "cart-currency-mismatch"
    title = "Currency mismatch"
    description = "A cart holds products of one currency; this product is priced in another."


class CartChanged(Conflict):
    slug = "cart-changed"
    title = "Cart changed"
    description = "The cart changed while it was being turned into an order; review it and retry."


@dataclass(frozen=True, slots=True)
class CartItem:
    sku: str
    quantity: int
    added_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class CatalogPrice:
    """The catalog's current word on a SKU, in the cart's own terms."""

    product_id: uuid.UUID
    name: str
    unit_price_minor: int
    currency: str
    for_sale: bool


@dataclass(frozen=True, slots=True)
class CartLimits:
    max_quantity_per_line: int
    max_lines: int

    def __post_init__(self) -> None:
        if self.max_quantity_per_line < 1 or self.max_lines < 1:
            raise ValueError("cart limits must be positive")

    @property
    def max_quantity(self) -> int:
        return min(self.max_quantity_per_line, STORAGE_MAX_QUANTITY)


def check_set_item(
    items: Sequence[CartItem],
    sku: str,
    quantity: int,
    prices: Mapping[str, CatalogPrice],
    limits: CartLimits,
) -> None:
    """Whether `sku` may be put in the cart at `quantity` (adding a line or changing one)."""
    if not SKU_PATTERN.match(sku):
        raise InvalidCartItem("sku must be 3-64 characters of A-Z, 0-9 and '-'", field="path.sku")
    if not 1 <= quantity <= limits.max_quantity:
        raise InvalidCartItem(f"quantity must be 1..{limits.max_quantity}", field="body.quantity")
    price = prices.get(sku)
    if price is None or not price.for_sale:
        raise ProductUnavailable(f"no product with SKU {sku} is for sale", field="path.sku")
    others = [item for item in items if item.sku != sku]
    if len(others) >= limits.max_lines:
        raise CartFull(f"a cart holds at most {limits.max_lines} lines", max_lines=limits.max_lines)
    currencies = {
        p.currency for p in (prices.get(item.sku) for item in others) if p is not None and p.for_sale
    }
    if currencies and currencies != {price.currency}:
        raise CurrencyMismatch(
            f"the cart is in {', '.join(sorted(currencies))}; {sku} is priced in {price.currency}",
            field="path.sku",
        )


def price_cart(
    customer_id: uuid.UUID, items: Sequence[CartItem], prices: Mapping[str, CatalogPrice]
) -> CartView:
    """The cart with current prices. Lines keep the order they were added in.

    The cart's currency is that of its oldest sellable line; a line priced in another currency
    (its product's currency changed after it was added) is flagged, like an archived one, and
    left out of the total.
    """
    ordered = sorted(items, key=lambda item: (item.added_at, item.sku))
    currency: str | None = None
    for item in ordered:
        price = prices.get(item.sku)
        if price is not None and price.for_sale:
            currency = price.currency
            break
    lines = []
    total = 0
    count = 0
    for item in ordered:
        price = prices.get(item.sku)
        reason: UnavailableReason | None = None
        if price is None:
            reason = UnavailableReason.UNKNOWN
        elif not price.for_sale:
            reason = UnavailableReason.ARCHIVED
        elif price.currency != currency:
            reason = UnavailableReason.CURRENCY_CHANGED
        unit = price.unit_price_minor if price is not None else 0
        line_total = unit * item.quantity
        if reason is None:
            total += line_total
            count += item.quantity
        lines.append(
            CartLineView(
                sku=item.sku,
                product_id=price.product_id if price is not None else None,
                name=price.name if price is not None else "",
                quantity=item.quantity,
                unit_price_minor=unit,
                line_total_minor=line_total,
                currency=price.currency if price is not None else None,
                unavailable_reason=reason,
            )
        )
    return CartView(
        customer_id=customer_id,
        lines=tuple(lines),
        currency=currency,
        total_minor=total,
        item_count=count,
    )
