"""kit/web/bodies.py: a body read ahead of the app is handed to it once, whole; a client that left
mid-body is reported as such, and its disconnect still reaches the app after the replay."""

from __future__ import annotations

from typing import Any

import pytest

from mercato.kit.web.bodies import read_body, replaying


def _receiver(messages: list[dict[str, Any]]) -> Any:
    async def receive() -> dict[str, Any]:
        return messages.pop(0)

    return receive


@pytest.mark.asyncio
async def test_a_chunked_body_is_read_whole() -> None:
    receive = _receiver(
        [
            {"type": "http.request", "body": b"ab", "more_body": True},
            {"type": "http.request", "body": b"cd", "more_body": False},
        ]
    )
    assert await read_body(receive) == (b"abcd", True)


@pytest.mark.asyncio
async def test_a_client_that_left_mid_body_is_reported() -> None:
    receive = _receiver(
        [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]
    )
    assert await read_body(receive) == (b"ab", False)


@pytest.mark.asyncio
async def test_the_replay_gives_the_body_once_then_the_real_stream() -> None:
    replay = replaying(b"abcd", _receiver([{"type": "http.disconnect"}]))
    assert await replay() == {"type": "http.request", "body": b"abcd", "more_body": False}
    assert await replay() == {"type": "http.disconnect"}


@pytest.mark.asyncio
async def test_a_body_cut_short_is_replayed_unfinished_then_the_disconnect() -> None:
    # The edge's checkout writes hand the router what arrived before the client left: the route
    # must see an unfinished body followed by the disconnect, not a complete request.
    replay = replaying(b"ab", _receiver([{"type": "http.disconnect"}]), more_body=True)
    assert await replay() == {"type": "http.request", "body": b"ab", "more_body": True}
    assert await replay() == {"type": "http.disconnect"}
