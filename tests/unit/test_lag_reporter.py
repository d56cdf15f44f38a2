"""`LagReporter`: the consumer lag gauge's count, rationed without leaving the gauge stale."""

from __future__ import annotations

from mercato.kit.messaging import LagReporter


class _Stream:
    def __init__(self) -> None:
        self.lag_now = 7
        self.counted = 0

    async def lag(self, topic: str, group: str) -> int:
        self.counted += 1
        return self.lag_now


class _Hook:
    def __init__(self) -> None:
        self.gauge: int | None = None

    def consumer_lag(self, *, group: str, topic: str, messages: int) -> None:
        self.gauge = messages


async def test_the_first_idle_pass_after_a_skipped_busy_count_reports_at_once() -> None:
    stream, hook, now = _Stream(), _Hook(), [100.0]
    reporter = LagReporter(stream, hook, interval_s=5.0, busy_interval_s=1.0, now=lambda: now[0])  # type: ignore[arg-type]
    await reporter.report("t", "g", busy=True)  # counted: 7 behind
    assert (stream.counted, hook.gauge) == (1, 7)
    stream.lag_now = 0
    now[0] += 0.1
    await reporter.report("t", "g", busy=True)  # within the busy interval: skipped
    assert (stream.counted, hook.gauge) == (1, 7)
    now[0] += 0.1
    # Caught up: the idle pass reports now, not 5 s later, so the gauge does not show 7 meanwhile.
    await reporter.report("t", "g", busy=False)
    assert (stream.counted, hook.gauge) == (2, 0)
    now[0] += 0.1
    await reporter.report("t", "g", busy=False)  # and then idle passes are rationed again
    assert stream.counted == 2
