"""Real WebSocket clients against `mercato api --workers 2` on PostgreSQL, with Redis and with NATS as
the broker: cross-process delivery, per-room order under 20 concurrent senders, a process SIGKILLed
mid-conversation, and a client that never reads."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from mercato.bench.accounts import issue_tokens
from mercato.bootstrap import SCRIPT_LOCATION
from mercato.kit.storage.migrations import upgrade
from tests.conftest import TEST_SECRET, _pg_admin, _pg_host_part
from tests.e2e.conftest import start_mercato

# ~2 minutes per broker and dependent on the kernel spreading accepts over uvicorn's workers: kept
# out of the default suite (`pytest -m slow tests/e2e/test_realtime_distributed.py`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@dataclass(frozen=True)
class Cluster:
    base_url: str
    ws_url: str
    backend: str
    database_url: str


_TOKENS: dict[tuple[str, str], str] = {}


def token(cluster: Cluster, user: str, *, staff: bool = False) -> str:
    """A token for `user`, whose account is made on first use (the bearer guard needs it to exist),
    signed with the cluster's own keys."""
    if (cluster.database_url, user) not in _TOKENS:
        role = "admin" if staff else "customer"
        # issue_tokens runs its own event loop: from inside a scenario's loop, in a thread of its own.
        with ThreadPoolExecutor(1) as pool:
            [_TOKENS[cluster.database_url, user]] = pool.submit(
                issue_tokens, cluster.database_url, TEST_SECRET, [(user, role)]
            ).result()
    return _TOKENS[cluster.database_url, user]


