"""The shop's app with or without the edge's own answers (`FastReads`, `FastWrites`), for tests that
check the edge answers exactly as the routes do."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from mercato.bootstrap import Container
from mercato.gateway.app import create_app
from mercato.gateway.edge import Edge
from mercato.gateway.fast_reads import FastReads
from mercato.gateway.fast_writes import FastWrites
from tests.conftest import make_settings


def edge_of(app: FastAPI) -> Edge:
    if app.middleware_stack is None:
        app.middleware_stack = app.build_middleware_stack()
    layer: Any = app.middleware_stack
    while not isinstance(layer, Edge):
        layer = layer.app
    return layer


def shop_app(container: Container, *, fast: bool = True) -> FastAPI:
    """`fast=False`: the edge's own answers removed, so every request reaches the routes."""
    app = create_app(
        make_settings(container.settings.database.url), container=container, configure_logs=False
    )
    if not fast:
        edge = edge_of(app)
        edge.inner = tuple(step for step in edge.inner if not isinstance(step, FastReads | FastWrites))
    return app


@asynccontextmanager
async def client_for(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as client:
        yield client
