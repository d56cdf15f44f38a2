"""Inventory HTTP routes: stock levels and reservations, for operators and internal services."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Any, cast

import orjson
from fastapi import APIRouter, Depends, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.convertors import Convertor, register_url_convertor

from mercato.kit.auth import Principal
from mercato.kit.ids import parse_id
from mercato.kit.web import problem_responses, require_scopes
from mercato.kit.web.numbers import WHOLE_NUMBER, JsonInt
from mercato.shop.inventory.model import (
    MAX_LINE_QUANTITY,
    MAX_REFERENCE_LENGTH,
    MAX_RESERVATION_LINES,
    MAX_STOCK,
    MAX_TTL_S,
    Reservation,
    ReservationNotFound,
    StockLevel,
    StockNotFound,
)
from mercato.shop.inventory.service import InventoryService

router = APIRouter(prefix="/v1/inventory", tags=["inventory"])

SKU_REGEX = r"^[A-Z0-9][A-Z0-9-]{1,62}[A-Z0-9]$"


class StockOut(BaseModel):
    sku: str
    available: int = Field(description="Units that can be reserved now.")
    reserved: int = Field(description="Units held by active reservations.")
    committed: int = Field(description="Units sold through committed reservations.")
    version: int
    updated_at: datetime


class StockCount(BaseModel):
    """Set the sellable count."""

    model_config = ConfigDict(extra="forbid", strict=True)

    available: JsonInt = Field(ge=0, le=MAX_STOCK)


class StockDelta(BaseModel):
    """Add received units, or (negative) write units off."""

    model_config = ConfigDict(extra="forbid", strict=True)

    delta: JsonInt = Field(ge=-MAX_STOCK, le=MAX_STOCK)


# Two closed shapes rather than one with two optional fields, so the schema itself says
# "exactly one of": a body with both matches neither.
StockIn = StockCount | StockDelta


class LineIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    sku: str = Field(min_length=3, max_length=64, pattern=SKU_REGEX)
    quantity: JsonInt = Field(ge=1, le=MAX_LINE_QUANTITY)


class LineOut(BaseModel):
    sku: str
    quantity: int


class ReservationIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    reference: str = Field(
        min_length=1,
        max_length=MAX_REFERENCE_LENGTH,
        pattern=r"^[A-Za-z0-9._:-]+$",
        description="The caller's idempotency key for this hold, typically the order id.",
    )
    lines: list[LineIn] = Field(min_length=1, max_length=MAX_RESERVATION_LINES)
    ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S), WHOLE_NUMBER] | None = Field(
        default=None, description="Defaults to the shop setting."
    )


class ReservationOut(BaseModel):
    id: str
    reference: str
    status: str = Field(description="active | released | committed | expired")
    lines: list[LineOut]
    expires_at: datetime
    created_at: datetime
    updated_at: datetime


def _ts(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def stock_dict(level: StockLevel) -> dict[str, Any]:
    return {
        "sku": level.sku,
        "available": level.available,
        "reserved": level.reserved,
        "committed": level.committed,
        "version": level.version,
        "updated_at": _ts(level.updated_at),
    }


def reservation_dict(reservation: Reservation) -> dict[str, Any]:
    return {
        "id": str(reservation.id),
        "reference": reservation.reference,
        "status": reservation.status.value,
        "lines": [{"sku": line.sku, "quantity": line.quantity} for line in reservation.lines],
        "expires_at": _ts(reservation.expires_at),
        "created_at": _ts(reservation.created_at),
        "updated_at": _ts(reservation.updated_at),
    }


def _json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps(content), status_code=status_code, media_type="application/json", headers=headers
    )


def inventory_service(request: Request) -> InventoryService:
    return cast(InventoryService, request.app.state.inventory)


Service = Annotated[InventoryService, Depends(inventory_service)]
Reader = Annotated[Principal, Depends(require_scopes("inventory:read"))]
Writer = Annotated[Principal, Depends(require_scopes("inventory:write"))]


class _SkuConvertor(Convertor[str]):
    """`{sku:sku}` matches only what a SKU can be, so `/v1/inventory/reservations` (lower case) is never
    taken for a SKU: the reservations routes are not shadowed (a GET there is 405, not a SKU error)."""

    regex = SKU_REGEX.strip("^$")

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("sku", _SkuConvertor())

SkuPath = Annotated[str, Path(min_length=3, max_length=64, pattern=SKU_REGEX)]
ReservationIdPath = Annotated[str, Path(min_length=1, max_length=64)]


def _reservation_id(raw: str) -> uuid.UUID:
    parsed = parse_id(raw)
    if parsed is None:
        raise ReservationNotFound(f"reservation {raw} not found")
    return parsed


@router.get(
    "/{sku:sku}",
    response_model=StockOut,
    summary="Get the stock of a SKU",
    responses=problem_responses(401, 403, 404),
)
async def get_stock(sku: SkuPath, service: Service, _reader: Reader) -> Response:
    return _json(stock_dict(await service.stock(sku)))


@router.put(
    "/{sku:sku}",
    response_model=StockOut,
    summary="Set or adjust the stock of a SKU",
    description=(
        '`{"available": n}` sets the sellable count; `{"delta": n}` adds received units or '
        "(negative) writes units off, atomically. Creates the stock record if missing. Reserved "
        "and committed units are never touched here."
    ),
    responses=problem_responses(401, 403, 422),
)
async def put_stock(sku: SkuPath, body: StockIn, service: Service, _writer: Writer) -> Response:
    if isinstance(body, StockCount):
        level = await service.set_available(sku, body.available)
    else:
        level = await service.adjust_available(sku, body.delta)
    return _json(stock_dict(level))


_RESERVATION_CREATED = {
    "description": "Reserved",
    "headers": {"Location": {"schema": {"type": "string"}, "description": "The reservation"}},
}


@router.post(
    "/reservations",
    response_model=ReservationOut,
    status_code=201,
    summary="Reserve stock",
    description=(
        "All lines or nothing: if any SKU is short the answer is 409 `out-of-stock` with "
        "`short_skus`, and nothing is held. Idempotent per `reference`: repeating it returns the "
        "existing reservation with 200."
    ),
    responses={
        **problem_responses(401, 403, 409, 422),
        201: _RESERVATION_CREATED,
        200: {"description": "A reservation with this reference already existed", "model": ReservationOut},
    },
)
async def create_reservation(body: ReservationIn, service: Service, _writer: Writer) -> Response:
    reservation, created = await service.reserve_or_replay(
        body.reference, [(line.sku, line.quantity) for line in body.lines], ttl_s=body.ttl_s
    )
    location = f"/v1/inventory/reservations/{reservation.id}"
    return _json(reservation_dict(reservation), 201 if created else 200, {"Location": location})


@router.get(
    "/reservations/{reservation_id}",
    response_model=ReservationOut,
    summary="Get a reservation",
    responses=problem_responses(401, 403, 404),
)
async def get_reservation(reservation_id: ReservationIdPath, service: Service, _reader: Reader) -> Response:
    return _json(reservation_dict(await service.reservation(_reservation_id(reservation_id))))


@router.post(
    "/reservations/{reservation_id}/release",
    response_model=ReservationOut,
    summary="Release a reservation",
    description="Returns the units to `available`. Idempotent; 409 if it was already committed.",
    responses=problem_responses(401, 403, 404, 409),
)
async def release_reservation(
    reservation_id: ReservationIdPath, service: Service, _writer: Writer
) -> Response:
    return _json(reservation_dict(await service.release(_reservation_id(reservation_id))))


@router.post(
    "/reservations/{reservation_id}/commit",
    response_model=ReservationOut,
    summary="Commit a reservation",
    description=(
        "Turns the reserved units into committed (sold) ones. Idempotent; 409 if it was released "
        "or has expired (`reservation-expired`)."
    ),
    responses=problem_responses(401, 403, 404, 409),
)
async def commit_reservation(
    reservation_id: ReservationIdPath, service: Service, _writer: Writer
) -> Response:
    return _json(reservation_dict(await service.commit(_reservation_id(reservation_id))))


class AvailabilityOut(BaseModel):
    sku: str
    available: int = Field(description="Units that can be ordered now (0 when sold out or unknown).")
    in_stock: bool = Field(description="`available > 0`.")


# Declared last: `/v1/inventory/reservations/...` must keep matching the reservation routes first.
@router.get(
    "/{sku}/availability",
    response_model=AvailabilityOut,
    summary="Can this SKU be ordered now? (public)",
    description=(
        "What a shopper needs before adding to the cart, without credentials: the units that can be "
        "ordered now. A SKU without a stock record is simply not available. Stock levels with "
        "reservations and sales (`GET /v1/inventory/{sku}`) are for staff."
    ),
    responses={
        **problem_responses(400),
        200: {
            "description": "Availability",
            "headers": {"Cache-Control": {"schema": {"type": "string"}, "description": "public, max-age=5"}},
        },
    },
)
async def get_availability(sku: SkuPath, service: Service) -> Response:
    try:
        available = (await service.stock(sku)).available
    except StockNotFound:
        available = 0
    body = {"sku": sku, "available": available, "in_stock": available > 0}
    # Shared by every shopper and a few seconds stale at worst: a cache may keep it briefly.
    return _json(body, headers={"Cache-Control": "public, max-age=5"})
