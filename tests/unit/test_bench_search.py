"""The maximum-sustainable-rate search, against simulated servers with a known capacity."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.bench.search import RateSearch, SearchPolicy


def _run(search: RateSearch, capacity: float) -> list[float]:
    tried = []
    while (rate := search.next_rate()) is not None:
        tried.append(rate)
        search.record(rate, rate <= capacity)
    return tried


def test_ramps_geometrically_then_bisects() -> None:
    search = RateSearch(SearchPolicy(start_rate=100, growth=2, precision=0.05, max_steps=20))
    tried = _run(search, capacity=700)
    assert tried[:4] == [100, 200, 400, 800]
    assert tried[4] == 600  # midpoint of the last pass (400) and the first failure (800)
    assert search.best is not None
    assert 700 / 1.05 <= search.best <= 700
    assert search.lowest_failure is not None
    assert search.lowest_failure / search.best - 1 <= 0.05


def test_ramps_down_when_the_start_rate_already_fails() -> None:
    search = RateSearch(SearchPolicy(start_rate=1000, growth=2, min_rate=10, max_steps=30))
    tried = _run(search, capacity=180)
    assert tried[:4] == [1000, 500, 250, 125]
    assert search.best is not None
    assert 180 / 1.05 <= search.best <= 180


def test_gives_up_below_min_rate_and_at_max_rate() -> None:
    down = RateSearch(SearchPolicy(start_rate=40, growth=2, min_rate=10))
    assert _run(down, capacity=1) == [40, 20, 10]
    floor = RateSearch(SearchPolicy(start_rate=25, growth=2, min_rate=10))
    assert _run(floor, capacity=11)[:3] == [25, 12.5, 10]
    assert down.best is None
    up = RateSearch(SearchPolicy(start_rate=100, growth=2, max_rate=300))
    assert _run(up, capacity=1e9) == [100, 200, 300]
    assert up.best == 300


def test_step_budget_bounds_the_search() -> None:
    search = RateSearch(SearchPolicy(start_rate=10, growth=1.1, max_steps=5))
    assert len(_run(search, capacity=1e9)) == 5


def test_an_explicit_ladder_is_tried_in_order_and_the_best_pass_reported() -> None:
    search = RateSearch(rates=[800, 200, 400])
    assert _run(search, capacity=500) == [200, 400, 800]
    assert search.best == 400


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        SearchPolicy(growth=1.0)
    with pytest.raises(ValueError):
        SearchPolicy(start_rate=5, min_rate=10)
    with pytest.raises(ValueError):
        SearchPolicy(precision=0)


@given(capacity=st.floats(min_value=12, max_value=40_000), start=st.floats(min_value=10, max_value=5_000))
def test_finds_any_capacity_within_precision(capacity: float, start: float) -> None:
    search = RateSearch(SearchPolicy(start_rate=start, min_rate=10, max_rate=50_000, max_steps=40))
    _run(search, capacity)
    assert search.best is not None
    assert capacity / 1.05 <= search.best <= capacity
