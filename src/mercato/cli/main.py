"""`mercato` CLI: run, migrate and seed the shop (typer + rich)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer
import uvicorn
from prometheus_client import CollectorRegistry
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mercato.bench.cli import app as bench_app
from mercato.bootstrap import SCRIPT_LOCATION, build_container
from mercato.cli.api_keys import app as api_keys_app
from mercato.cli.backfill import app as backfill_app
from mercato.cli.backup import app as backup_app
from mercato.cli.backup import restore_command
from mercato.cli.capacity import app as capacity_app
from mercato.cli.cluster import app as cluster_app
from mercato.cli.dlq import app as dlq_app
from mercato.cli.keys import app as keys_app
from mercato.cli.observability import app as observability_app
from mercato.cli.projections import app as projections_app
from mercato.cli.release import app as release_app
from mercato.cli.runtime_config import register as register_runtime_config
from mercato.cli.schemas import app as schemas_app
from mercato.cli.shards import app as shards_app
from mercato.cli.shards import prepare_shards
from mercato.config import Settings, UnsafeConfiguration, get_settings
from mercato.demo.seed import SeedReport, seed_demo
from mercato.kit.errors import DomainError
from mercato.kit.observability import (
    configure_logging,
    instrument_engine,
    register_process_collectors,
    start_process_tracing,
)
from mercato.kit.realtime.transport import MercatoWebSocketProtocol
from mercato.kit.runtime import tune_gc_for_service
from mercato.kit.storage.migrations import upgrade
from mercato.kit.storage.statements import trace_driver_statements
from mercato.kit.web.http_protocol import MercatoHttpProtocol
from mercato.lab.cli import app as lab_app
from mercato.lab.scale import scale_command
from mercato.providers.cli import app as provider_app
from mercato.providers.server import serve_providers
from mercato.shop.identity.contracts import Role
from mercato.shop.identity.model import EmailTaken, User
from mercato.workers import run_jobs, shop_jobs
from mercato.workers.coordination import build_election, election_kind
from mercato.workers.runner import JobMetrics
from mercato.workers.sagas import build_saga_runner

app = typer.Typer(
    help="Mercato: an e-commerce backend.", no_args_is_help=True, pretty_exceptions_enable=False
)
config_app = typer.Typer(
    help="Inspect the start-up settings; manage the versioned runtime configuration.", no_args_is_help=True
)
register_runtime_config(config_app)
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
# `bench scale` drives the cluster harness, which the bench layer may not import: registered here.
bench_app.command("scale")(scale_command)
users_app = typer.Typer(help="Manage user accounts.", no_args_is_help=True)
app.add_typer(users_app, name="users")
app.add_typer(dlq_app, name="dlq")
app.add_typer(lab_app, name="lab")
app.add_typer(provider_app, name="provider")
app.add_typer(schemas_app, name="schemas")
app.add_typer(projections_app, name="projections")
app.add_typer(api_keys_app, name="api-keys")
app.add_typer(cluster_app, name="cluster")
app.add_typer(shards_app, name="shards")
app.add_typer(capacity_app, name="capacity")
app.add_typer(backfill_app, name="backfill")
app.add_typer(backup_app, name="backup")
app.add_typer(release_app, name="release")
app.command("restore")(restore_command)
app.add_typer(keys_app, name="keys")
app.add_typer(observability_app, name="observability")
console = Console(stderr=True)


def _settings() -> Settings:
    settings = get_settings()
    try:
        settings.check_safe_to_start()
    except UnsafeConfiguration as exc:
        console.print(f"[red]refusing to start:[/red] {exc}")
        raise typer.Exit(2) from exc
    if settings.database.is_sqlite:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return settings


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _migrate(settings: Settings, revision: str = "heads") -> None:
    try:
        with console.status("Applying migrations"):
            upgrade(SCRIPT_LOCATION, settings.database.url, revision)
            prepare_shards(settings)
    except RuntimeError as exc:
        if "contract refused" not in str(exc):
            raise
        # A contract step that would break a running release (ADR 0047): nothing was changed.
        console.print(f"[red]refused:[/red] {exc}")
        raise typer.Exit(3) from exc
    console.print(f"[green]✓[/green] migrations at {'head' if revision == 'heads' else revision}")


async def _seed(settings: Settings) -> SeedReport:
    container = build_container(settings)
    try:
        with _progress() as progress:
            return await seed_demo(container, progress=progress)
    finally:
        await container.close()


def _print_seed(report: SeedReport) -> None:
    if report.already_seeded:
        console.print("[green]✓[/green] demo data already present (delete ./var to start over)")
    else:
        console.print(f"[green]✓[/green] seeded {report.products} products")
    if report.credentials:
        table = Table(title="Demo accounts")
        for column in ("role", "email", "password"):
            table.add_column(column)
        for row in report.credentials:
            table.add_row(*row)
        console.print(table)


@app.command()
def migrate(
    revision: Annotated[
        str, typer.Option(help="Stop at this revision (an expand step before its contract); default: head")
    ] = "heads",
) -> None:
    """Apply database migrations up to the latest revision (or `--revision`)."""
    _migrate(_settings(), revision)


@app.command()
def seed() -> None:
    """Load demo data (products, stock, demo accounts) once."""
    settings = _settings()
    _print_seed(asyncio.run(_seed(settings)))


@app.command()
def api(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes")] = None,
    ssl_certfile: Annotated[
        Path | None,
        typer.Option(
            exists=True, dir_okay=False, readable=True, help="Serve HTTPS: the PEM certificate (chain)"
        ),
    ] = None,
    ssl_keyfile: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, readable=True, help="Serve HTTPS: the PEM private key"),
    ] = None,
    http2: Annotated[
        bool,
        typer.Option(
            "--http2",
            help="Serve HTTP/2 and HTTP/1.1 (by ALPN) with hypercorn; needs --ssl-certfile/--ssl-keyfile",
        ),
    ] = False,
    h2c: Annotated[
        bool,
        typer.Option(
            "--h2c",
            help="With --http2: cleartext HTTP/2 without TLS, for behind a TLS-terminating proxy only",
        ),
    ] = False,
) -> None:
    """Serve the HTTP API (expects migrations applied); HTTPS with --ssl-certfile and --ssl-keyfile,
    HTTP/2 as well with --http2."""
    settings = _settings()
    if (ssl_certfile is None) != (ssl_keyfile is None):
        console.print("[red]error:[/red] --ssl-certfile and --ssl-keyfile go together")
        raise typer.Exit(2)
    if h2c and not http2:
        console.print("[red]error:[/red] --h2c goes with --http2")
        raise typer.Exit(2)
    bind_host = host or settings.http.host
    bind_port = port if port is not None else settings.http.port
    bind_workers = workers or settings.http.workers
    if http2:
        # Imported here: hypercorn is an optional extra, and `mercato` must start without it.
        from rich.markup import escape

        from mercato.cli.serve_http2 import Http2Options, Http2Unavailable, Http2UsageError, serve_http2

        try:
            options = Http2Options(
                host=bind_host,
                port=bind_port,
                workers=bind_workers,
                certfile=ssl_certfile,
                keyfile=ssl_keyfile,
                h2c=h2c,
            )
            exit_code = serve_http2(options)
        except (Http2UsageError, Http2Unavailable) as exc:
            # escape: the message names the `mercato[http2]` extra, which rich would take for markup.
            console.print(f"[red]error:[/red] {escape(str(exc))}")
            raise typer.Exit(2) from exc
        raise typer.Exit(exit_code)
    tune_gc_for_service()
    uvicorn.run(
        "mercato.console.app:create_app",
        factory=True,
        host=bind_host,
        port=bind_port,
        workers=bind_workers,
        **_server_options(settings),
        # uvicorn kills a worker that misses a 5 s health ping; on a loaded box a worker still
        # importing misses it and is respawned forever (seen with --workers 2 at load 15 on 2 cores).
        timeout_worker_healthcheck=30,
        ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
        ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
    )


def _server_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's options for the shop's HTTP server, the same for `mercato api` and `mercato up`."""
    return {
        "access_log": False,
        "log_config": None,
        # The app itself decides whom to believe (MERCATO_NETWORK_TRUSTED_PROXIES, ADR 0019);
        # uvicorn's default would trust X-Forwarded-For from 127.0.0.1.
        "proxy_headers": False,
        # WebSocket keepalive (docs/realtime.md): protocol pings; a silent peer is closed.
        "ws_ping_interval": settings.realtime.ws_ping_interval_s,
        "ws_ping_timeout": settings.realtime.ws_ping_timeout_s,
        "ws_max_size": settings.realtime.max_frame_bytes * 4,
        "ws_per_message_deflate": settings.realtime.ws_compression,
        # uvicorn's websockets protocol + the fan-out write below ASGI (kit/realtime/transport.py).
        "ws": MercatoWebSocketProtocol,
        # uvicorn's httptools protocol, a response's head and body in one write (kit/web/http_protocol.py).
        "http": MercatoHttpProtocol,
        # No `server: uvicorn` on every answer: it tells a scanner what to try and no client uses it.
        "server_header": False,
    }


