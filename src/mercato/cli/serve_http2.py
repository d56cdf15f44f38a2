"""`mercato api --http2`: the gateway served by hypercorn, which speaks HTTP/2 (uvicorn does not).

Over TLS hypercorn offers `h2` and `http/1.1` by ALPN, so HTTP/2 clients multiplex their requests over one
connection while HTTP/1.1-only clients keep working on the same port. Browsers speak HTTP/2 only over TLS;
cleartext HTTP/2 (h2c: prior knowledge or `Upgrade: h2c`) is for a TLS-terminating proxy in front.

hypercorn is an optional dependency (the `http2` extra): it is imported only when this server starts.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from hypercorn.config import Config
    from hypercorn.typing import ASGIFramework

__all__ = [
    "Http2Options",
    "Http2Unavailable",
    "Http2UsageError",
    "http2_available",
    "hypercorn_config",
    "serve_http2",
]

# hypercorn evaluates the part after the colon, so the call builds one app per worker process.
APP_FACTORY_CALL = "mercato.console.app:create_app()"
# uvicorn (the HTTP/1.1 path) lets in-flight requests finish however long they take; hypercorn's default of
# 3 s would cut a slow checkout short. 30 s is what Kubernetes grants a stopping pod before SIGKILL.
GRACEFUL_TIMEOUT_S = 30.0


class Http2Unavailable(RuntimeError):
    """hypercorn (the `http2` extra) is not installed."""


class Http2UsageError(ValueError):
    """Options that do not make a sound HTTP/2 server (the CLI's exit code 2)."""


def http2_available() -> bool:
    return all(importlib.util.find_spec(name) is not None for name in ("hypercorn", "h2"))


@dataclass(frozen=True, kw_only=True)
class Http2Options:
    host: str
    port: int
    workers: int
    certfile: Path | None = None
    keyfile: Path | None = None
    h2c: bool = False

    def __post_init__(self) -> None:
        if (self.certfile is None) != (self.keyfile is None):
            raise Http2UsageError("--ssl-certfile and --ssl-keyfile go together")
        if self.workers < 1:
            raise Http2UsageError("--workers must be at least 1")
        if self.h2c and self.tls:
            raise Http2UsageError("--h2c is cleartext HTTP/2: leave out --ssl-certfile/--ssl-keyfile")
        if not self.h2c and not self.tls:
            # Browsers speak HTTP/2 only over TLS, so cleartext must be asked for by name.
            raise Http2UsageError(
                "--http2 needs --ssl-certfile and --ssl-keyfile (browsers speak HTTP/2 only over TLS; "
                "--h2c serves cleartext HTTP/2 behind a TLS-terminating proxy)"
            )

    @property
    def tls(self) -> bool:
        return self.certfile is not None


def hypercorn_config(options: Http2Options) -> Config:
    """The hypercorn settings that match what `mercato api` gives uvicorn."""
    if not http2_available():
        raise Http2Unavailable("--http2 needs hypercorn: pip install 'mercato[http2]'")
    from hypercorn.config import Config

    config = Config()
    host = f"[{options.host}]" if ":" in options.host else options.host
    # With a certificate `bind` is the TLS listener (ALPN h2, http/1.1); without one it is cleartext, where
    # hypercorn still answers HTTP/2 prior knowledge and `Upgrade: h2c` (h2c).
    config.bind = [f"{host}:{options.port}"]
    if options.certfile is not None and options.keyfile is not None:
        config.certfile = str(options.certfile)
        config.keyfile = str(options.keyfile)
    config.workers = options.workers
    config.application_path = APP_FACTORY_CALL
    # The gateway writes its own structured access log (MERCATO_HTTP_ACCESS_LOG); a second one from the
    # server would log every request twice.
    config.accesslog = None
    # A Logger (not "-") makes hypercorn leave its handlers alone: its few lines go through the JSON logging
    # the app configures, like uvicorn's with log_config=None.
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = GRACEFUL_TIMEOUT_S
    # uvicorn's listen backlog, not hypercorn's 100: a burst of new connections waits in the kernel
    # instead of being refused (guide §28: "tune backlog").
    config.backlog = 2048
    # No ProxyFixMiddleware: the app decides whom to believe for client addresses (ADR 0019).
    return config


async def _serve_in_this_process(config: Config) -> None:
    from hypercorn.asyncio import serve

    from mercato.console.app import create_app

    # serve() installs SIGINT/SIGTERM handlers that start a graceful shutdown: stop accepting, let in-flight
    # requests finish within graceful_timeout (an HTTP/2 connection gets GOAWAY as its last stream ends),
    # then run the app's lifespan shutdown (the container closes its pools).
    # cast: Starlette and hypercorn each type ASGI with their own (structurally equal) message types.
    app = cast("ASGIFramework", create_app())
    await serve(app, config, mode="asgi")


def serve_http2(options: Http2Options) -> int:
    """Serve until SIGINT/SIGTERM; the exit code for the process (0 after a graceful shutdown)."""
    config = hypercorn_config(options)
    if options.workers == 1:
        asyncio.run(_serve_in_this_process(config))
        return 0
    from hypercorn.run import run

    # Several workers: hypercorn binds the socket here, spawns the processes, each loads the app from
    # application_path, and forwards SIGINT/SIGTERM to them as a graceful shutdown.
    return run(config)
