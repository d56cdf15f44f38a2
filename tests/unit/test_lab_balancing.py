"""The balancing lab's arithmetic: shares, percentiles, and a verdict that says "did not hold" when
the slow instance's share puts it in the tail."""

from __future__ import annotations

from mercato.lab.balancing import AlgorithmResult, percentile, summarise, verdict


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile([7.0], 99) == 7


def _run(algorithm: str, slow_requests: int, *, slow_ms: float = 300) -> AlgorithmResult:
    samples = [("h0", 10.0)] * (500 - slow_requests // 2) + [("h1", 12.0)] * (500 - slow_requests // 2)
    samples += [("s", slow_ms)] * slow_requests
    return summarise(AlgorithmResult("client", algorithm, "s", slow_ms), samples, 0)


def test_summarise_and_verdict() -> None:
    rr = _run("round_robin", 333)
    assert rr.slow_share > 0.3
    assert rr.p99_ms == 300
    assert rr.healthy_p99_ms == 12
    good = [rr, _run("least_outstanding", 4), _run("p2c", 6)]  # < 1 % to the slow one
    [line, *_] = verdict(good, load_average="1.0")
    assert line.startswith("client: claim held")
    bad = [rr, _run("least_outstanding", 40), _run("p2c", 6)]  # 4 %: the tail is the slow one
    [line, *_] = verdict(bad, load_average="1.0")
    assert line.startswith("client: claim did not hold")
