"""What other contexts may know of identity: the role and scope vocabulary of access tokens.

Other contexts guard their routes with these names (`require_scopes(Scope.CART_WRITE)`), so the
strings are a published contract: renaming one silently locks callers out of a route.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Role", "Scope"]


class Role(StrEnum):
    """Who a caller is; each role grants a fixed set of scopes (see `model.ROLE_SCOPES`)."""

    CUSTOMER = "customer"
    ADMIN = "admin"
    SERVICE = "service"


class Scope(StrEnum):
    """What a caller may do. The values are the strings carried in the token's `scope` claim."""

    CART_READ = "cart:read"
    CART_WRITE = "cart:write"
    ORDERS_READ = "orders:read"
    ORDERS_WRITE = "orders:write"
    ORDERS_READ_ALL = "orders:read_all"
    CATALOG_WRITE = "catalog:write"
    INVENTORY_READ = "inventory:read"
    INVENTORY_WRITE = "inventory:write"
    USERS_WRITE = "users:write"
