"""`mercato lab outage`'s reading of a run: the claim's checks, the verdict, the 250 ms buckets, the table
and the figure, from answers laid out by hand (the end-to-end run: tests/chaos/test_postgres_outage.py).
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from mercato.lab.outage import BUCKET_S, OutageOptions, Sample, summarize
from mercato.lab.outage_report import CLAIM, plot_report, report_table, verdict_lines

OPTIONS = OutageOptions(outage_s=2.0, warmup_s=1.0, after_s=1.0, deadline_s=5.0)
DOWN_AT_S, UP_AT_S = 1.0, 3.0


def _answers(*, during: Sample | None = None) -> list[Sample]:
    """One read every 100 ms for 4 s: 200 outside the outage, 503 + Retry-After inside it."""
    answers = []
    for tenth in range(40):
        sent_s = tenth / 10
        down = DOWN_AT_S <= sent_s < UP_AT_S
        answers.append(
            Sample(sent_s, 0.004, 503 if down else 200, "read", "connection-refused" if down else "", down)
        )
    if during is not None:
        answers.append(during)
    return answers


def test_an_outage_answered_503_with_retry_after_holds_the_claim(tmp_path: Path) -> None:
    report = summarize(_answers(), OPTIONS, DOWN_AT_S, UP_AT_S)
    assert report.by_status == {"200": 20, "503": 20}
    assert report.ok
    assert report.recovery_s == 0.0
    lines = verdict_lines(report)
    assert lines[0] == f"claim: {CLAIM}"
    assert "verdict: HELD" in lines
    assert not [line for line in lines if line.startswith("FAIL")]
    assert "ok  500s: 0 of 40 (bound 0)" in lines

    # 250 ms buckets of send time: 2.5 answers each (alternating 3 and 2), 503s only inside the window.
    assert report.bucket_s == BUCKET_S
    assert len(report.buckets) == 16
    assert report.buckets[0] == {"t_s": 0.0, "by_status": {"200": 3}, "p99_s": 0.004}
    assert report.buckets[5]["by_status"] == {"503": 2}
    assert sum(sum(b["by_status"].values()) for b in report.buckets) == report.samples

    figure = plot_report(report, tmp_path / "outage.png")
    assert figure.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    console = Console(file=None, width=200, record=True, color_system=None)
    console.print(report_table(report))
    assert "HELD" in console.export_text()


def test_a_500_or_a_503_without_retry_after_fails_the_claim_and_says_which() -> None:
    crash = Sample(1.5, 0.01, 500, "write", "internal-error")
    report = summarize(_answers(during=crash), OPTIONS, DOWN_AT_S, UP_AT_S)
    assert not report.ok
    lines = verdict_lines(report)
    assert "verdict: DID NOT HOLD" in lines
    assert "FAIL 500s: 1 of 41 (bound 0)" in lines

    bare = Sample(2.0, 0.01, 503, "read", "connection-refused", retry_after=False)
    report = summarize(_answers(during=bare), OPTIONS, DOWN_AT_S, UP_AT_S)
    assert [line for line in verdict_lines(report) if line.startswith("FAIL")] == [
        "FAIL 503s without Retry-After: 1 of 21 (bound 0)"
    ]


def test_an_answer_past_the_deadline_or_no_recovery_fails_the_claim() -> None:
    slow = Sample(2.0, 6.0, 503, "read", "connection-refused", retry_after=True)
    report = summarize(_answers(during=slow), OPTIONS, DOWN_AT_S, UP_AT_S)
    [failed] = [check for check in report.checks() if not check.held]
    assert failed.name == "slowest answer"
    assert failed.bound == "<= deadline 5 s"

    still_down = [Sample(s.sent_s, s.latency_s, 503, "read", "connection-refused", True) for s in _answers()]
    report = summarize(still_down, OPTIONS, DOWN_AT_S, UP_AT_S)
    assert report.recovery_s is None
    assert [c.name for c in report.checks() if not c.held] == ["recovery (node back -> last non-2xx)"]
