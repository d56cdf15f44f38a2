"""``mercato lab network``: the command (options, progress bars, the run folder)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.lab.network import run_experiment
from mercato.lab.network_model import ExperimentConfig
from mercato.lab.network_report import conclusions, plot, table
from mercato.lab.network_servers import MAX_DELAY_MS

NAME = "network"


def network_command(
    requests: Annotated[
        int, typer.Option(min=5, max=1_000_000, help="Requests per scenario, over all rounds")
    ] = 2000,
    rounds: Annotated[
        int, typer.Option(min=1, max=100, help="Scenarios run round-robin this many times (noise spread)")
    ] = 5,
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, help="Concurrent requests (HTTP/2 scenarios)")
    ] = 16,
    delay_ms: Annotated[
        int, typer.Option(min=0, max=MAX_DELAY_MS, help="Server wait per request (HTTP/2 scenarios)")
    ] = 5,
    http2: Annotated[
        bool, typer.Option("--http2/--no-http2", help="Measure HTTP/1.1 vs HTTP/2 (hypercorn)")
    ] = True,
    nagle: Annotated[bool, typer.Option("--nagle/--no-nagle", help="Measure TCP_NODELAY vs Nagle")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the figures as JSON on stdout")] = False,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """Handshakes vs keep-alive (TCP, TLS), HTTP/1.1 vs HTTP/2, Nagle: measured over loopback."""
    console = Console(stderr=True, width=160)
    if rounds > requests:
        console.print("[red]error:[/red] --rounds must not exceed --requests")
        raise typer.Exit(2)
    if update_docs:
        check_docs_target(NAME)
    config = ExperimentConfig(
        requests=requests, rounds=rounds, concurrency=concurrency, delay_ms=delay_ms, http2=http2, nagle=nagle
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=as_json,
    ) as progress:
        try:
            report = run_experiment(config, progress=progress)
        except (RuntimeError, OSError) as exc:
            console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(1) from exc
    run = RunFolder.open(NAME, out)
    plot(report, run.figure)
    verdict = conclusions(report)
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
    else:
        console.print(table(report))
        for note in report.notes:
            console.print(f"[yellow]{note}[/yellow]")
        for line in verdict:
            console.print(f"• {line}")
    run.record(
        data=report.to_json(),
        tables=[table(report)],
        verdict=[*verdict, *report.notes],
        update_docs=update_docs,
        console=console,
    )
