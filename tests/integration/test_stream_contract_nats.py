"""`JetStreamStream` against the real NATS JetStream on this machine: the shared contract, then a
private `nats-server` killed with SIGKILL mid-stream and restarted on its own store directory.

Every contract test uses a fresh name prefix and deletes its streams afterwards: the server on 4222
is shared. The restart test never touches it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client as NatsClient

from mercato.kit.clock import ManualClock
from mercato.kit.messaging import JetStreamStream, Stream

from .broker_restart import (
    PrivateServer,
    assert_every_confirmed_message_delivered_in_key_order,
    publish_until_killed,
)
from .test_stream_contract import TOPIC, StreamContract, make_message

NATS_URL = os.environ.get("MERCATO_TEST_NATS_URL", "nats://127.0.0.1:4222")
NATS_SERVER = os.environ.get("MERCATO_TEST_NATS_SERVER", "/usr/sbin/nats-server")


@pytest.fixture
async def nats_client() -> AsyncIterator[NatsClient]:
    client = await nats.connect(NATS_URL)
    try:
        yield client
    finally:
        await client.drain()


class TestJetStreamStream(StreamContract):
    # Visibility timeouts of the contract (5-10 s) become an AckWait of 0.5-1 s on the server.
    broker_time_scale = 0.1

    @pytest.fixture
    async def make_stream(
        self, nats_client: NatsClient, clock: ManualClock
    ) -> AsyncIterator[Callable[..., Stream]]:
        built: list[JetStreamStream] = []

        def build(
            *, partitions: int = 4, visibility_timeout_s: float = 30.0, max_attempts: int = 3
        ) -> Stream:
            stream = JetStreamStream(
                client=nats_client,
                prefix=f"t{uuid.uuid4().hex[:16]}",
                partitions=partitions,
                visibility_timeout_s=visibility_timeout_s * (self.broker_time_scale or 1.0),
                max_attempts=max_attempts,
                poll_interval_s=0.01,
                clock=clock,
            )
            built.append(stream)
            return stream

        yield build
        for stream in built:
            await stream.delete_all([TOPIC])


async def test_ack_many_sends_a_pass_s_acks_together(nats_client: NatsClient, clock: ManualClock) -> None:
    """Each JetStream ack is a request answered by the server; awaited one after the other, a pass
    of N deliveries waited N round trips before its next read (ADR 0065). `ack_many` has them all
    in flight at once, and the group has nothing left afterwards."""
    stream = JetStreamStream(
        client=nats_client,
        prefix=f"t{uuid.uuid4().hex[:16]}",
        partitions=3,
        poll_interval_s=0.01,
        clock=clock,
    )
    try:
        await stream.publish([make_message(f"k{n % 6}", n) for n in range(9)])
        batch = await stream.read(TOPIC, "g", "c1", max_messages=100, block_s=0)
        assert len(batch) == 9
        respond = stream._respond
        in_flight = peak = 0

        async def counted(receipt: str, payload: bytes) -> None:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                await respond(receipt, payload)
            finally:
                in_flight -= 1

        stream._respond = counted  # type: ignore[method-assign]
        await stream.ack_many(batch)
        assert peak == len(batch)
        assert await stream.lag(TOPIC, "g") == 0
    finally:
        await stream.delete_all([TOPIC])


async def test_a_publish_whose_puback_never_comes_fails_after_the_request_timeout(
    nats_client: NatsClient, clock: ManualClock
) -> None:
    """nats-py's PubAck futures have no deadline: a message lost with the node that took it (a stream
    leader SIGKILLed mid-publish) left `publish` waiting for good. Here the stream is gone and a plain
    subscriber swallows its subject (so the server sends no "no responders" either): the publish
    must give up after `request_timeout_s` and raise, for the caller to retry under the same ids."""
    stream = JetStreamStream(
        client=nats_client,
        prefix=f"t{uuid.uuid4().hex[:16]}",
        partitions=1,
        request_timeout_s=0.5,
        clock=clock,
    )
    await stream.publish([make_message("k", 0)])  # the topic's stream exists and is known
    await nats_client.jetstream().delete_stream(stream._stream_name(TOPIC))
    swallower = await nats_client.subscribe(f"{stream.prefix}.>")
    try:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(stream.publish([make_message("k", 1)]), timeout=10)
        assert asyncio.get_running_loop().time() - started < 5
    finally:
        await swallower.unsubscribe()


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateServer]:
    """A nats-server of our own with JetStream on a free port and a temporary store directory.
    JetStream answers a publish only after the message is written to the stream's file (its own
    fsync policy syncs every 2 minutes by default: a SIGKILL of the process loses nothing written, a
    power cut could lose the unsynced tail)."""
    with PrivateServer(
        lambda port: [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(tmp_path)]
    ) as server:
        yield server


async def _connect(port: int) -> NatsClient:
    for _ in range(200):
        try:
            return await nats.connect(
                f"nats://127.0.0.1:{port}",
                connect_timeout=0.5,
                allow_reconnect=False,
                max_reconnect_attempts=0,
            )
        except Exception:  # the server is still starting
            await asyncio.sleep(0.02)
    raise RuntimeError("private nats-server did not start")


async def test_no_confirmed_message_is_lost_when_nats_is_killed_mid_stream(
    private_nats: PrivateServer, clock: ManualClock
) -> None:
    server = private_nats.start()
    client = await _connect(private_nats.port)
    stream = JetStreamStream(client=client, prefix="restart", partitions=4, request_timeout_s=1, clock=clock)
    confirmed = await publish_until_killed(stream, server, publisher_timeout_s=10)
    await client.close()

    private_nats.start()
    client = await _connect(private_nats.port)
    stream = JetStreamStream(client=client, prefix="restart", partitions=4, request_timeout_s=1, clock=clock)
    await assert_every_confirmed_message_delivered_in_key_order(stream, confirmed)
    await client.close()
