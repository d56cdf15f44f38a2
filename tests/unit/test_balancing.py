"""kit/balancing: the choice policies and outlier ejection's rules, with a fake clock (ADR 0039)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mercato.kit.balancing import Balancer, Outcome, OutlierDetector, OutlierSettings, Policy


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


HOSTS = ["a", "b", "c"]


def test_round_robin_takes_turns() -> None:
    balancer = Balancer(HOSTS, policy=Policy.ROUND_ROBIN)
    picks = []
    for _ in range(6):
        lease = balancer.acquire()
        picks.append(lease.endpoint)
        lease.success()
    assert picks == ["a", "b", "c", "a", "b", "c"]


def test_least_outstanding_avoids_the_busy_endpoint() -> None:
    balancer = Balancer(HOSTS, policy=Policy.LEAST_OUTSTANDING)
    stuck = [balancer.acquire() for _ in range(3)]  # one in flight on each
    assert sorted(lease.endpoint for lease in stuck) == HOSTS
    for lease in stuck[1:]:
        lease.success()  # a is still busy
    seen = Counter()
    for _ in range(20):
        lease = balancer.acquire()
        seen[lease.endpoint] += 1
        lease.success()
    assert seen["a"] == 0
    assert seen["b"] == seen["c"] == 10


def test_p2c_picks_the_less_loaded_of_two() -> None:
    balancer = Balancer(HOSTS, policy=Policy.P2C, rng=random.Random(7))
    busy = [balancer.acquire() for _ in range(30)]
    # 30 requests never released: p2c spreads them evenly (never > 1 apart from the least loaded).
    counts = Counter(lease.endpoint for lease in busy)
    assert max(counts.values()) - min(counts.values()) <= 2


def test_consecutive_5xx_eject_for_a_growing_capped_time() -> None:
    clock = FakeClock()
    od = OutlierDetector(
        HOSTS, OutlierSettings(consecutive_5xx=3, base_ejection_s=10, max_ejection_s=25), clock=clock
    )
    durations = []
    for _ in range(4):
        for _ in range(2):
            assert not od.record("a", Outcome.SERVER_ERROR)
        assert od.record("a", Outcome.SERVER_ERROR)
        until = od.ejected_until("a")
        assert until is not None
        durations.append(until - clock.now)
        assert od.available() == ["b", "c"]
        clock.now = until  # returns exactly at the end of its ejection
        assert not od.is_ejected("a")
    assert durations == [10, 20, 25, 25]  # base × n, capped


def test_a_success_resets_the_streak_and_timeouts_count_separately() -> None:
    od = OutlierDetector(
        HOSTS, OutlierSettings(consecutive_5xx=2, consecutive_local_failures=2), clock=FakeClock()
    )
    od.record("a", Outcome.SERVER_ERROR)
    od.record("a", Outcome.SUCCESS)
    assert not od.record("a", Outcome.SERVER_ERROR)
    od.record("b", Outcome.LOCAL_FAILURE)
    assert od.record("b", Outcome.LOCAL_FAILURE)


def test_the_multiplier_decays_while_healthy() -> None:
    clock = FakeClock()
    od = OutlierDetector(
        HOSTS, OutlierSettings(consecutive_5xx=1, base_ejection_s=10, max_ejection_s=100), clock=clock
    )
    od.record("a", Outcome.SERVER_ERROR)
    clock.now = 10
    od.record("a", Outcome.SERVER_ERROR)  # second ejection: 20 s
    clock.now = 30
    assert od.times_ejected("a") == 2
    clock.now = 30 + 25  # two base periods healthy
    assert od.times_ejected("a") == 0
    od.record("a", Outcome.SERVER_ERROR)
    assert od.ejected_until("a") == 55 + 10


def test_the_cap_counts_after_the_ejection() -> None:
    # Envoy #26877: 3 hosts at 50 % ejected two. Here: one.
    od = OutlierDetector(
        HOSTS, OutlierSettings(consecutive_5xx=1, max_ejection_percent=50), clock=FakeClock()
    )
    assert od.record("a", Outcome.SERVER_ERROR)
    assert not od.record("b", Outcome.SERVER_ERROR)
    assert od.overflows == 1
    assert od.ejected() == ["a"]
    # Envoy #3263/#17504: the only host is not ejected unless asked for.
    single = OutlierDetector(
        ["x"], OutlierSettings(consecutive_5xx=1, max_ejection_percent=10), clock=FakeClock()
    )
    assert not single.record("x", Outcome.SERVER_ERROR)
    forced = OutlierSettings(consecutive_5xx=1, max_ejection_percent=10, always_eject_one=True)
    assert OutlierDetector(["x", "y"], forced, clock=FakeClock()).record("x", Outcome.SERVER_ERROR)


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError):
        OutlierSettings(max_ejection_percent=120)
    with pytest.raises(ValueError):
        OutlierSettings(base_ejection_s=10, max_ejection_s=5)
    with pytest.raises(ValueError):
        Balancer([])


events = st.lists(
    st.tuples(
        st.integers(0, 5),  # which host
        st.sampled_from(list(Outcome)),
        st.floats(0, 40, allow_nan=False),  # time passing before the event
    ),
    max_size=200,
)


@settings(max_examples=300, deadline=None)
@given(
    hosts=st.integers(1, 6),
    percent=st.sampled_from([0.0, 10.0, 33.0, 34.0, 50.0, 66.0, 67.0, 100.0]),
    threshold=st.integers(1, 3),
    always_one=st.booleans(),
    script=events,
)
def test_never_more_than_the_cap_ejected(
    hosts: int, percent: float, threshold: int, always_one: bool, script: list[tuple[int, Outcome, float]]
) -> None:
    clock = FakeClock()
    cfg = OutlierSettings(
        consecutive_5xx=threshold,
        consecutive_local_failures=threshold,
        base_ejection_s=5,
        max_ejection_s=30,
        max_ejection_percent=percent,
        always_eject_one=always_one,
    )
    names = [f"h{i}" for i in range(hosts)]
    balancer = Balancer(names, outlier=cfg, clock=clock, policy=Policy.P2C, rng=random.Random(1))
    cap = cfg.max_ejected(hosts)
    assert cap <= hosts
    assert cap <= max(int(percent * hosts / 100 + 1e-9), 1 if always_one else 0)
    for index, outcome, wait in script:
        clock.now += wait
        lease = balancer.acquire()
        assert lease.endpoint in names
        host = names[index % hosts]
        balancer.detector.record(host, outcome)
        lease.success()
        ejected = balancer.detector.ejected()
        assert len(ejected) <= cap
        # Every ejection lasts at most max_ejection_s.
        for name in ejected:
            until = balancer.detector.ejected_until(name)
            assert until is not None
            assert until - clock.now <= cfg.max_ejection_s
        # Picks avoid ejected hosts whenever any host is in service.
        if len(ejected) < hosts:
            assert balancer.acquire().endpoint not in ejected
    assert all(s.in_flight >= 0 for s in balancer.stats())
