"""A CI-sized run of `mercato lab breaker`: real providers, real saga runner, a 3 s PSP outage."""

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
        outage_s=3.0, rate=8.0, duration_s=7.0, drain_s=25.0, breaker_minimum_calls=10, breaker_open_s=2.0
    )
    report = await run_experiment(options)
    on, off = (summarize(run, options) for run in report.runs)
    assert (on["mode"], off["mode"]) == ("on", "off")
    assert on["breaker_opened"] >= 1
    assert off["breaker_opened"] == 0
    assert on["psp_outage_rps"] < off["psp_outage_rps"]
    assert on["unfinished"] == off["unfinished"] == 0
    assert sum(on["statuses"].values()) == sum(off["statuses"].values()) == 56
