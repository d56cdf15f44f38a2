"""Schema evolution end to end, without a database: a v1 consumer reads v2 events, a v2 consumer
reads stored v1 events through the upcaster, and producers stamp and validate `dataschema`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from mercato.kit.clock import ManualClock
from mercato.kit.messaging import Message, Outbox
from mercato.kit.sagas.events import OutboxEventSink
from mercato.kit.schemas import EventSchemaViolation, UpcastError, Upcasters, parse_dataschema
from mercato.schemas import UPCASTERS, catalog, read_event, upcast

COMPLETED = "mercato.orders.order_completed"
ORDER = "0193a4e2-7c1f-7a3b-9e51-2f6c8d4b1a07"
CUSTOMER = "0193a4e2-1b2c-7d3e-8f40-5a6b7c8d9e0f"
V1_DATA = {
    "order_id": ORDER,
    "customer_id": CUSTOMER,
    "total_minor": 3998,
    "currency": "EUR",
    "items": [{"sku": "MUG-001", "quantity": 2}],
}
V2_DATA = {
    **V1_DATA,
    "completed_at": "2026-11-25T12:00:00Z",
    "items": [{"sku": "MUG-001", "quantity": 2, "unit_price_minor": 1999}],
}


def _sink() -> OutboxEventSink:
    clock = ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    return OutboxEventSink(Outbox(clock=clock), source="mercato/checkout", clock=clock, contract=catalog())


def _produced(data: dict[str, Any], event_type: str = COMPLETED) -> Message:
    return _sink().message({"type": event_type, "saga_id": ORDER, "data": data})


# ---- a consumer built for v1 ------------------------------------------------------------------


@dataclass(frozen=True)
class CompletedV1:
    """What a consumer written against v1 knows: validates with the v1 schema, reads v1 fields."""

    order_id: str
    total_minor: int
    lines: list[tuple[str, int]]

    @classmethod
    def read(cls, message: Message) -> CompletedV1:
        Draft202012Validator(catalog().subject(COMPLETED).schema(1)).validate(message.data)
        data = message.data
        return cls(data["order_id"], data["total_minor"], [(i["sku"], i["quantity"]) for i in data["items"]])


def test_a_v1_consumer_reads_v2_events_ignoring_the_fields_it_does_not_know() -> None:
    message = Message.from_json(_produced(V2_DATA).to_json())
    assert parse_dataschema(message.dataschema or "") == (COMPLETED, 2)
    assert CompletedV1.read(message) == CompletedV1(ORDER, 3998, [("MUG-001", 2)])


# ---- a consumer built for v2 ------------------------------------------------------------------


@dataclass(frozen=True)
class CompletedV2:
    order_id: str
    completed_at: str | None
    prices: list[int | None]

    @classmethod
    def read(cls, message: Message) -> CompletedV2:
        data = read_event(message.type, message.dataschema, message.data)
        catalog().validate(COMPLETED, data, version=2, strict=True)
        return cls(data["order_id"], data["completed_at"], [i["unit_price_minor"] for i in data["items"]])


def _stored_v1(dataschema: str | None) -> Message:
    """A v1 event as an outbox/stream stored it before v2 existed."""
    return Message.from_cloudevent(
        {
            "specversion": "1.0",
            "id": "0193a4e2-0000-7000-8000-000000000001",
            "source": "mercato/checkout",
            "type": COMPLETED,
            "subject": ORDER,
            "time": "2026-11-20T09:30:00.000000Z",
            "datacontenttype": "application/json",
            **({"dataschema": dataschema} if dataschema else {}),
            "topic": "mercato.orders",
            "partitionkey": ORDER,
            "data": V1_DATA,
        }
    )


@pytest.mark.parametrize("dataschema", [f"/schemas/{COMPLETED}/v1", None])
def test_a_v2_consumer_reads_stored_v1_events_through_the_upcaster(dataschema: str | None) -> None:
    stored = _stored_v1(dataschema)
    assert CompletedV2.read(stored) == CompletedV2(ORDER, None, [None])
    assert stored.data == V1_DATA  # the stored event is untouched


def test_a_v2_consumer_reads_v2_events_as_they_are() -> None:
    assert CompletedV2.read(_produced(V2_DATA)) == CompletedV2(ORDER, "2026-11-25T12:00:00Z", [1999])


def test_upcasting_current_data_is_the_identity_and_a_gap_is_an_error() -> None:
    assert upcast(COMPLETED, 2, V2_DATA) == V2_DATA
    with pytest.raises(UpcastError, match="newer"):
        upcast("mercato.orders.order_placed", 2, {})
    empty = Upcasters()
    with pytest.raises(UpcastError, match="no upcaster"):
        empty.upcast(COMPLETED, 1, V1_DATA, to_version=2)
    with pytest.raises(ValueError, match="already has"):
        UPCASTERS.register(COMPLETED, 1)(lambda data: data)


def test_read_event_refuses_a_dataschema_of_another_type() -> None:
    with pytest.raises(ValueError, match="does not belong"):
        read_event(COMPLETED, "/schemas/mercato.orders.order_placed/v1", V1_DATA)


# ---- the producer -----------------------------------------------------------------------------


def test_the_sink_stamps_the_current_version_of_each_type() -> None:
    assert _produced(V1_DATA).dataschema == f"/schemas/{COMPLETED}/v2"
    voided = _produced({"order_id": ORDER, "authorization_id": "auth_1"}, "mercato.payments.payment_voided")
    assert voided.dataschema == "/schemas/mercato.payments.payment_voided/v1"
    assert voided.to_cloudevent()["dataschema"] == voided.dataschema


@pytest.mark.parametrize(
    ("event_type", "data", "why"),
    [
        (COMPLETED, {**V1_DATA, "total_minor": "3998"}, "total_minor"),
        (COMPLETED, {k: v for k, v in V1_DATA.items() if k != "currency"}, "currency"),
        (COMPLETED, {**V1_DATA, "surprise": 1}, "surprise"),  # producers write declared fields only
        ("mercato.orders.order_shipped", {"order_id": ORDER}, "no registered schema"),
    ],
)
def test_the_sink_refuses_an_event_that_does_not_match_its_schema(
    event_type: str, data: dict[str, Any], why: str
) -> None:
    with pytest.raises(EventSchemaViolation, match=why):
        _produced(data, event_type)


def test_without_a_contract_the_sink_behaves_as_before() -> None:
    clock = ManualClock(datetime(2026, 11, 25, 12, 0, tzinfo=UTC))
    sink = OutboxEventSink(Outbox(clock=clock), source="mercato/checkout", clock=clock)
    assert sink.message({"type": COMPLETED, "saga_id": ORDER, "data": {"x": 1}}).dataschema is None
