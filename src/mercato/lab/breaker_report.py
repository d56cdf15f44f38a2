"""The output of ``mercato lab breaker``: the figure (timeline and per-phase panels) and the table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mercato.lab.breaker_model import PHASES, SLOW_ATTEMPT_S, ExperimentReport, per_second


def plot_report(report: ExperimentReport, path: Path) -> Path:
    """PSP received req/s (top) and per-second p99 payment-attempt latency (bottom), outage shaded."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and in CI
    import matplotlib.pyplot as plt

    options = report.options
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    styles = {
        "on": ("tab:blue", "breaker + retry budget, lookups on their own breaker"),
        "shared": ("tab:green", "breaker + retry budget, lookups share it"),
        "off": ("tab:red", "no breaker (saga retries only)"),
    }
    for run in report.runs:
        series = per_second(run, options)
        color, label = styles.get(run.mode, ("tab:gray", run.mode))
        top.plot(series["psp_t"], series["psp_rps"], color=color, label=label)
        bottom.plot(series["t"], series["payment_p99_ms"], color=color, marker=".", label=label)
    for axis in (top, bottom):
        axis.axvspan(options.outage_start_s, options.outage_end_s, color="0.85", label="PSP outage")
        axis.grid(alpha=0.3)
    top.set_ylabel("PSP writes (POST) received / s")
    top.set_title(
        f"PSP outage ({options.outage_mode}s) of {options.outage_s:g} s"
        f" under {options.rate:g} checkouts/s (open loop)"
    )
    top.legend(loc="upper right")
    bottom.set_ylabel("p99 authorize_payment attempt (ms)")
    bottom.set_yscale("symlog", linthresh=10)
    bottom.set_xlabel("seconds since the load started")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:g}"


def _phase_cell(row: dict[str, Any], phase: str) -> str:
    """`n (slow) p50 / p99` of the payment attempts that started in `phase`; "-" if there were none."""
    cell = row["phases"][phase]
    if not cell["payment_attempts"]:
        return "-"
    return (
        f"{cell['payment_attempts']} ({cell['payment_slow_attempts']})"
        f" {_ms(cell['payment_p50_ms'])} / {_ms(cell['payment_p99_ms'])}"
    )


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items()))
    return str(value)


Render = Callable[[dict[str, Any]], str]


def _key(key: str) -> Render:
    return lambda row: _cell(row[key])


def _pair(p50: str, p99: str) -> Render:
    return lambda row: f"{_ms(row[p50])} / {_ms(row[p99])}"


def _phase(phase: str) -> Render:
    return lambda row: _phase_cell(row, phase)


def report_table(report: ExperimentReport) -> Any:
    from rich.table import Table

    options = report.options
    table = Table(
        title=f"PSP outage ({options.outage_mode}) {options.outage_s:g} s at {options.rate:g} checkouts/s"
    )
    columns: list[tuple[str, Render]] = [
        ("resilience", _key("mode")),
        ("payment p50 ms", _key("payment_outage_p50_ms")),
        ("payment p99 ms", _key("payment_outage_p99_ms")),
        ("terminal p50 ms", _key("terminal_outage_p50_ms")),
        ("terminal p99 ms", _key("terminal_outage_p99_ms")),
        ("all terminal p99 ms", _key("terminal_p99_ms")),
        ("PSP writes/s in outage", _key("psp_outage_rps")),
        ("PSP writes", _key("psp_total_requests")),
        ("PSP reads", _key("psp_reads_total")),
        ("undo refused", _key("compensations_refused")),
        ("breaker opened", _key("breaker_opened")),
        ("transitions", _key("breaker_transitions")),
        ("lookups refused", _key("read_breaker_rejections")),
        ("unfinished", _key("unfinished")),
        ("tripped after s", _key("trip_after_s")),
        *[(f"{phase} ms", _phase(phase)) for phase in PHASES[1:]],
        ("closed after outage s", _key("reclosed_after_s")),
        ("checkout call ms", _pair("checkout_start_p50_ms", "checkout_start_p99_ms")),
        ("outcomes", _key("statuses")),
    ]
    for title, _ in columns:
        table.add_column(title, justify="left" if title in ("resilience", "outcomes") else "right")
    for row in report.rows():
        table.add_row(*(render(row) for _, render in columns))
    table.caption = (
        "payment = authorize_payment attempts during the outage; terminal = from checkout to the saga's"
        " terminal state, for checkouts started in it; PSP writes/reads = POST/GET it received;"
        " undo refused = compensation attempts met by an open circuit;"
        " lookups refused = by the psp-reads breaker;"
        " detection / open / recovery = payment attempts that started between the outage's start and"
        " the first trip / the trip and the outage's end / after it, as `n (slow) p50 / p99`"
        f" (slow = at least {SLOW_ATTEMPT_S:g} s);"
        " checkout call = CheckoutService.start (what POST /v1/checkout waits for), p50 / p99"
    )
    return table
