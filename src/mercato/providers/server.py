"""Run the simulators under uvicorn: standalone (the CLI) or inside an existing event loop (`mercato up`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator
from dataclasses import dataclass, field

import uvicorn

from mercato.kit.clock import Clock
from mercato.kit.web.http_protocol import MercatoHttpProtocol
from mercato.providers._edge import ProviderApp
from mercato.providers.carrier.app import create_carrier_app
from mercato.providers.config import ProviderSettings
from mercato.providers.mail.app import create_mail_app
from mercato.providers.psp.app import create_psp_app

__all__ = ["RunningProviders", "provider_server", "serve_providers"]


class _EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process.

    Several uvicorn servers in one process would each install SIGINT/SIGTERM handlers and only the last
    would see the signal; the host (the shop's server) owns shutdown and stops these via `should_exit`.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def provider_server(
    app: ProviderApp, *, host: str, port: int, graceful_shutdown_s: int, embedded: bool = False
) -> uvicorn.Server:
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_config=None,
        proxy_headers=False,
        lifespan="on",
        # Hung requests never finish on their own; without this bound, shutdown would wait for them.
        timeout_graceful_shutdown=graceful_shutdown_s,
        # A response's head and body in one write, as the API's (ADR 0067; the simulators' answers are
        # small and frequent: ADR 0071). A lost-response fault still aborts the socket underneath.
        http=MercatoHttpProtocol,
        server_header=False,
    )
    return _EmbeddedServer(config) if embedded else uvicorn.Server(config)


async def _serve(server: uvicorn.Server) -> None:
    try:
        await server.serve()
    except SystemExit as exc:
        # uvicorn exits the process when it cannot bind; inside a host process that must not happen.
        raise RuntimeError(f"provider server on port {server.config.port} could not start") from exc


@dataclass
class RunningProviders:
    """The simulators serving in the current loop; `stop()` shuts them down and waits."""

    psp: uvicorn.Server
    carrier: uvicorn.Server
    mail: uvicorn.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def servers(self) -> tuple[uvicorn.Server, ...]:
        return (self.psp, self.carrier) if self.mail is None else (self.psp, self.carrier, self.mail)

    async def stop(self) -> None:
        for server in self.servers:
            server.should_exit = True
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def serve_providers(
    settings: ProviderSettings, *, clock: Clock | None = None, startup_timeout_s: float = 30.0
) -> RunningProviders:
    """Start the PSP, the carrier and the mail provider as tasks in the running loop and return once
    all accept requests (the mail provider's SMTP listener opens with its HTTP app).

    Raises `RuntimeError` when one fails to start (port taken, database unreachable); the other is
    stopped first so nothing is left behind.
    """
    psp_app = create_psp_app(
        settings.psp_url(), faults=settings.psp_faults, decline_rate=settings.decline_rate, clock=clock
    )
    carrier_app = create_carrier_app(settings.carrier_url(), faults=settings.carrier_faults, clock=clock)
    mail_app = create_mail_app(
        settings.mail_url(),
        smtp_host=settings.host,
        smtp_port=settings.mail_smtp_port,
        faults=settings.mail_faults,
        clock=clock,
    )
    running = RunningProviders(
        psp=provider_server(
            psp_app,
            host=settings.host,
            port=settings.psp_port,
            graceful_shutdown_s=settings.graceful_shutdown_s,
            embedded=True,
        ),
        carrier=provider_server(
            carrier_app,
            host=settings.host,
            port=settings.carrier_port,
            graceful_shutdown_s=settings.graceful_shutdown_s,
            embedded=True,
        ),
        mail=provider_server(
            mail_app,
            host=settings.host,
            port=settings.mail_port,
            graceful_shutdown_s=settings.graceful_shutdown_s,
            embedded=True,
        ),
    )
    running.tasks = [asyncio.create_task(_serve(server)) for server in running.servers]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + startup_timeout_s
    while not all(server.started for server in running.servers):
        # uvicorn reports a failed bind or startup by returning from serve() (or exiting) early.
        if any(task.done() for task in running.tasks) or loop.time() > deadline:
            await running.stop()
            raise RuntimeError("the simulated providers failed to start (see the log for the cause)")
        await asyncio.sleep(0.02)
    return running
