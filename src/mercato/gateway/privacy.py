"""The data subject's rights over HTTP (guide §12): export everything held about me, erase me; and
the staff side: erase a customer, read the audit log.

The gateway assembles what each context holds about a customer through their services (it owns no
data and no rule): identity (the account), cart, orders with their lines and payment ledgers.
Erasure is crypto-shredding (identity's `erase`, ADR 0052): the account's data key is destroyed, so
its sealed fields are unreadable in every copy; orders keep the customer id and their financial
facts for the legal retention period; the cart, which is only personal, is deleted.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import BaseModel, Field

from mercato.bootstrap import Container
from mercato.kit.auth import Principal
from mercato.kit.errors import NotFound
from mercato.kit.ids import parse_id
from mercato.kit.privacy import AuditLog
from mercato.kit.web import authenticated, problem_responses, require_scopes
from mercato.kit.web.private import PRIVATE_HEADER_DOC, PrivateRoute
from mercato.kit.web.security import AUDIT_LOG
from mercato.shop.identity.api import user_dict

__all__ = ["admin_router", "router"]

router = APIRouter(prefix="/v1", tags=["identity"], route_class=PrivateRoute)
admin_router = APIRouter(prefix="/admin", tags=["admin"], route_class=PrivateRoute)

Caller = Annotated[Principal, Depends(authenticated)]
Staff = Annotated[Principal, Depends(require_scopes("users:write"))]
# Export reads at most this many orders: far above any real customer's, and a bound on the work.
MAX_EXPORTED_ORDERS = 10_000
_PAGE = 200


class CustomerNotFound(NotFound):
    slug = "customer-not-found"
    title = "Customer not found"
    description = "No account has this id."


def _container(request: Request) -> Container:
    return cast(Container, request.app.state.container)


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


async def _export(container: Container, customer_id: uuid.UUID) -> dict[str, Any]:
    user = await container.identity.get(customer_id)
    if user is None:
        raise CustomerNotFound(f"no account {customer_id}")
    cart = await container.cart.view(customer_id)
    orders: list[dict[str, Any]] = []
    after: uuid.UUID | None = None
    while len(orders) < MAX_EXPORTED_ORDERS:
        page, more = await container.orders.list_for_customer(customer_id, limit=_PAGE, after_id=after)
        for summary in page:
            order = await container.orders.get(summary.id, customer_id=customer_id, read_all=False)
            ledger = await container.payments.ledger(str(order.id))
            orders.append(
                {
                    "id": str(order.id),
                    "status": order.status.value,
                    "currency": order.currency,
                    "total_minor": order.total_minor,
                    "created_at": _ts(order.created_at),
                    "lines": [
                        {
                            "sku": line.sku,
                            "name": line.name,
                            "unit_price_minor": line.unit_price_minor,
                            "quantity": line.quantity,
                        }
                        for line in order.lines
                    ],
                    "payment_events": [
                        {"type": event.type, "recorded_at": _ts(event.recorded_at), "data": event.data}
                        for event in ledger.history
                    ],
                }
            )
        if not more or not page:
            break
        after = page[-1].id
    return {
        "exported_at": _ts(container.clock.now()),
        "account": {**user_dict(user), "disabled": user.disabled},
        "cart": {
            "currency": cart.currency,
            "total_minor": cart.total_minor,
            "lines": [{"sku": line.sku, "quantity": line.quantity} for line in cart.lines],
        },
        "orders": orders,
    }


async def _erase(container: Container, customer_id: uuid.UUID, *, requested_by: str) -> None:
    if not await container.identity.erase(customer_id, requested_by=requested_by):
        raise CustomerNotFound(f"no account {customer_id}")
    await container.cart.clear(customer_id)


def _json(body: Any, *, status_code: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status_code, media_type="application/json")


@router.get(
    "/me/export",
    summary="Everything held about the caller (JSON)",
    description=(
        "The account, the cart, and every order with its lines and payment events: a copy of the "
        "personal data held about the caller, in a machine-readable form (GDPR Art. 15 and 20)."
    ),
    responses={**problem_responses(401), 200: {"description": "The export", "headers": PRIVATE_HEADER_DOC}},
)
async def export_me(principal: Caller, request: Request) -> Response:
    container = _container(request)
    user = await container.identity.me(principal)
    return _json(await _export(container, user.id))


@router.delete(
    "/me",
    status_code=204,
    summary="Erase the caller's account",
    description=(
        "Destroys the account's data key (its e-mail and name become unreadable everywhere they "
        "were copied, backups included), disables it, ends its sessions and deletes its cart. "
        "Orders keep their financial facts under the customer id. Cannot be undone."
    ),
    responses={**problem_responses(401)},
)
async def erase_me(principal: Caller, request: Request) -> Response:
    container = _container(request)
    user = await container.identity.me(principal)
    await _erase(container, user.id, requested_by=f"self:{user.id}")
    return Response(status_code=204)


@admin_router.get(
    "/customers/{customer_id}/export",
    summary="Everything held about a customer (JSON)",
    responses={**problem_responses(401, 403, 404)},
)
async def export_customer(customer_id: uuid.UUID, principal: Staff, request: Request) -> Response:
    return _json(await _export(_container(request), customer_id))


@admin_router.delete(
    "/customers/{customer_id}",
    status_code=204,
    summary="Erase a customer's account (crypto-shredding)",
    responses={**problem_responses(401, 403, 404)},
)
async def erase_customer(customer_id: uuid.UUID, principal: Staff, request: Request) -> Response:
    await _erase(_container(request), customer_id, requested_by=principal.subject)
    return Response(status_code=204)


class AuditEntryOut(BaseModel):
    id: str
    at: str
    actor: str = Field(description="The staff account (token subject) that acted.")
    action: str = Field(description="The HTTP method.")
    resource: str = Field(description="The route template and its path parameters.")
    subject_id: str | None = Field(description="The customer the action concerned, when the route names one.")
    scopes: str = Field(description="The staff scopes the operation required.")
    request_id: str | None


@admin_router.get(
    "/audit-log",
    summary="Staff actions, newest first (append-only)",
    responses={**problem_responses(401, 403)},
)
async def audit_entries(
    principal: Staff,
    request: Request,
    actor: Annotated[str | None, Query(max_length=64)] = None,
    before: Annotated[
        str | None, Query(max_length=36, description="The last id of the previous page.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> dict[str, list[AuditEntryOut]]:
    audit = cast(AuditLog, getattr(request.app.state, AUDIT_LOG))
    entries = await audit.entries(actor=actor, before=parse_id(before) if before else None, limit=limit)
    return {
        "items": [
            AuditEntryOut(
                id=str(e.id),
                at=_ts(e.at),
                actor=e.actor,
                action=e.action,
                resource=e.resource,
                subject_id=str(e.subject_id) if e.subject_id else None,
                scopes=e.scopes,
                request_id=e.request_id,
            )
            for e in entries
        ]
    }
