"""The shop's app with or without the edge's own answers (`FastReads`, `FastWrites`), for tests that
check the edge answers exactly as the routes do."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute

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


def record_route_calls(
    monkeypatch: pytest.MonkeyPatch, routes: Iterable[tuple[APIRouter, str]]
) -> list[tuple[object, str]]:
    """Records (app, path) each time one of these routes itself runs (its `handle`, after routing
    matched it). The route objects are the routers', shared by every app: restored after the test."""
    calls: list[tuple[object, str]] = []
    for router, path in routes:
        route = next(r for r in router.routes if isinstance(r, APIRoute) and r.path == path)
        original = route.handle

        async def handle(scope: Any, receive: Any, send: Any, original: Any = original) -> None:
            calls.append((scope.get("app"), scope["path"]))
            await original(scope, receive, send)

        monkeypatch.setattr(route, "handle", handle)
    return calls


def routed_paths(calls: list[tuple[object, str]], app: FastAPI) -> list[str]:
    """The paths the routes ran for `app` (not for another app sharing the routers)."""
    return [path for called, path in calls if called is app]


def stable_headers(response: httpx.Response, per_request: set[str]) -> list[tuple[str, str]]:
    """The response's headers without those that differ between two answers by construction."""
    return [(k, v) for k, v in response.headers.multi_items() if k not in per_request]
