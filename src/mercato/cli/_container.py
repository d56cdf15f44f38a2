"""One short-lived Container for a CLI command: built from the settings, closed after, domain errors
printed as one line with exit status 1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import typer
from rich.console import Console

from mercato.bootstrap import Container, build_container
from mercato.config import get_settings
from mercato.kit.errors import DomainError

__all__ = ["run_on_container"]

T = TypeVar("T")
_err = Console(stderr=True)


def run_on_container(action: Callable[[Container], Awaitable[T]]) -> T:
    async def main() -> T:
        container = build_container(get_settings())
        try:
            return await action(container)
        finally:
            await container.close()

    try:
        return asyncio.run(main())
    except DomainError as exc:
        _err.print(f"[red]error:[/red] {exc.detail}")
        raise typer.Exit(1) from exc
