"""`mercato lab balancing`: the command, its table and its figure (the experiment: lab/balancing.py)."""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.lab.balancing import AlgorithmResult, load_average, run_client_side, run_haproxy, verdict

__all__ = ["balancing_command"]


def table(results: list[AlgorithmResult]) -> Table:
    t = Table(title="One slow instance: latency and share of requests per algorithm")
    for column in (
        "side",
        "algorithm",
        "requests",
        "errors",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "healthy p99 ms",
        "share",
    ):
        t.add_column(column)
    for r in results:
        share = ", ".join(f"{name}{'*' if name == r.slow else ''} {v:.1%}" for name, v in r.share.items())
        t.add_row(
            r.side,
            r.algorithm,
            str(r.requests),
            str(r.errors),
            f"{r.p50_ms:.1f}",
            f"{r.p90_ms:.1f}",
            f"{r.p99_ms:.1f}",
            f"{r.healthy_p99_ms:.1f}",
            share,
        )
    t.caption = "* the slow instance"
    return t


def plot(results: list[AlgorithmResult], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sides = [s for s in ("haproxy", "client") if any(r.side == s for r in results)]
    fig, axes = plt.subplots(1, len(sides), figsize=(6 * len(sides), 4.2), squeeze=False)
    for ax, side in zip(axes[0], sides, strict=True):
        rows = [r for r in results if r.side == side]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], [r.p50_ms for r in rows], 0.4, label="p50")
        bars = ax.bar([x + 0.2 for x in xs], [r.p99_ms for r in rows], 0.4, label="p99")
        ax.bar_label(bars, labels=[f"slow {r.slow_share:.1%}" for r in rows], fontsize=8)
        ax.axhline(rows[0].slow_ms, color="grey", linestyle="--", linewidth=1, label="slow delay")
        ax.axhline(
            rows[0].healthy_p99_ms, color="green", linestyle=":", linewidth=1, label="healthy p99 (rr)"
        )
        ax.set_xticks(list(xs), [r.algorithm for r in rows])
        ax.set_ylabel("latency ms")
        title = "HAProxy, 4 mercato api" if side == "haproxy" else "kit/balancing, 3 PSP simulators"
        ax.set_title(f"{title} (1 slow)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def balancing_command(
    slow_ms: Annotated[float, typer.Option(min=1, max=5000, help="Delay of the slow instance, ms")] = 300.0,
    concurrency: Annotated[int, typer.Option(min=1, max=256, help="Closed-loop clients")] = 8,
    duration_s: Annotated[float, typer.Option(min=1, max=300, help="Seconds of load per algorithm")] = 8.0,
    side: Annotated[str, typer.Option(help="haproxy, client or both")] = "both",
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """4 API instances behind HAProxy and 3 PSPs behind kit/balancing, one slow each: round robin vs
    least-conn vs power of two choices, p50/p99 and each instance's share."""
    if side not in ("haproxy", "client", "both"):
        raise typer.BadParameter("haproxy, client or both", param_hint="--side")
    if update_docs:
        check_docs_target("balancing")
    console = Console(stderr=True)
    results: list[AlgorithmResult] = []
    with tempfile.TemporaryDirectory(prefix="mercato-lab-balancing-") as tmp:
        work = Path(tmp)
        kwargs = {"slow_ms": slow_ms, "concurrency": concurrency, "duration_s": duration_s}
        if side in ("haproxy", "both"):
            results += run_haproxy(work / "haproxy", log=console.print, **kwargs)  # type: ignore[arg-type]
        if side in ("client", "both"):
            results += run_client_side(work / "client", log=console.print, **kwargs)  # type: ignore[arg-type]
    load = load_average()
    Console(width=200).print(table(results))
    lines = verdict(results, load_average=load)
    for line in lines:
        Console(width=200).print(line)
    run = RunFolder.open("balancing", out)
    plot(results, run.figure)
    run.record(
        data={
            "slow_ms": slow_ms,
            "concurrency": concurrency,
            "duration_s": duration_s,
            "load_average": load,
            "results": [asdict(r) | {"slow_share": r.slow_share} for r in results],
        },
        tables=[table(results)],
        verdict=lines,
        update_docs=update_docs,
        console=console,
    )