def _run_service(main: Coroutine[Any, Any, None]) -> None:
    """Run a long-lived service on uvloop, as uvicorn already does for `mercato api`.

    On this kind of VM a database or HTTP round trip costs the client ~165 µs of CPU on asyncio's
    own loop and ~80 µs on uvloop (measured with asyncpg), and the worker is all round trips.
    """
    tune_gc_for_service()
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        asyncio.run(main)
        return
    uvloop.run(main)


@app.command()
def up(
    host: Annotated[str | None, typer.Option(help="Bind address")] = None,
    port: Annotated[int | None, typer.Option(help="Port")] = None,
) -> None:
    """Migrate, seed demo data and serve everything in one process (embedded mode)."""
    settings = _settings()
    _migrate(settings)
    report = asyncio.run(_seed(settings))
    _print_seed(report)
    settings.seed.required = True
    bind_host = host or settings.http.host
    bind_port = port if port is not None else settings.http.port
    console.print(f"[bold]Mercato[/bold] on http://{bind_host}:{bind_port}  (docs: /docs)")
    _run_service(_serve_embedded(settings, bind_host, bind_port))


async def _serve_embedded(settings: Settings, host: str, port: int) -> None:
    """The API, the simulated providers, the saga runner and every periodic job in one event
    loop, sharing one container: the embedded mode's "everything in one process"."""
    from mercato.console.app import create_app

    app = create_app(settings, trace_role="up")
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **_server_options(settings)))
    container = app.state.container
    providers = await serve_providers(settings.providers) if settings.providers.enabled else None
    if providers is not None:
        console.print(
            f"  payment provider on {settings.providers.psp_base_url}, "
            f"carrier on {settings.providers.carrier_base_url}, "
            f"mail on {settings.providers.mail_base_url}/messages "
            f"(SMTP {settings.providers.host}:{settings.providers.mail_smtp_port})"
        )
    stop = asyncio.Event()
    runner = build_saga_runner(container)
    registry = app.state.metrics.registry
    background = [
        asyncio.create_task(
            run_jobs(
                shop_jobs(container),
                stop,
                metrics=JobMetrics(registry),
                election=build_election(container, registry),
                signals=container.db.signals,
            )
        ),
        asyncio.create_task(runner.run(stop)),
    ]
    try:
        await server.serve()
    finally:
        stop.set()
        await asyncio.gather(*background, return_exceptions=True)
        if providers is not None:
            await providers.stop()


