"""``mercato lab breaker``: the command (options, logging, the run folder)."""

from __future__ import annotations

import asyncio
from typing import Annotated, cast

import typer

from mercato.bench.harness import OutOption, RunFolder, UpdateDocsOption, check_docs_target
from mercato.lab.breaker import run_experiment
from mercato.lab.breaker_model import CHECKOUT_DEFAULTS, VARIANTS, BreakerOptions, OutageMode, Variant
from mercato.lab.breaker_report import plot_report, report_table


def breaker_command(
    outage_s: Annotated[float, typer.Option("--outage-s", help="How long the PSP is down")] = 30.0,
    rate: Annotated[float, typer.Option(help="Checkouts per second (open loop)")] = 10.0,
    duration_s: Annotated[
        float, typer.Option("--duration-s", help="Load duration; the outage is centred")
    ] = 60.0,
    drain_s: Annotated[
        float, typer.Option("--drain-s", help="Wait at most this long for sagas to finish")
    ] = 60.0,
    outage: Annotated[
        str, typer.Option(help="hang: requests never answered; error: answered 503 at once")
    ] = "hang",
    variants: Annotated[
        str, typer.Option(help="Comma-separated runs: on (own lookup breaker), shared, off")
    ] = ",".join(VARIANTS),
    database_url: Annotated[
        str | None, typer.Option(help="A PostgreSQL server URL for the shop (default: SQLite files)")
    ] = None,
    database_prefix: Annotated[
        str, typer.Option(help="Name prefix of the throwaway PostgreSQL databases")
    ] = "mercato_lab",
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON")] = False,
    breaker_probes: Annotated[
        int, typer.Option("--breaker-probes", help="Half-open probes of the PSP breaker")
    ] = CHECKOUT_DEFAULTS.breaker_half_open_probes,
    breaker_consecutive_failures: Annotated[
        int,
        typer.Option("--breaker-consecutive-failures", help="Trip on this many failures in a row (0: off)"),
    ] = CHECKOUT_DEFAULTS.breaker_consecutive_failures,
    breaker_minimum_calls: Annotated[
        int, typer.Option("--breaker-minimum-calls", help="Calls in the window before its rates count")
    ] = CHECKOUT_DEFAULTS.breaker_minimum_calls,
    breaker_open_s: Annotated[
        float, typer.Option("--breaker-open-s", help="First open wait of the PSP breaker")
    ] = CHECKOUT_DEFAULTS.breaker_open_s,
    breaker_max_open_s: Annotated[
        float,
        typer.Option("--breaker-max-open-s", help="Cap of the doubling open wait (<= open-s: no growth)"),
    ] = CHECKOUT_DEFAULTS.breaker_max_open_s,
    out: OutOption = None,
    update_docs: UpdateDocsOption = False,
) -> None:
    """PSP outage under steady checkout load, with and without breaker + retry budget."""
    import orjson
    from rich.console import Console

    from mercato.kit.observability import configure_logging

    # Thousands of saga log lines would bury the result; warnings and errors still show.
    configure_logging(level="warning", fmt="console")
    console = Console(stderr=True)
    try:
        chosen = tuple(v.strip() for v in variants.split(",") if v.strip())
        options = BreakerOptions(
            outage_s=outage_s,
            rate=rate,
            duration_s=duration_s,
            drain_s=drain_s,
            database_url=database_url,
            database_prefix=database_prefix,
            breaker_half_open_probes=breaker_probes,
            breaker_consecutive_failures=breaker_consecutive_failures,
            breaker_minimum_calls=breaker_minimum_calls,
            breaker_open_s=breaker_open_s,
            breaker_max_open_s=breaker_max_open_s,
            # Both are checked against their Literal by BreakerOptions.__post_init__.
            outage_mode=cast(OutageMode, outage),
            variants=cast(tuple[Variant, ...], chosen),
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    if update_docs:
        check_docs_target("breaker")
    # markup=False: "[on]"/"[off]" would otherwise be read as rich style tags and vanish.
    report = asyncio.run(run_experiment(options, on_progress=lambda line: console.print(line, markup=False)))
    run = RunFolder.open("breaker", out)
    written = plot_report(report, run.figure)
    body = {**report.to_dict(), "plot": str(written)}
    if as_json:
        # The table still goes to stderr, so one run gives both the record and the reading.
        Console(width=400, stderr=True).print(report_table(report))
        typer.echo(orjson.dumps(body, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode())
    else:
        Console(width=400).print(report_table(report))
    # Through orjson first: the summaries hold numpy floats, which the run folder's json cannot write.
    data = orjson.loads(orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY))
    run.record(data=data, tables=[report_table(report)], update_docs=update_docs, console=console)
