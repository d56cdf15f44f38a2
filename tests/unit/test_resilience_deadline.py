"""Deadlines: absolute, nested to the tighter one, carried in a contextvar and over the wire."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from mercato.kit.clock import ManualClock
from mercato.kit.resilience import (
    DEADLINE_HEADER,
    Deadline,
    DeadlineExceeded,
    DeadlineMiddleware,
    current_deadline,
    deadline_scope,
    outgoing_deadline_headers,
    parse_deadline_header,
)


def test_remaining_counts_down_and_expires() -> None:
    clock = ManualClock()
    deadline = Deadline.after(2.0, clock=clock)
    assert deadline.remaining_s() == 2.0
    clock.advance(1.5)
    assert deadline.remaining_s() == pytest.approx(0.5)
    assert not deadline.expired
    clock.advance(0.5)
    assert deadline.expired
    clock.advance(1.0)
    assert deadline.remaining_s() == 0.0
    with pytest.raises(DeadlineExceeded):
        deadline.check(dependency="payments")


def test_nested_scopes_take_the_tighter_deadline_and_restore_on_exit() -> None:
    clock = ManualClock()
    assert current_deadline() is None
    with deadline_scope(timeout_s=1.0, clock=clock) as outer:
        assert outer is current_deadline()
        with deadline_scope(timeout_s=5.0, clock=clock) as looser:
            assert looser is outer  # an inner scope cannot extend the budget
        with deadline_scope(timeout_s=0.2, clock=clock) as tighter:
            assert tighter is not None
            assert tighter.remaining_s() == pytest.approx(0.2)
        assert current_deadline() is outer
        with deadline_scope() as inherited:
            assert inherited is outer
    assert current_deadline() is None


async def test_the_deadline_follows_the_task_context() -> None:
    clock = ManualClock()

    async def child() -> float | None:
        deadline = current_deadline()
        return None if deadline is None else deadline.remaining_s()

    with deadline_scope(timeout_s=3.0, clock=clock):
        assert await asyncio.create_task(child()) == 3.0
    assert await asyncio.create_task(child()) is None


def test_header_round_trip_rounds_down_to_whole_milliseconds() -> None:
    clock = ManualClock()
    sent = Deadline.after(1.2345, clock=clock)
    assert sent.to_header() == "1234"
    received = parse_deadline_header(sent.to_header(), clock=clock)
    assert received is not None
    assert received.remaining_s() == pytest.approx(1.234)
    assert received.remaining_s() <= sent.remaining_s()


@pytest.mark.parametrize("value", [None, "", "abc", "1.5", "12ms", "9" * 20])
def test_malformed_headers_are_ignored(value: str | None) -> None:
    assert parse_deadline_header(value, clock=ManualClock()) is None


def test_header_is_capped_and_negative_means_already_late() -> None:
    clock = ManualClock()
    capped = parse_deadline_header("3600000", max_timeout_s=30.0, clock=clock)
    assert capped is not None
    assert capped.remaining_s() == 30.0
    late = parse_deadline_header("-5", clock=clock)
    assert late is not None
    assert late.expired


def test_outgoing_headers_use_the_current_deadline() -> None:
    clock = ManualClock()
    assert outgoing_deadline_headers() == {}
    with deadline_scope(timeout_s=0.75, clock=clock):
        assert outgoing_deadline_headers() == {DEADLINE_HEADER: "750"}
        clock.advance(0.5)
        assert outgoing_deadline_headers() == {DEADLINE_HEADER: "250"}


async def _deadline_seen_by_app(headers: list[tuple[bytes, bytes]], clock: ManualClock) -> float | None:
    seen: list[float | None] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        deadline = current_deadline()
        seen.append(None if deadline is None else deadline.remaining_s())

    async def receive() -> dict[str, Any]:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        return None

    middleware = DeadlineMiddleware(app, default_timeout_s=10.0, max_timeout_s=20.0, clock=clock)
    await middleware({"type": "http", "headers": headers}, receive, send)
    return seen[0]


async def test_middleware_puts_the_incoming_deadline_in_force() -> None:
    clock = ManualClock()
    assert await _deadline_seen_by_app([(b"x-request-deadline", b"1500")], clock) == 1.5
    assert await _deadline_seen_by_app([(b"x-request-deadline", b"999999")], clock) == 20.0
    assert await _deadline_seen_by_app([], clock) == 10.0
    assert current_deadline() is None
