"""`mercato provider psp|carrier`: run one simulated provider in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console

from mercato.config import telemetry_settings
from mercato.kit.observability import configure_logging, start_process_tracing
from mercato.kit.runtime import tune_gc_for_service
from mercato.providers._edge import ProviderApp
from mercato.providers.carrier.app import create_carrier_app
from mercato.providers.config import ProviderSettings
from mercato.providers.faults import FaultSettings
from mercato.providers.mail.app import create_mail_app
from mercato.providers.psp.app import create_psp_app
from mercato.providers.server import provider_server

__all__ = ["app"]

app = typer.Typer(
    help="Simulated external providers (PSP, carrier, mail) with fault injection.", no_args_is_help=True
)
_console = Console(stderr=True)

Host = Annotated[str, typer.Option(help="Bind address")]
DatabaseUrl = Annotated[
    str | None,
    typer.Option(help="SQLAlchemy URL of the provider's own database (default: SQLite in --data-dir)"),
]
DataDir = Annotated[Path, typer.Option(help="Directory for the default SQLite database")]
ErrorRate = Annotated[float, typer.Option(help="Share of business requests answered 500/503")]
HangRate = Annotated[float, typer.Option(help="Share of business requests never answered")]
LostRate = Annotated[float, typer.Option(help="Share applied, committed, then dropped without a response")]
P50 = Annotated[float, typer.Option(help="Median added latency in ms (0 = none)")]
P99 = Annotated[float, typer.Option(help="99th percentile added latency in ms (lognormal tail)")]
OutageFor = Annotated[float | None, typer.Option(help="Start with an outage lasting this many seconds")]
Seed = Annotated[int | None, typer.Option(help="Seed for fault draws (reproducible runs)")]


def _faults(
    error_rate: float,
    hang_rate: float,
    lost_response_rate: float,
    latency_p50_ms: float,
    latency_p99_ms: float,
    outage_for_s: float | None,
    seed: int | None,
) -> FaultSettings:
    try:
        return FaultSettings(
            error_rate=error_rate,
            hang_rate=hang_rate,
            lost_response_rate=lost_response_rate,
            latency_p50_ms=latency_p50_ms,
            latency_p99_ms=latency_p99_ms if latency_p99_ms else latency_p50_ms,
            outage_for_s=outage_for_s,
            seed=seed,
        )
    except ValidationError as exc:
        _console.print(f"[red]invalid fault settings:[/red] {exc}")
        raise typer.Exit(2) from exc


def _run(application: ProviderApp, name: str, *, host: str, port: int, settings: ProviderSettings) -> None:
    """Serve in the foreground, traced when `MERCATO_TELEMETRY_TRACE_EXPORTER` says so: the shop's
    calls arrive with `traceparent`, and this process's server spans join their trace."""
    telemetry = telemetry_settings()
    provider = start_process_tracing(
        service_name=f"{telemetry.service_name}-{name}",
        role=name,
        exporter=telemetry.trace_exporter,
        sample_ratio=telemetry.trace_sample_ratio,
        otlp_endpoint=telemetry.otlp_endpoint,
    )
    tune_gc_for_service()
    try:
        provider_server(
            application, host=host, port=port, graceful_shutdown_s=settings.graceful_shutdown_s
        ).run()
    finally:
        if provider is not None:
            provider.shutdown()


@app.command()
def psp(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8100,
    database_url: DatabaseUrl = None,
    data_dir: DataDir = Path("./var"),
    error_rate: ErrorRate = 0.0,
    hang_rate: HangRate = 0.0,
    lost_response_rate: LostRate = 0.0,
    latency_p50_ms: P50 = 0.0,
    latency_p99_ms: P99 = 0.0,
    outage_for_s: OutageFor = None,
    decline_rate: Annotated[float, typer.Option(help="Share of authorizations declined")] = 0.0,
    seed: Seed = None,
) -> None:
    """Serve the simulated payment service provider (authorize, capture, void, refund; ledger)."""
    faults = _faults(
        error_rate, hang_rate, lost_response_rate, latency_p50_ms, latency_p99_ms, outage_for_s, seed
    )
    settings = ProviderSettings(
        host=host, psp_port=port, data_dir=data_dir, psp_database_url=database_url, decline_rate=decline_rate
    )
    configure_logging()
    application = create_psp_app(settings.psp_url(), faults=faults, decline_rate=settings.decline_rate)
    _console.print(f"[bold]Simulated PSP[/bold] on http://{host}:{port}  (faults: /admin/faults)")
    _run(application, "psp", host=host, port=port, settings=settings)


@app.command()
def carrier(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port")] = 8101,
    database_url: DatabaseUrl = None,
    data_dir: DataDir = Path("./var"),
    error_rate: ErrorRate = 0.0,
    hang_rate: HangRate = 0.0,
    lost_response_rate: LostRate = 0.0,
    latency_p50_ms: P50 = 0.0,
    latency_p99_ms: P99 = 0.0,
    outage_for_s: OutageFor = None,
    seed: Seed = None,
) -> None:
    """Serve the simulated carrier (create and cancel shipments)."""
    faults = _faults(
        error_rate, hang_rate, lost_response_rate, latency_p50_ms, latency_p99_ms, outage_for_s, seed
    )
    settings = ProviderSettings(
        host=host, carrier_port=port, data_dir=data_dir, carrier_database_url=database_url
    )
    configure_logging()
    application = create_carrier_app(settings.carrier_url(), faults=faults)
    _console.print(f"[bold]Simulated carrier[/bold] on http://{host}:{port}  (faults: /admin/faults)")
    _run(application, "carrier", host=host, port=port, settings=settings)


@app.command()
def mail(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (GET /messages, /admin/faults)")] = 8102,
    smtp_port: Annotated[int, typer.Option(help="SMTP port")] = 2525,
    database_url: DatabaseUrl = None,
    data_dir: DataDir = Path("./var"),
    error_rate: ErrorRate = 0.0,
    hang_rate: HangRate = 0.0,
    lost_response_rate: LostRate = 0.0,
    latency_p50_ms: P50 = 0.0,
    latency_p99_ms: P99 = 0.0,
    outage_for_s: OutageFor = None,
    seed: Seed = None,
) -> None:
    """Serve the mail provider: SMTP in (dedup on Message-ID), received mail over HTTP (GET /messages)."""
    faults = _faults(
        error_rate, hang_rate, lost_response_rate, latency_p50_ms, latency_p99_ms, outage_for_s, seed
    )
    settings = ProviderSettings(
        host=host, mail_port=port, mail_smtp_port=smtp_port, data_dir=data_dir, mail_database_url=database_url
    )
    configure_logging()
    application = create_mail_app(settings.mail_url(), smtp_host=host, smtp_port=smtp_port, faults=faults)
    _console.print(
        f"[bold]Mail provider[/bold]: SMTP on {host}:{smtp_port}, mail on http://{host}:{port}/messages"
        "  (faults: /admin/faults)"
    )
    _run(application, "mail", host=host, port=port, settings=settings)
