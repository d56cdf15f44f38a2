"""OpenAPI: who may call each operation, stated where a client generator and a reader look.

A route that needs a staff-only scope (`require_scopes(...)` with any of `STAFF_SCOPES`) gets the
`staff` tag, a description line naming the scopes, and `x-staff-only: true`; every authenticated route
lists both ways to authenticate (a bearer token, or an `X-API-Key` carrying the scopes). Routes are
inspected through their dependencies, so the document follows the code rather than a list.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute

from mercato.kit.web.problems import PROBLEM_MEDIA_TYPE
from mercato.shop.identity.contracts import Scope

__all__ = ["STAFF_SCOPES", "STAFF_TAG", "document_access"]

# Scopes no customer account holds (identity's ROLE_SCOPES): what makes a route staff-only.
STAFF_SCOPES = frozenset(
    {
        Scope.CATALOG_WRITE.value,
        Scope.INVENTORY_READ.value,
        Scope.INVENTORY_WRITE.value,
        Scope.ORDERS_READ_ALL.value,
        Scope.USERS_WRITE.value,
    }
)
STAFF_TAG = "staff"
API_KEY_SCHEME = "ApiKeyHeader"


def _required_scopes(dependant: Dependant) -> set[str]:
    found: set[str] = set()
    for sub in dependant.dependencies:
        scopes = getattr(sub.call, "required_scopes", None)
        if scopes:
            found.update(scopes)
        found.update(_required_scopes(sub))
    return found


def document_access(schema: dict[str, Any], routes: Iterable[Any], *, api_key_header: str) -> None:
    """Mark `routes` (the routers' own routes: their paths carry the prefix) in `schema`."""
    paths = schema.get("paths", {})
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes[API_KEY_SCHEME] = {
        "type": "apiKey",
        "in": "header",
        "name": api_key_header,
        "description": "A partner API key (`POST /admin/api-keys`); unknown or revoked keys get 401.",
    }
    # A made-up, expired or revoked X-API-Key is refused on any versioned or operator route.
    unauthenticated = {
        "description": "Missing or invalid credentials: a bad bearer token, or an unknown, expired or "
        "revoked `X-API-Key`",
        "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
        "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/ProblemDetails"}}},
    }
    for path, path_item in paths.items():
        if path.startswith(("/v1/", "/v2/", "/admin/")):
            for operation in path_item.values():
                if isinstance(operation, dict) and "responses" in operation:
                    operation["responses"].setdefault("401", unauthenticated)
    for route in routes:
        if not isinstance(route, APIRoute) or route.path_format not in paths:
            continue
        staff = sorted(_required_scopes(route.dependant) & STAFF_SCOPES)
        for method in route.methods or ():
            operation = paths[route.path_format].get(method.lower())
            if operation is None:
                continue
            security = operation.get("security")
            if security and {API_KEY_SCHEME: []} not in security:
                security.append({API_KEY_SCHEME: []})
            if not staff:
                continue
            tags = operation.setdefault("tags", [])
            if STAFF_TAG not in tags:
                tags.append(STAFF_TAG)
            operation["x-staff-only"] = True
            note = f"**Staff only**: needs `{'`, `'.join(staff)}` (no customer account has it)."
            description = operation.get("description", "")
            if note not in description:
                operation["description"] = f"{note}\n\n{description}".strip()
