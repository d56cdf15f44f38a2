"""gateway/shedding.py's edge step: each (method, path) is classified once and remembered (bounded),
every request still takes and gives back its class's slot, and a live stream takes none."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from mercato.config import BackpressureSettings
from mercato.gateway.edge import Exchange
from mercato.gateway.shedding import Shedding, build_limiter, classify
from mercato.kit.backpressure import ConcurrencyLimiter, Priority


class _Counting:
    """`classify`, counting how often it is asked about each (method, path)."""

    def __init__(self) -> None:
        self.asked: dict[tuple[str, str], int] = {}

    def __call__(self, method: str, path: str) -> Priority:
        self.asked[(method, path)] = self.asked.get((method, path), 0) + 1
        return classify(method, path)


async def _no_body() -> dict[str, object]:
    return {"type": "http.request", "body": b"", "more_body": False}


def _exchange(method: str, path: str) -> Exchange:
    return Exchange({"type": "http", "method": method, "path": path, "headers": []}, _no_body, "rid")


@pytest.fixture
def limiter() -> Iterator[ConcurrencyLimiter]:
    limiter = build_limiter(BackpressureSettings())
    yield limiter
    assert limiter.inflight == 0, "a slot leaked"


async def _through(step: Shedding, method: str, path: str) -> Exchange:
    """One request through the step, its slot held until the edge runs the cleanups (here, at once)."""
    ex = _exchange(method, path)
    assert await step(ex) is None
    for cleanup in reversed(ex.cleanups):
        cleanup()
    return ex


async def test_a_pair_is_classified_once_and_every_request_takes_and_returns_its_slot(
    limiter: ConcurrencyLimiter,
) -> None:
    classifier = _Counting()
    step = Shedding(limiter=limiter, classifier=classifier)
    for _ in range(3):
        held = _exchange("GET", "/v1/products/p-1")
        assert await step(held) is None
        assert limiter.inflight == 1
        assert len(held.cleanups) == 1
        held.cleanups[0]()
        assert limiter.inflight == 0
    await _through(step, "POST", "/v1/checkout")
    await _through(step, "POST", "/v1/checkout")
    assert classifier.asked == {("GET", "/v1/products/p-1"): 1, ("POST", "/v1/checkout"): 1}


async def test_a_live_stream_takes_no_slot_however_often_it_comes(limiter: ConcurrencyLimiter) -> None:
    classifier = _Counting()
    step = Shedding(limiter=limiter, classifier=classifier)
    for _ in range(3):
        ex = await _through(step, "GET", "/v1/orders/o-1/events")
        assert ex.cleanups == []
    assert classifier.asked == {}


async def test_the_memory_is_bounded_and_long_paths_are_not_kept(limiter: ConcurrencyLimiter) -> None:
    classifier = _Counting()
    step = Shedding(limiter=limiter, classifier=classifier)
    long_path = "/v1/products/" + "x" * 300
    await _through(step, "GET", long_path)
    await _through(step, "GET", long_path)
    assert classifier.asked[("GET", long_path)] == 2
    # Enough distinct paths to fill the memory: it is emptied, so the first is classified again.
    for number in range(5000):
        await _through(step, "GET", f"/v1/products/p-{number}")
    await _through(step, "GET", "/v1/products/p-0")
    assert classifier.asked[("GET", "/v1/products/p-0")] == 2
    assert classifier.asked[("GET", "/v1/products/p-4999")] == 1
