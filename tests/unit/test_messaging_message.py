"""The CloudEvents envelope and the partition function: pure, no database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.kit.messaging import InvalidMessage, Message, partition_for

WHEN = datetime(2026, 11, 25, 12, 30, 15, 123456, tzinfo=UTC)


def message(**overrides: object) -> Message:
    fields: dict[str, object] = {
        "id": uuid.UUID("01a21430-e079-76d3-8f9c-3fc7a1927704"),
        "source": "/orders",
        "type": "mercato.orders.order_completed",
        "subject": "order-42",
        "time": WHEN,
        "data": {"total_minor": 1999, "currency": "EUR"},
        "topic": "mercato.orders",
    }
    fields.update(overrides)
    return Message(**fields)  # type: ignore[arg-type]


def test_structured_mode_cloudevent() -> None:
    event = message(
        dataschema="urn:mercato:orders:order_completed:1", headers={"traceparent": "00-abc"}
    ).to_cloudevent()
    assert event == {
        "specversion": "1.0",
        "id": "01a21430-e079-76d3-8f9c-3fc7a1927704",
        "source": "/orders",
        "type": "mercato.orders.order_completed",
        "subject": "order-42",
        "time": "2026-11-25T12:30:15.123456Z",
        "datacontenttype": "application/json",
        "dataschema": "urn:mercato:orders:order_completed:1",
        "topic": "mercato.orders",
        "partitionkey": "order-42",
        "traceparent": "00-abc",
        "data": {"total_minor": 1999, "currency": "EUR"},
    }


def test_round_trip_keeps_every_field_and_the_key_defaults_to_the_subject() -> None:
    original = message(
        key="customer-7", correlation_id="req-1", causation_id="evt-0", headers={"tenant": "eu"}
    )
    assert Message.from_json(original.to_json()) == original
    assert message().key == "order-42"


@pytest.mark.parametrize(
    "overrides",
    [
        {"type": ""},
        {"topic": ""},
        {"time": datetime(2026, 1, 1)},  # naive: refused
        {"headers": {"Trace-Parent": "x"}},
        {"headers": {"subject": "x"}},
    ],
)
def test_invalid_messages_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(InvalidMessage):
        message(**overrides)


def test_foreign_or_broken_cloudevents_are_refused() -> None:
    event = message().to_cloudevent()
    with pytest.raises(InvalidMessage):
        Message.from_cloudevent({**event, "specversion": "0.3"})
    with pytest.raises(InvalidMessage):
        Message.from_cloudevent({k: v for k, v in event.items() if k != "topic"})
    with pytest.raises(InvalidMessage):
        Message.from_cloudevent({**event, "datacontenttype": "application/xml"})


def test_partition_is_crc32_so_every_language_agrees() -> None:
    # crc32(b"order-42") = 0x57f706de; any CRC-32 implementation gives the same partition.
    assert partition_for("order-42", partitions=8) == 0x57F706DE % 8
    with pytest.raises(ValueError, match="partitions"):
        partition_for("k", partitions=0)


@given(st.text(max_size=50), st.integers(min_value=1, max_value=64))
def test_partition_is_in_range_and_stable(key: str, partitions: int) -> None:
    first = partition_for(key, partitions=partitions)
    assert 0 <= first < partitions
    assert partition_for(key, partitions=partitions) == first
