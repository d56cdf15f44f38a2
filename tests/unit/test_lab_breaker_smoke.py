"""A CI-sized run of `mercato lab breaker`: real providers, real saga runner, a 5 s PSP outage of hangs."""

from __future__ import annotations

import pytest

from mercato.lab.breaker import BreakerOptions, run_experiment, summarize

pytestmark = pytest.mark.slow  # two runs with a drain each: ~30 s


async def test_the_breaker_opens_and_the_psp_sees_fewer_requests_during_the_outage(
    request: pytest.FixtureRequest,
) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("two runs with a drain take ~30 s: run it with -m slow")
    options = BreakerOptions(
        # Long enough that the hung attempts (1 s each before they count) outweigh the successes in
        # the breaker's 10 s window.
        outage_s=5.0,
        rate=8.0,
        duration_s=9.0,
        drain_s=30.0,
        breaker_minimum_calls=10,
        breaker_open_s=2.0,
        outage_mode="hang",
        variants=("on", "off"),
    )
    report = await run_experiment(options)
    on_run = report.runs[0]
    on, off = (summarize(run, options) for run in report.runs)
    assert (on["mode"], off["mode"]) == ("on", "off")
    assert on["breaker_opened"] >= 1
    assert off["breaker_opened"] == 0
    assert on["psp_outage_rps"] < off["psp_outage_rps"]
    # Hangs: without the breaker an attempt lasts its whole timeout; with it, most fail fast.
    assert on["payment_outage_p50_ms"] < off["payment_outage_p50_ms"]
    assert on["read_breaker_rejections"] == 0
    # Phases are cut at the breaker's recorded trip; without a breaker the whole outage is detection.
    assert on["trip_after_s"] is not None
    assert 0 < on["trip_after_s"] < options.outage_s
    assert off["trip_after_s"] is None
    assert off["phases"]["open"]["payment_attempts"] == 0
    opened, detected = on["phases"]["open"], on["phases"]["detection"]
    assert opened["payment_attempts"] > 0
    assert opened["payment_p50_ms"] < detected["payment_p50_ms"]
    # One probe per half-open, and the wait doubles after a failed one: 2 s, then 4 s, in a 5 s outage.
    probes = [
        t
        for t, _, new in on_run.breaker_log
        if new == "half_open" and options.outage_start_s <= t < options.outage_end_s
    ]
    assert len(probes) <= 2
    # (Not "no slow attempt while open": on SQLite a refused attempt still waits for the single
    # writer to record it, which under the outage's pile-up of parked sagas can take 0.5 s.)
