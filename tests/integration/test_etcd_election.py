"""Leader election on a real 3-member etcd (ADR 0041): one leader, growing tokens, a killed member
costs nothing while a majority runs, and `mercato worker` processes elect one leader among them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cluster.etcd import start_etcd, start_etcd_member, stop_etcd, stop_etcd_member
from mercato.cluster.processes import wait_until
from mercato.cluster.topology import Topology
from mercato.kit.coordination.etcd import EtcdElection, parse_endpoints
from mercato.kit.ports import free_port
from mercato.kit.storage.migrations import upgrade


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    topology = Topology.plan(tmp_path_factory.mktemp("hel_etcd"), members=3)
    start_etcd(topology)
    try:
        yield topology
    finally:
        stop_etcd(topology)


@pytest.fixture
async def elections(etcd: Topology, request: pytest.FixtureRequest) -> AsyncIterator[list[EtcdElection]]:
    endpoints = parse_endpoints(etcd.etcd_endpoints)
    name = f"hel-{request.node.name}"[:100]
    # Each candidate starts on a different member, as separate hosts would.
    built = [
        EtcdElection(endpoints[i:] + endpoints[:i], name, f"w{i}", ttl_s=2, request_timeout_s=1)
        for i in range(3)
    ]
    yield built
    for e in built:
        await e.resign()


def test_endpoints_parse() -> None:
    assert parse_endpoints("http://a:1, b:2") == [("a", 1), ("b", 2)]
    with pytest.raises(ValueError):
        parse_endpoints("nohost")


async def test_one_leader_and_a_larger_token_for_each_new_term(elections: list[EtcdElection]) -> None:
    for e in elections:
        await e.step()
    leaders = [e for e in elections if e.term is not None]
    assert len(leaders) == 1
    first = leaders[0].term
    assert first is not None
    assert first.token is not None
    assert await elections[1].leader() == (first.holder, first.token)
    await leaders[0].resign()
    for e in elections:
        if e is not leaders[0]:
            await e.step()
    second = [e.term for e in elections if e.term is not None]
    assert len(second) == 1
    assert second[0] is not None
    assert second[0].token is not None
    assert second[0].token > first.token
    assert second[0].holder != first.holder


async def test_a_leader_that_stops_renewing_is_replaced_after_its_ttl(elections: list[EtcdElection]) -> None:
    a, b, _ = elections
    await a.step()
    await b.step()
    assert a.term is not None
    assert b.term is None
    old = a.term.token
    granted = a.granted_ttl_s
    assert granted is not None
    assert granted >= 2
    await asyncio.sleep(2.2)  # a "pauses": no refresh for longer than its 2 s term...
    assert a.term is None  # ...so it steps down by itself before any pass
    deadline = time.monotonic() + granted + 3
    while b.term is None and time.monotonic() < deadline:  # ...and etcd expires its lease
        await b.step()
        await asyncio.sleep(0.3)
    assert b.term is not None
    assert b.term.token is not None
    assert old is not None
    assert b.term.token > old


async def test_a_killed_member_does_not_stop_the_election(
    etcd: Topology, elections: list[EtcdElection]
) -> None:
    a, b, _ = elections
    await a.step()
    await b.step()
    assert a.term is not None
    member = next(m for m in etcd.etcd if m.client_port == a.endpoint[1])
    stop_etcd_member(etcd, member)
    try:
        # The leader's next refreshes move to another member and keep the term.
        kept = a.term
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            await a.step()
            if a.term == kept and a.endpoint[1] != member.client_port:
                break
            await asyncio.sleep(0.2)
        assert a.term == kept
        # And a new term can still be elected on the two remaining members.
        await a.resign()
        deadline = time.monotonic() + 10
        while b.term is None and time.monotonic() < deadline:
            await b.step()
            await asyncio.sleep(0.2)
        assert b.term is not None
        assert b.term.token is not None
        assert kept is not None
        assert kept.token is not None
        assert b.term.token > kept.token
    finally:
        start_etcd_member(etcd, member)


def _leader_gauge(port: int) -> float | None:
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=1).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("mercato_coordination_is_leader{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_worker_processes_elect_one_leader_and_hand_over_on_exit(etcd: Topology, tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path}/hel_worker.db"
    upgrade(SCRIPT_LOCATION, url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
    env.update(
        {
            "MERCATO_DATABASE_URL": url,
            "MERCATO_COORDINATION_ETCD_ENDPOINTS": etcd.etcd_endpoints,
            "MERCATO_COORDINATION_LEASE_TTL_S": "2",
            "MERCATO_COORDINATION_ELECTION_NAME": f"hel-workers-{os.getpid()}",
        }
    )
    ports = [free_port(), free_port()]
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mercato.cli.main", "worker", "--metrics-port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in ports
    ]
    try:
        assert wait_until(
            lambda: (
                sorted(_leader_gauge(p) or 0.0 for p in ports) == [0.0, 1.0]
                and all(_leader_gauge(p) is not None for p in ports)
            ),
            timeout_s=40,
        )
        leader = next(i for i, p in enumerate(ports) if _leader_gauge(p) == 1.0)
        follower = 1 - leader
        procs[leader].send_signal(signal.SIGTERM)
        assert procs[leader].wait(timeout=15) == 0
        # The leader resigned (revoked its lease): the follower takes over within a campaign period.
        assert wait_until(lambda: _leader_gauge(ports[follower]) == 1.0, timeout_s=10)
        text = httpx.get(f"http://127.0.0.1:{ports[follower]}/metrics", timeout=2).text
        assert 'mercato_coordination_leadership_changes_total{change="elected"' in text
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