REDIS_URL = os.environ.get("MERCATO_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def skip_unless_slow(request: pytest.FixtureRequest, why: str) -> None:
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip(f"{why}: run it with -m slow")


@pytest.fixture(scope="module", params=["redis", "nats"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    backend = str(request.param)
    skip_unless_slow(request, "real processes on PostgreSQL and a broker take minutes")
    # On a shared server: the run's own names and Redis database (MERCATO_TEST_PG_PREFIX,
    # MERCATO_TEST_REDIS_URL), as the integration suites take them.
    own = os.environ.get("MERCATO_TEST_PG_PREFIX", "h5")
    name = f"{own}_realtime_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://{_pg_host_part()}/{name}"
    upgrade(SCRIPT_LOCATION, url)
    prefix = f"{own}rt{uuid.uuid4().hex[:8]}"
    env = {
        "MERCATO_DATABASE_URL": url,
        "MERCATO_AUTH_SECRET": TEST_SECRET,
        "MERCATO_MESSAGING_BACKEND": backend,
        "MERCATO_MESSAGING_BROKER_PREFIX": prefix,
        "MERCATO_MESSAGING_REDIS_URL": REDIS_URL,
        "MERCATO_BACKPRESSURE_ENABLED": "false",
        # Small caps and a short deadline, so the slow-consumer test overflows them quickly.
        "MERCATO_REALTIME_QUEUE_MAX_MESSAGES": "200",
        "MERCATO_REALTIME_QUEUE_MAX_BYTES": "262144",
        "MERCATO_REALTIME_SLOW_CONSUMER_S": "3",
        "MERCATO_REALTIME_SEND_RATE_PER_S": "5000",
        "MERCATO_REALTIME_SEND_BURST": "5000",
        "MERCATO_REALTIME_ROOM_RATE_PER_S": "50000",
        "MERCATO_REALTIME_PRESENCE_INTERVAL_S": "1",
        "MERCATO_REALTIME_PRESENCE_TTL_S": "3",
    }
    workdir = tmp_path_factory.mktemp(f"rt-{backend}")
    proc, base_url, _ = start_mercato(workdir, ["api", "--host", "127.0.0.1", "--workers", "2"], env)
    try:
        yield Cluster(base_url, base_url.replace("http://", "ws://") + "/v1/ws", backend, url)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        asyncio.run(_cleanup(backend, prefix))
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _cleanup(backend: str, prefix: str) -> None:
    if backend == "redis":
        from redis.asyncio import Redis

        client = Redis.from_url(REDIS_URL)
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    else:
        import nats

        nc = await nats.connect("nats://127.0.0.1:4222")
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith((prefix, f"KV_{prefix}")):
                await js.delete_stream(info.config.name)
        await nc.close()


def make_room(cluster: Cluster, members: list[str]) -> str:
    staff = {"Authorization": f"Bearer {token(cluster, str(uuid.uuid4()), staff=True)}"}
    created = httpx.post(
        f"{cluster.base_url}/v1/chat/rooms", json={"name": "t", "members": members}, headers=staff, timeout=10
    )
    assert created.status_code == 201, created.text
    return str(created.json()["id"])


async def open_ws(cluster: Cluster, user: str, **kwargs: Any) -> tuple[ClientConnection, str]:
    """A connection and the server node (process) that holds it."""
    ws = await connect(
        cluster.ws_url, additional_headers={"Authorization": f"Bearer {token(cluster, user)}"}, **kwargs
    )
    ready = orjson.loads(await asyncio.wait_for(ws.recv(), 10))
    assert ready["type"] == "ready"
    return ws, str(ready["connection"]).split("/")[0]


async def subscribe(ws: ClientConnection, room: str, since: int | None = None) -> None:
    frame: dict[str, Any] = {"type": "subscribe", "channel": f"room:{room}"}
    if since is not None:
        frame["since"] = since
    await ws.send(orjson.dumps(frame).decode())
    while orjson.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "subscribed":
        pass


async def spread(cluster: Cluster, users: list[str]) -> list[tuple[ClientConnection, str]]:
    """Connections for `users` on both processes. The kernel hands each accept to one uvicorn worker;
    connections opened concurrently, in rounds, land on both (the second worker may still be booting)."""
    deadline = time.monotonic() + 90
    while True:
        conns = list(await asyncio.gather(*(open_ws(cluster, u) for u in users)))
        if len({node for _, node in conns}) > 1:
            return conns
        for ws, _ in conns:
            await ws.close()
        assert time.monotonic() < deadline, "both API processes should hold connections"
        await asyncio.sleep(0.5)


async def collect_messages(
    ws: ClientConnection, count: int, *, timeout_s: float = 60
) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []

    async def read() -> None:
        while len(got) < count:
            frame = orjson.loads(await ws.recv())
            if frame["type"] == "message":
                got.append(frame)

    await asyncio.wait_for(read(), timeout_s)
    return got


def node_pid(node: str) -> int:
    return int(node.split(":")[1])


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_cross_process_delivery_in_room_order_under_20_concurrent_senders(cluster: Cluster) -> None:
    senders = [str(uuid.uuid4()) for _ in range(20)]
    readers = [str(uuid.uuid4()) for _ in range(4)]
    room = make_room(cluster, senders + readers)
    per_sender = 10

    async def scenario() -> None:
        reader_conns = await spread(cluster, readers)
        sender_conns = [await open_ws(cluster, s) for s in senders]
        for ws, _ in reader_conns:
            await subscribe(ws, room)

        async def send_all(index: int, ws: ClientConnection) -> list[int]:
            acks: list[int] = []
            for k in range(per_sender):
                body = {"type": "send", "room": room, "text": f"{index}:{k}", "client_msg_id": f"{index}-{k}"}
                await ws.send(orjson.dumps(body).decode())
            while len(acks) < per_sender:
                frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
                if frame["type"] == "ack":
                    acks.append(frame["seq"])
            return acks

        acked = await asyncio.gather(*(send_all(i, ws) for i, (ws, _) in enumerate(sender_conns)))
        total = len(senders) * per_sender
        assert sorted(seq for acks in acked for seq in acks) == list(range(1, total + 1))
        for ws, _node in reader_conns:
            got = await collect_messages(ws, total)
            # Every connection, on either process: each seq exactly once, in order, no gap.
            assert [m["seq"] for m in got] == list(range(1, total + 1))
            for index in range(len(senders)):
                mine = [m["text"] for m in got if m["text"].startswith(f"{index}:")]
                assert mine == [f"{index}:{k}" for k in range(per_sender)]
        for ws, _ in reader_conns + sender_conns:
            await ws.close()

    run(scenario())


def test_a_killed_process_loses_no_message(cluster: Cluster) -> None:
    users = [str(uuid.uuid4()) for _ in range(6)]
    room = make_room(cluster, users)

    async def scenario() -> None:
        conns = await spread(cluster, users)
        victim_ws, victim_node = conns[0]
        sender_ws = next(ws for ws, node in conns if node != victim_node)
        for ws, _ in conns:
            await subscribe(ws, room)

        async def send(n: int) -> None:
            body = {"type": "send", "room": room, "text": f"m{n}", "client_msg_id": f"k-{n}"}
            await sender_ws.send(orjson.dumps(body).decode())

        for n in range(5):
            await send(n)
        seen = [m["seq"] for m in await collect_messages(victim_ws, 5)]
        assert seen == [1, 2, 3, 4, 5]
        os.kill(node_pid(victim_node), signal.SIGKILL)
        for n in range(5, 15):
            await send(n)
        # The client reconnects (to whichever process answers) and resumes from its last seq.
        deadline = time.monotonic() + 30
        while True:
            try:
                again, _ = await open_ws(cluster, users[0])
                break
            except (OSError, ConnectionClosed, TimeoutError):
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
        await subscribe(again, room, since=seen[-1])
        rest = [m["seq"] for m in await collect_messages(again, 10)]
        assert rest == list(range(6, 16))
        await again.close()

    run(scenario())


def test_presence_is_shared_across_processes_and_forgets_a_killed_one(cluster: Cluster) -> None:
    users = [str(uuid.uuid4()) for _ in range(6)]
    room = make_room(cluster, users)

    async def online_becomes(ws: ClientConnection, expected: set[str], timeout_s: float) -> None:
        async def wait() -> None:
            while True:
                frame = orjson.loads(await ws.recv())
                if frame["type"] == "presence" and set(frame["online"]) == expected:
                    return

        await asyncio.wait_for(wait(), timeout_s)

    async def scenario() -> None:
        conns = await spread(cluster, users)
        by_node: dict[str, list[tuple[ClientConnection, str]]] = {}
        for (ws, node), user in zip(conns, users, strict=True):
            by_node.setdefault(node, []).append((ws, user))
        (victim_node, _victims), (_, survivors) = list(by_node.items())[:2]
        for ws, _ in conns:
            await subscribe(ws, room)
        watcher = survivors[0][0]
        await online_becomes(watcher, set(users), timeout_s=10)
        os.kill(node_pid(victim_node), signal.SIGKILL)
        # Nobody says goodbye for the killed process: its announcement expires (TTL 3 s here).
        started = time.monotonic()
        await online_becomes(watcher, {user for _, user in survivors}, timeout_s=15)
        print(
            f"\n[{cluster.backend}] presence forgot the killed process in {time.monotonic() - started:.1f} s"
        )
        for ws, _ in survivors:
            await ws.close()

    run(scenario())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_client_that_never_reads_is_cut_off_without_hurting_others(
    cluster: Cluster, request: pytest.FixtureRequest
) -> None:
    skip_unless_slow(request, "20 MB through a stuck client takes ~2 minutes")
    users = [str(uuid.uuid4()) for _ in range(3)]
    room = make_room(cluster, users)
    # ~20 MB: more than loopback's socket buffers (~10 MB with autotuning) plus the queue's hard cap.
    count, text = 5000, "x" * 3900

    async def scenario() -> None:
        # max_queue=1: the client library stops reading the socket too, so TCP pushes back on the server.
        stuck, stuck_node = await open_ws(cluster, users[0], max_queue=1)
        healthy, _ = await open_ws(cluster, users[1])
        sender, _ = await open_ws(cluster, users[2])
        for ws in (stuck, healthy):
            await subscribe(ws, room)
        rss_before = _rss_kib(node_pid(stuck_node))

        acked = asyncio.Condition()
        acks = 0

        async def flood() -> None:
            # At most 100 sends in flight, as a real client windows its sends on acks.
            for n in range(count):
                async with acked:
                    await acked.wait_for(lambda n=n: n - acks < 100)  # type: ignore[misc]
                body = {"type": "send", "room": room, "text": text, "client_msg_id": f"f-{n}"}
                await sender.send(orjson.dumps(body).decode())

        async def drain_acks() -> None:
            nonlocal acks
            while acks < count:
                if orjson.loads(await asyncio.wait_for(sender.recv(), 60))["type"] == "ack":
                    async with acked:
                        acks += 1
                        acked.notify_all()

        async def healthy_reader() -> list[float]:
            lags: list[float] = []
            got = 0
            while got < count:
                frame = orjson.loads(await asyncio.wait_for(healthy.recv(), 60))
                if frame["type"] == "message":
                    got += 1
                    assert frame["seq"] == got
                    lags.append(time.time() - _epoch(frame["sent_at"]))
            return lags

        flooding = asyncio.gather(flood(), drain_acks())
        lags = await healthy_reader()
        await flooding
        rss_after = _rss_kib(node_pid(stuck_node))
        lags.sort()
        p99 = lags[int(len(lags) * 0.99) - 1]
        print(f"\n[{cluster.backend}] healthy p99 lag {p99 * 1000:.0f} ms; ", end="")
        print(f"stuck client's process RSS {rss_before} -> {rss_after} KiB")
        # The stuck client now reads what the network held, then finds the 1013 close: nothing was
        # skipped before it, and resuming from its last seq gets the rest.
        seqs, code = await read_until_closed(stuck)
        # 1013 when the close frame got through; a pipe still full of frames when the server's close
        # timeout ran out ends without one (1006): either way the client resumes from its last seq.
        assert code in (1013, None)
        assert seqs == list(range(1, len(seqs) + 1))
        assert len(seqs) < count
        back, _ = await open_ws(cluster, users[0])
        await subscribe(back, room, since=seqs[-1] if seqs else 0)
        rest = [m["seq"] for m in await collect_messages(back, count - len(seqs))]
        assert rest == list(range(len(seqs) + 1, count + 1))
        # Bounded: the server kept at most 2 x the byte cap (512 KiB) for the stuck client, plus noise.
        assert rss_after - rss_before < 64 * 1024
        assert p99 < 5.0
        for ws in (back, healthy, sender):
            await ws.close()

    run(scenario())


async def read_until_closed(ws: ClientConnection) -> tuple[list[int], int | None]:
    """The message seqs a client reads until the server closes it, and the close code (None: no frame)."""
    seqs: list[int] = []
    try:
        while True:
            frame = orjson.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame["type"] == "message":
                seqs.append(frame["seq"])
    except ConnectionClosed as closed:
        return seqs, closed.rcvd.code if closed.rcvd is not None else None


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
