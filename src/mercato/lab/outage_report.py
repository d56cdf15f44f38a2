"""The output of ``mercato lab outage``: the figure, the table and the verdict in words.

The figure has two panels over the seconds since the load started, the outage shaded on both: the
responses per 250 ms of send time stacked by status (what the clients were answered), and the p99 latency
of each bucket against the request deadline (that the answers were quick: a refused connection fails at
once, it does not queue).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mercato.lab.outage import OutageReport

__all__ = ["CLAIM", "plot_report", "report_table", "verdict_lines"]

CLAIM = (
    "a dependency that is down is answered 503 with Retry-After, never 500, never past the deadline, "
    "and the service recovers by itself"
)

# Status -> (colour, legend label); any other status is drawn grey as "other".
_STATUS_STYLE = {
    "200": ("#2e8b57", "200"),
    "503": ("#e69f00", "503 dependency-unavailable"),
    "500": ("#c0392b", "500"),
    "0": ("#555555", "no answer"),
}


def _what(report: OutageReport) -> str:
    options = report.options
    how = "killed (kill -9)" if options["kill"] else "stopped (pg_ctl stop -m fast)"
    return (
        f"PostgreSQL {how} for {options['outage_s']:g} s under {options['rate']:g} req/s offered"
        f" ({report.achieved_rate:g} req/s achieved, {options['clients']} paced clients)"
    )


def plot_report(report: OutageReport, path: Path) -> Path:
    """Responses per bucket stacked by status (top) and per-bucket p99 latency vs the deadline (bottom)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    width = report.bucket_s
    starts = [float(b["t_s"]) for b in report.buckets]
    statuses = sorted({status for b in report.buckets for status in b["by_status"]})
    ordered = [s for s in _STATUS_STYLE if s in statuses] + [s for s in statuses if s not in _STATUS_STYLE]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]}
    )
    below = [0] * len(starts)
    for status in ordered:
        counts = [int(b["by_status"].get(status, 0)) for b in report.buckets]
        colour, label = _STATUS_STYLE.get(status, ("#999999", status))
        top.bar(starts, counts, width=width, bottom=below, align="edge", color=colour, label=label, zorder=2)
        below = [b + c for b, c in zip(below, counts, strict=True)]
    outage_label = f"PostgreSQL down ({report.up_at_s - report.down_at_s:.1f} s)"
    for axis in (top, bottom):
        axis.axvspan(report.down_at_s, report.up_at_s, color="0.5", alpha=0.18, label=outage_label, zorder=0)
        axis.grid(alpha=0.3, zorder=1)
    top.set_ylabel(f"responses per {width * 1000:g} ms")
    top.set_title(_what(report), fontsize=10)
    top.set_ylim(0, 1.3 * max(below, default=1))  # headroom for the legend above the bars
    top.legend(loc="upper left", fontsize=8, ncol=len(ordered) + 1)

    p99_ms = [None if b["p99_s"] is None else 1000 * float(b["p99_s"]) for b in report.buckets]
    points = [(t + width / 2, v) for t, v in zip(starts, p99_ms, strict=True) if v is not None]
    bottom.plot([t for t, _ in points], [v for _, v in points], color="#2471a3", marker=".", label="p99")
    deadline_ms = 1000 * float(report.options["deadline_s"])
    bottom.axhline(deadline_ms, color="#c0392b", linestyle="--", label=f"deadline {deadline_ms:,.0f} ms")
    bottom.set_yscale("log")
    if points:  # room under the line for the legend
        bottom.set_ylim(bottom=min(v for _, v in points) / 6)
    bottom.set_ylabel(f"p99 latency per {width * 1000:g} ms (ms, log)")
    bottom.set_xlabel("seconds since the load started (by send time)")
    bottom.legend(loc="lower left", fontsize=8, ncol=3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{key} {value:,}" for key, value in counts.items()) or "-"


def report_table(report: OutageReport) -> Any:
    """Measure / value, then the claim's checks with their bounds."""
    from rich.table import Table

    table = Table(title=_what(report))
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("bound", justify="right")
    table.add_column("held", justify="center")
    rows: list[tuple[str, str]] = [
        ("responses", f"{report.samples:,} in {report.duration_s:g} s"),
        ("by status", _counts(report.by_status)),
        ("non-2xx by reason", _counts(report.by_reason)),
        ("no answer (deadline + 2 s)", f"{report.no_answer:,}"),
        ("served during the outage", f"{report.served_during_outage:,}"),
        ("first 2xx after the node was back", _seconds(report.first_success_after_up_s)),
    ]
    for name, value in rows:
        table.add_row(name, value, "", "")
    for check in report.checks():
        mark = "[green]yes[/green]" if check.held else "[red]NO[/red]"
        table.add_row(check.name, check.measured, check.bound, mark)
    table.caption = f"claim: {CLAIM}: {'HELD' if report.ok else 'DID NOT HOLD'}"
    return table


def _seconds(value: float | None) -> str:
    return "never" if value is None else f"{value:g} s"


def verdict_lines(report: OutageReport) -> list[str]:
    """The claim, whether it held in this run, and each check with its numbers."""
    return [
        f"claim: {CLAIM}",
        f"run: {_what(report)}; outage from t={report.down_at_s:g} s to t={report.up_at_s:g} s",
        f"verdict: {'HELD' if report.ok else 'DID NOT HOLD'}",
        *(
            f"{'ok ' if check.held else 'FAIL'} {check.name}: {check.measured} (bound {check.bound})"
            for check in report.checks()
        ),
    ]
