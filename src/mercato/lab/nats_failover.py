"""One of three NATS nodes SIGKILLed under publish/consume load: no acknowledged message lost.

Hypothesis (guide §15, §38): a JetStream stream replicated on three nodes (R3) keeps every message
the publisher got a PubAck for when any one node dies; the stream elects a new leader and the
consumers continue after a pause of about one Raft election. The run publishes `messages` events at
a steady pace through the kit's `JetStreamStream` (replicas=3) while a consumer group reads and acks
them; a third of the way in it SIGKILLs the node leading the stream, restarts it a few seconds
later, and finally checks that every acknowledged id was consumed. "Pause" is the longest gap
between two consumed messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mercato.cluster.nats import start_nats_node, stream_leaders
from mercato.cluster.processes import read_pid
from mercato.cluster.topology import Topology
from mercato.kit.messaging import Message
from mercato.kit.messaging.nats_jetstream import JetStreamStream

TOPIC = "labfailover"


@dataclass
class NatsFailoverResult:
    published: int = 0
    acked: int = 0
    consumed: int = 0
    lost: int = 0
    killed: str = ""
    pause_s: float = 0.0
    publish_errors: int = 0
    out_of_time: bool = False
    timeline: list[tuple[float, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.acked > 0 and not self.out_of_time


async def run_nats_failover(
    topology: Topology,
    *,
    messages: int = 1500,
    rate_per_s: float = 300.0,
    down_s: float = 3.0,
    deadline_s: float = 120.0,
) -> NatsFailoverResult:
    """Every step is bounded and the whole run ends by `deadline_s` (then `out_of_time`): a drill
    that hangs tells nothing, one that reports what it acked and read by then does."""
    result = NatsFailoverResult()
    prefix = f"lab{uuid.uuid4().hex[:6]}"
    publisher = JetStreamStream(servers=topology.nats_urls, prefix=prefix, replicas=3, partitions=1)
    consumer = JetStreamStream(servers=topology.nats_urls, prefix=prefix, replicas=3, partitions=1)
    acked: set[str] = set()
    consumed: set[str] = set()
    consumed_at: list[float] = []
    started = time.monotonic()
    end = started + deadline_s
    done_publishing = asyncio.Event()

    async def publish() -> None:
        for n in range(messages):
            message = Message(
                id=uuid.uuid4(),
                source="mercato/lab",
                type="mercato.lab.failover",
                subject=str(n),
                time=datetime.now(UTC),
                data={"n": n},
                topic=TOPIC,
                key="k",
            )
            result.published += 1
            # Retried with the same id (deduplicated by the stream) for as long as an election can
            # take on a loaded machine: a publisher that gives up early is not a lost message.
            give_up = min(time.monotonic() + 30.0, end)
            while time.monotonic() < give_up:
                try:
                    await asyncio.wait_for(publisher.publish([message]), timeout=10.0)
                    acked.add(str(message.id))
                    break
                except Exception:  # noqa: BLE001 - the node died under us: retry on another
                    result.publish_errors += 1
                    await asyncio.sleep(0.1)
            if time.monotonic() >= end:
                result.out_of_time = True
                break
            await asyncio.sleep(1 / rate_per_s)
        done_publishing.set()

    async def consume() -> None:
        deadline = None
        while True:
            if time.monotonic() >= end:
                result.out_of_time = True
                return
            try:
                batch = await asyncio.wait_for(
                    consumer.read(TOPIC, "lab", "c1", max_messages=100, block_s=0.5), timeout=10.0
                )
            except Exception:  # noqa: BLE001 - leader election in progress: read again
                await asyncio.sleep(0.1)
                continue
            for delivery in batch:
                consumed.add(str(delivery.message.id))
                consumed_at.append(time.monotonic() - started)
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(consumer.ack(delivery), timeout=5.0)
            if done_publishing.is_set():
                deadline = deadline or time.monotonic() + 30.0
                if acked <= consumed or time.monotonic() > deadline:
                    return

    async def kill() -> None:
        await asyncio.sleep(messages / rate_per_s / 3)
        leader = None
        for _ in range(3):  # under load the API request may time out: ask again, else kill nats0
            try:
                leaders = await stream_leaders([n.url for n in topology.nats], timeout_s=5.0)
            except Exception:  # noqa: BLE001, S112 - a timed-out request: ask again
                continue
            leader = next((s["leader"] for s in leaders if s["stream"].startswith(prefix)), None)
            break
        node = next((n for n in topology.nats if n.name == leader), topology.nats[0])
        pid = read_pid(topology.dir("nats"), node.name)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        result.killed = node.name
        result.timeline.append((time.monotonic() - started, f"SIGKILL {node.name} (stream leader)"))
        await asyncio.sleep(down_s)
        await asyncio.to_thread(start_nats_node, topology, node)
        result.timeline.append((time.monotonic() - started, f"restarted {node.name}"))

    try:
        await asyncio.gather(publish(), consume(), kill())
    finally:
        await publisher.aclose()
        await consumer.aclose()
    result.acked = len(acked)
    result.consumed = len(consumed & acked)
    result.lost = len(acked - consumed)
    gaps = [b - a for a, b in itertools.pairwise(consumed_at)]
    result.pause_s = max(gaps, default=0.0)
    return result
