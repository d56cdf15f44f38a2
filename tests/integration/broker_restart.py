"""What the brokers' kill-mid-stream tests share (`test_stream_contract_redis.py`, `_nats.py`): a
server of our own on a free port, restartable on its own files, and the test's two halves: publish
until the server is killed, then find every confirmed message after the restart."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import Callable
from types import TracebackType

import pytest

from mercato.kit.messaging import Stream
from mercato.kit.ports import free_port

from .test_stream_contract import TOPIC, drain, make_message


class PrivateServer:
    """A server of our own on a free loopback port: `start()` (again after a kill) runs `argv(port)`;
    leaving the `with` kills whatever it started that still runs. The shared servers are never touched."""

    def __init__(self, argv: Callable[[int], list[str]]) -> None:
        self.port = free_port()
        self._argv = argv
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self._argv(self.port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._started.append(proc)
        return proc

    def __enter__(self) -> PrivateServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        for proc in self._started:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def publish_until_killed(
    stream: Stream, server: subprocess.Popen[bytes], *, publisher_timeout_s: float | None = None
) -> list[uuid.UUID]:
    """Publish batches of 10 over 13 keys; once 300 are confirmed, SIGKILL SERVER while the publisher
    is still writing. Returns the ids of every message whose publish returned (the broker confirmed
    it); the publisher must fail (within PUBLISHER_TIMEOUT_S when given)."""
    confirmed: list[uuid.UUID] = []
    enough = asyncio.Event()

    async def publish_forever() -> None:
        n = 0
        while True:
            batch = [make_message(f"order-{(n + i) % 13}", n + i) for i in range(10)]
            await stream.publish(batch)
            confirmed.extend(m.id for m in batch)  # only once the broker confirmed them all
            if len(confirmed) >= 300:
                enough.set()
            n += 10

    publisher = asyncio.create_task(publish_forever())
    await asyncio.wait_for(enough.wait(), timeout=20)
    server.send_signal(signal.SIGKILL)  # mid-stream: the publisher is still writing
    server.wait()
    with pytest.raises(Exception):  # noqa: B017 - whatever the client raises on a dead server
        await asyncio.wait_for(publisher, timeout=publisher_timeout_s)
    return confirmed


async def assert_every_confirmed_message_delivered_in_key_order(
    stream: Stream, confirmed: list[uuid.UUID]
) -> None:
    """After the restart: a new group reads every confirmed message, each once, in order per key."""
    delivered = await drain(stream, "after-restart", max_messages=200)
    got = {d.message.id for d in delivered}
    assert set(confirmed) <= got, f"{len(set(confirmed) - got)} confirmed messages lost"
    assert len(got) == len(delivered)
    # Per-key order survived the crash too.
    for key in {d.message.key for d in delivered}:
        ns = [d.message.data["n"] for d in delivered if d.message.key == key]
        assert ns == sorted(ns)
    assert await stream.lag(TOPIC, "after-restart") == 0
