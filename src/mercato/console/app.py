"""The API application with the console installed: the factory `mercato api` and `mercato up` serve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI

from mercato.config import Settings
from mercato.console.routes import build_router
from mercato.gateway.app import create_app as create_gateway_app
from mercato.lab.cli import catalogue

__all__ = ["create_app", "install_console"]


def install_console(app: FastAPI, *, results_root: Path | None = None) -> None:
    """Mount `/console` on a gateway app (its container, token codec and metrics on `app.state`)."""
    app.include_router(build_router(lab_catalogue=catalogue, results_root=results_root))


def create_app(
    settings: Settings | None = None, *, lab_results: Path | None = None, **kwargs: Any
) -> FastAPI:
    """The gateway's app (`kwargs` go to it) with `/console`; `lab_results`: where the Lab page reads
    the run folders (default ./lab-results)."""
    app = create_gateway_app(settings, **kwargs)
    install_console(app, results_root=lab_results)
    return app
