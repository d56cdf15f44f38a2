"""The open-loop timetable: slots are fixed in advance and shared exactly between processes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.bench.timetable import Timetable, total_requests


def test_request_i_is_due_at_t0_plus_i_over_rate() -> None:
    tt = Timetable(t0_s=100.0, rate_per_s=4.0, count=8)
    assert [tt.due_s(j) for j in range(4)] == [100.0, 100.25, 100.5, 100.75]
    assert tt.span_s == 2.0
    assert tt.end_s == 102.0


def test_due_by_counts_every_slot_reached_and_never_goes_back() -> None:
    tt = Timetable(t0_s=10.0, rate_per_s=10.0, count=5)
    assert tt.due_by(9.99) == 0
    assert tt.due_by(10.0) == 1  # request 0 is due exactly at t0
    assert tt.due_by(10.25) == 3
    assert tt.due_by(10.25, start=4) == 4
    assert tt.due_by(99.0) == 5  # capped at count: a late wake-up sends the backlog, no more


def test_processes_split_one_run_without_gaps_or_overlap() -> None:
    single = Timetable.for_run(t0_s=5.0, rate_per_s=1000.0, duration_s=1.0)
    shares = [
        Timetable.for_run(t0_s=5.0, rate_per_s=1000.0, duration_s=1.0, processes=3, index=k) for k in range(3)
    ]
    assert sum(s.count for s in shares) == single.count == 1000
    merged = sorted(s.due_s(j) for s in shares for j in range(s.count))
    assert merged == [single.due_s(j) for j in range(single.count)]


@given(
    rate=st.floats(min_value=0.5, max_value=50_000),
    stride=st.integers(min_value=1, max_value=4),
    now=st.floats(min_value=-1.0, max_value=30.0),
    data=st.data(),
)
def test_due_by_is_exactly_the_requests_due_at_or_before_now(
    rate: float, stride: int, now: float, data: st.DataObject
) -> None:
    offset = data.draw(st.integers(min_value=0, max_value=stride - 1))
    tt = Timetable(t0_s=0.0, rate_per_s=rate, count=200, stride=stride, offset=offset)
    k = tt.due_by(now)
    assert all(tt.due_s(j) <= now for j in range(k))
    assert k == tt.count or tt.due_s(k) > now


def test_total_requests_and_validation() -> None:
    assert total_requests(rate_per_s=250.0, duration_s=2.0) == 500
    assert total_requests(rate_per_s=0.1, duration_s=1.0) == 1
    with pytest.raises(ValueError):
        Timetable(t0_s=0.0, rate_per_s=0.0, count=1)
    with pytest.raises(ValueError):
        Timetable(t0_s=0.0, rate_per_s=1.0, count=1, stride=2, offset=2)
    with pytest.raises(ValueError):
        total_requests(rate_per_s=1.0, duration_s=0.0)