@app.command()
def worker(
    http_port: Annotated[
        int | None,
        typer.Option(
            "--http-port",
            "--metrics-port",
            help="Port for /healthz, /readyz and /metrics (0 = off; default MERCATO_WORKER_HTTP_PORT)",
        ),
    ] = None,
) -> None:
    """Run the background jobs (sagas, relay, projections, notifier, ...) without the API (distributed
    mode), with its own probes and metrics on MERCATO_WORKER_HTTP_PORT (8081)."""
    settings = _settings()
    _run_service(_run_worker(settings, settings.worker.http_port if http_port is None else http_port))


async def _run_worker(settings: Settings, http_port: int) -> None:
    from mercato.workers.http import serve_worker_http, worker_http_app

    # As the API does (gateway/app.py). Unconfigured, structlog renders every event on its
    # development console renderer, and an exception with rich's highlighted traceback: at load,
    # where lease and election errors are logged, that rendering took over half of the worker's
    # samples (docs/benchmarks.md, "Session 10: h-cow").
    configure_logging(level=settings.telemetry.log_level, fmt=settings.telemetry.log_format)
    registry = CollectorRegistry()
    register_process_collectors(registry)
    container = build_container(settings)
    # Breakers, retries and bulkheads in front of the providers live in the worker too.
    registry.register(container.metrics_registry)
    telemetry = settings.telemetry
    tracer_provider = start_process_tracing(
        service_name=telemetry.service_name,
        role="worker",
        exporter=telemetry.trace_exporter,
        sample_ratio=telemetry.trace_sample_ratio,
        otlp_endpoint=telemetry.otlp_endpoint,
    )
    if tracer_provider is not None:
        instrument_engine(container.db.engine, tracer_provider.get_tracer("mercato"), only_in_trace=True)
        trace_driver_statements(tracer_provider.get_tracer("mercato"), only_in_trace=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    http = None
    runtime = container.runtime
    if http_port:
        app = worker_http_app(
            health=container.health,
            registry=registry,
            stopping=stop.is_set,
            detail=None if runtime is None else runtime.detail,
        )
        try:
            http = await serve_worker_http(app, host=settings.http.host, port=http_port)
        except RuntimeError as exc:
            await container.close()
            console.print(f"[red]error:[/red] {exc} (set MERCATO_WORKER_HTTP_PORT, 0 to turn it off)")
            raise SystemExit(1) from exc
    jobs = shop_jobs(container)
    election = build_election(container, registry)
    probes = f"; probes and metrics on http://{settings.http.host}:{http_port}" if http_port else ""
    console.print("[bold]Mercato worker[/bold] running: sagas, " + ", ".join(j.name for j in jobs) + probes)
    runtime_task = None
    if runtime is not None:
        # The runtime configuration (ADR 0045): applied and reported like the API's.
        runtime.identity = dataclasses.replace(runtime.identity, role="worker")
        with contextlib.suppress(Exception):
            await runtime.poll_once()
        runtime_task = asyncio.create_task(runtime.run())
    console.print(
        f"  singleton jobs run on the leader of {election.name!r} ({election_kind(container)} election)"
    )
    try:
        await asyncio.gather(
            run_jobs(
                jobs, stop, metrics=JobMetrics(registry), election=election, signals=container.db.signals
            ),
            build_saga_runner(container).run(stop),
        )
    finally:
        if runtime_task is not None:
            runtime_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runtime_task
        if container.breaker_reports is not None:
            with contextlib.suppress(Exception):
                await container.breaker_reports.withdraw()
        if http is not None:
            await http.stop()
        await container.close()
        if tracer_provider is not None:
            tracer_provider.shutdown()  # exports what the batch still holds


async def _create_user(settings: Settings, email: str, password: str, role: Role) -> User:
    container = build_container(settings)
    try:
        return await container.identity.create_user(email, password, role=role)
    finally:
        await container.close()


@users_app.command("create-admin")
def users_create_admin(
    email: Annotated[str, typer.Option(help="The admin's e-mail address (login name)")],
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            help="Prompted for (hidden) when not given; avoid passing it on a shared machine",
        ),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print the account as JSON")] = False,
) -> None:
    """Create an account with the admin role (expects migrations applied)."""
    settings = _settings()
    try:
        user = asyncio.run(_create_user(settings, email, password, Role.ADMIN))
    except EmailTaken as exc:
        console.print(f"[red]error:[/red] an account with e-mail {email.strip().lower()} already exists")
        raise typer.Exit(1) from exc
    except DomainError as exc:
        console.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(2) from exc
    if as_json:
        typer.echo(json.dumps({"id": str(user.id), "email": user.email, "role": user.role.value}))
    else:
        console.print(f"[green]✓[/green] admin {user.email} created (id {user.id})")


@config_app.command("show")
def config_show() -> None:
    """Print the effective configuration with secrets masked."""
    typer.echo(json.dumps(get_settings().masked(), indent=2))


if __name__ == "__main__":
    app()
