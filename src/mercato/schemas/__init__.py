"""The shipped integration-event schemas and their upcasters (ADR 0017).

The JSON Schema files beside this module are the contract of every integration event:
`<type>/v<N>.json`, modes in `subjects.toml`. This module is the one place that knows where they
live; the kit's `SchemaCatalog` reads any directory, and `kit.sagas` only sees the catalog through
its `EventContract` protocol. Every consumer in the running system (the reporting projections on
the SQL log or a broker, the payment ledger, notifications) reads through `read_message`, so each
is written against the current version of an event and never sees an older shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

from mercato.kit.messaging import Message
from mercato.kit.schemas import SchemaCatalog, Upcasters, dataschema_uri, parse_dataschema

__all__ = ["SCHEMA_DIR", "UPCASTERS", "catalog", "read_event", "read_message", "upcast"]

SCHEMA_DIR = Path(__file__).resolve().parent

UPCASTERS = Upcasters()


@UPCASTERS.register("mercato.orders.order_completed", 1)
def _order_completed_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    # v1 never carried these; null says "not recorded" (the v2 schema's default) rather than a
    # made-up value: a v2 consumer must treat a missing price as unknown, not as free.
    data.setdefault("completed_at", None)
    data["items"] = [
        {**item, "unit_price_minor": item.get("unit_price_minor")} for item in data.get("items", [])
    ]
    return data


@cache
def catalog() -> SchemaCatalog:
    """The shipped schemas, loaded once per process."""
    return SchemaCatalog.load(SCHEMA_DIR)


def upcast(event_type: str, version: int, data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` written under `version` of `event_type`, as the current version's data."""
    return UPCASTERS.upcast(event_type, version, data, to_version=catalog().current_version(event_type))


def read_event(event_type: str, dataschema: str | None, data: Mapping[str, Any]) -> dict[str, Any]:
    """A consumer's view of a stored event: upcast from the version its `dataschema` names.

    An event without `dataschema` predates schema stamping, so it is v1 by definition.
    """
    version = 1
    if dataschema is not None:
        stamped_type, version = parse_dataschema(dataschema)
        if stamped_type != event_type:
            raise ValueError(f"dataschema {dataschema!r} does not belong to event type {event_type!r}")
    return upcast(event_type, version, data)


def read_message(message: Message) -> Message:
    """`message` as a consumer of the current schemas sees it (a kit `MessageReader`): its data
    upcast from the version its `dataschema` names, and `dataschema` naming the current version.

    A type with no shipped schema passes through unchanged (nothing to upcast to); a version newer
    than the current one raises `UpcastError`, so the delivery fails and, after its attempts, waits
    in the dead-letter queue until this reader is deployed.
    """
    subject = catalog().subjects.get(message.type)
    if subject is None:
        return message
    current = dataschema_uri(message.type, subject.current_version)
    if message.dataschema == current:
        return message
    data = read_event(message.type, message.dataschema, message.data)
    return dataclasses.replace(message, data=data, dataschema=current)
