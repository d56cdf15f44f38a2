"""The checkout bench's two requests never leave the event loop for FastAPI's thread pool.

A plain `def` dependency is run by FastAPI in a worker thread (`run_in_threadpool`): a thread
hand-off and a wake-up per request for what is an attribute read. The cart's and checkout's
service dependencies are coroutines, so neither request takes that hop.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from fastapi.dependencies import utils as fastapi_dependencies

from mercato.bootstrap import Container
from tests.integration.shop_support import api, customer, product


async def test_put_cart_line_and_checkout_run_no_dependency_in_the_thread_pool(
    container: Container, monkeypatch: pytest.MonkeyPatch
) -> None:
    await product(container, "HOTPATH-1", 990)
    _, auth = await customer(container)
    offloaded: list[str] = []
    original = fastapi_dependencies.run_in_threadpool

    async def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        offloaded.append(getattr(func, "__qualname__", repr(func)))
        return await original(func, *args, **kwargs)

    monkeypatch.setattr(fastapi_dependencies, "run_in_threadpool", counting)
    async with api(container) as client:
        put = await client.put("/v1/carts/me/items/HOTPATH-1", json={"quantity": 1}, headers=auth)
        assert put.status_code == 200, put.text
        placed = await client.post(
            "/v1/checkout", json={}, headers={**auth, "Idempotency-Key": uuid.uuid4().hex}
        )
        assert placed.status_code == 202, placed.text
    assert offloaded == []
