"""The canary gate (cluster/release.py): metrics parsing and the SLO judgement, without processes."""

from __future__ import annotations

import math

from mercato.cluster.release import GroupSample, Slo, Window, judge, parse_metrics

METRICS = """
# TYPE mercato_http_requests_total counter
mercato_http_requests_total{method="GET",route="/v1/products",status="200"} 90.0
mercato_http_requests_total{method="GET",route="/v1/products",status="500"} 10.0
mercato_http_requests_total{method="GET",route="/readyz",status="200"} 500.0
# TYPE mercato_http_request_duration_seconds histogram
mercato_http_request_duration_seconds_bucket{le="0.05",method="GET",route="/v1/products"} 80.0
mercato_http_request_duration_seconds_bucket{le="0.1",method="GET",route="/v1/products"} 99.0
mercato_http_request_duration_seconds_bucket{le="0.25",method="GET",route="/v1/products"} 100.0
mercato_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/v1/products"} 100.0
mercato_http_request_duration_seconds_bucket{le="+Inf",method="GET",route="/readyz"} 500.0
"""


def _window(requests: float, errors: float, p99_s: float) -> Window:
    return Window(requests, errors, {p99_s: requests, math.inf: requests})


def test_probes_are_not_traffic_and_p99_is_the_bucket_holding_it() -> None:
    sample = GroupSample()
    parse_metrics(METRICS, sample)
    window = sample.minus(GroupSample())
    assert (window.requests, window.errors) == (100, 10)
    assert window.p99_s == 0.1


def test_error_rate_above_the_stable_groups_fails_once_enough_answers_are_seen() -> None:
    slo = Slo(min_requests=30)
    assert judge(_window(10, 5, 0.05), _window(500, 0, 0.05), slo)[0] == "wait"
    verdict, reason = judge(_window(40, 2, 0.05), _window(500, 0, 0.05), slo)
    assert verdict == "fail"
    assert "error rate 5.00%" in reason
    assert judge(_window(40, 0, 0.05), _window(500, 1, 0.05), slo)[0] == "pass"


def test_latency_is_judged_only_with_enough_answers_on_both_sides() -> None:
    slo = Slo(min_requests=30, min_latency_requests=100)
    assert judge(_window(50, 0, 1.0), _window(500, 0, 0.05), slo)[0] == "pass"  # 50 answers: a max
    verdict, reason = judge(_window(200, 0, 1.0), _window(500, 0, 0.05), slo)
    assert verdict == "fail"
    assert "p99" in reason
