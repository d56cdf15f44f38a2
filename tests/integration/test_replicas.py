"""Reads routed to a replica, read-your-writes by commit LSN, and lag taking a replica out of
rotation, on a real Patroni cluster (one primary, two streaming replicas).

One replica replays WAL with an artificial delay (`recovery_min_apply_delay`, set through Patroni,
which owns the standby's recovery settings): a read sent there without a token sees the previous
value, a read with the write's token never does (it waits up to the bound, then the primary serves
it)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest
from sqlalchemy import text

from mercato.bootstrap import SCRIPT_LOCATION, Container, build_container
from mercato.cluster import Topology, cluster_status
from mercato.cluster.patroni import primary_node, set_apply_delay
from mercato.cluster.topology import PostgresNode
from mercato.kit.storage import Database, Staleness, consistency_scope, create_database
from mercato.kit.storage.migrations import upgrade
from tests.conftest import make_settings
from tests.integration.shop_support import api, customer, product

from .ha_support import running_cluster

pytestmark = pytest.mark.timeout(240)

DELAY_MS = 150
STALE_OK = Staleness(max_lag_s=60.0)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Topology]:
    with running_cluster() as topology:
        yield topology


async def _admin(dsn: str, *sql: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in sql:
            await conn.execute(statement)
    finally:
        await conn.close()


def _replica_nodes(topology: Topology) -> list[PostgresNode]:
    primary = primary_node(topology)
    assert primary is not None
    return [n for n in topology.postgres if n != primary]


def _url(topology: Topology, node: PostgresNode) -> str:
    return topology.node_url(node, driver="postgresql")


@pytest.fixture
async def delayed(cluster: Topology) -> AsyncIterator[tuple[Database, str]]:
    """A Database over the cluster whose only replica applies WAL `DELAY_MS` late."""
    node = _replica_nodes(cluster)[0]
    replica = _url(cluster, node)
    await _admin(
        cluster.database_url(driver="postgresql"),
        "CREATE TABLE IF NOT EXISTS h6_ryw (id int PRIMARY KEY, v int NOT NULL)",
        "INSERT INTO h6_ryw VALUES (1, 0) ON CONFLICT (id) DO UPDATE SET v = 0",
    )
    await asyncio.to_thread(set_apply_delay, cluster, node, DELAY_MS)
    db = create_database(
        cluster.database_url(),
        replica_urls=[replica.replace("postgresql://", "postgresql+asyncpg://")],
        replica_max_lag_s=60.0,
        replica_token_wait_s=0.02,
    )
    assert db.replicas is not None
    await db.replicas.refresh(db.engine)
    try:
        yield db, replica
    finally:
        await db.dispose()
        await asyncio.to_thread(set_apply_delay, cluster, node, None)


async def _write_then_read(db: Database, i: int, *, with_token: bool) -> tuple[int, str]:
    with consistency_scope() as writer:
        async with db.write() as conn:
            await conn.execute(text("UPDATE h6_ryw SET v = :v WHERE id = 1"), {"v": i})
    assert writer.written is not None  # the commit LSN the response would carry
    with consistency_scope(after=writer.written if with_token else None):
        async with db.read(staleness=STALE_OK) as conn:
            value = (await conn.execute(text("SELECT v FROM h6_ryw WHERE id = 1"))).scalar_one()
            server = (await conn.execute(text("SELECT pg_is_in_recovery()"))).scalar_one()
    return int(value), "replica" if server else "primary"


async def test_read_your_writes_with_token_never_stale_without_token_stale(
    delayed: tuple[Database, str],
) -> None:
    db, _ = delayed
    stale_with_token = 0
    routed: dict[str, int] = {"replica": 0, "primary": 0}
    for i in range(1, 1001):
        value, server = await _write_then_read(db, i, with_token=True)
        stale_with_token += value != i
        routed[server] += 1
    stale_without = 0
    for i in range(1001, 1101):
        value, _ = await _write_then_read(db, i, with_token=False)
        stale_without += value != i
    assert stale_with_token == 0
    assert stale_without > 0, "the delayed replica never served a stale read: routing is not reaching it"
    assert routed["primary"] > 0  # the token, not replaying in time, sent reads to the primary


async def test_a_token_the_replica_replayed_is_served_by_the_replica(delayed: tuple[Database, str]) -> None:
    db, _ = delayed
    with consistency_scope() as writer:
        async with db.write() as conn:
            await conn.execute(text("UPDATE h6_ryw SET v = 7 WHERE id = 1"))
    await asyncio.sleep(DELAY_MS / 1000 * 3)
    with consistency_scope(after=writer.written):
        async with db.read(staleness=STALE_OK) as conn:
            assert (await conn.execute(text("SELECT v, pg_is_in_recovery() FROM h6_ryw"))).one() == (7, True)


async def test_a_replica_beyond_the_lag_bound_leaves_rotation(cluster: Topology) -> None:
    node = _replica_nodes(cluster)[1]
    replica = _url(cluster, node)
    await asyncio.to_thread(set_apply_delay, cluster, node, 5000)
    db = create_database(
        cluster.database_url(),
        replica_urls=[replica.replace("postgresql://", "postgresql+asyncpg://")],
        replica_max_lag_s=0.5,
    )
    assert db.replicas is not None
    try:
        await _admin(cluster.database_url(driver="postgresql"), "CREATE TABLE IF NOT EXISTS h6_lag (x int)")
        for _ in range(10):
            await _admin(cluster.database_url(driver="postgresql"), "INSERT INTO h6_lag VALUES (1)")
            await asyncio.sleep(0.2)
        await db.replicas.refresh(db.engine)
        [detail] = db.replicas.detail()
        assert detail["in_rotation"] is False, detail
        assert "beyond the bound" in str(detail["reason"])
        async with db.read(staleness=Staleness(max_lag_s=60.0)) as conn:  # falls back to the primary
            assert (await conn.execute(text("SELECT pg_is_in_recovery()"))).scalar_one() is False
    finally:
        await db.dispose()
        await asyncio.to_thread(set_apply_delay, cluster, node, None)


def test_status_reports_roles_timeline_and_lag(cluster: Topology) -> None:
    # A replica's lag is unknown until it has replayed something since it (re)started streaming:
    # run first (`-k`), right after the cluster came up, the first status may not have it yet.
    state = cluster_status(cluster)
    for _ in range(40):
        if all(n.lag_bytes is not None and n.lag_s is not None for n in state.nodes):
            break
        time.sleep(0.25)
        state = cluster_status(cluster)
    roles = sorted(n.role for n in state.nodes)
    assert roles == ["leader", "replica", "replica"]
    assert all(n.timeline == 1 for n in state.nodes)
    assert all(n.lag_bytes is not None and n.lag_s is not None for n in state.nodes)
    assert state.etcd_up == 3


@pytest.fixture
async def shop_on_cluster(cluster: Topology) -> AsyncIterator[tuple[Container, PostgresNode]]:
    """The shop's container on the cluster's primary, with one replica replaying `DELAY_MS` late."""
    await _admin(
        cluster.database_url(driver="postgresql"),
        "DROP DATABASE IF EXISTS h6_shop",
        "CREATE DATABASE h6_shop",
    )
    await asyncio.to_thread(upgrade, SCRIPT_LOCATION, cluster.database_url(database="h6_shop"))
    node = _replica_nodes(cluster)[0]
    await asyncio.to_thread(set_apply_delay, cluster, node, DELAY_MS)
    settings = make_settings(cluster.database_url(database="h6_shop"))
    settings.database.replica_urls = [cluster.node_url(node, database="h6_shop")]
    settings.database.replica_token_wait_s = 0.02
    container = build_container(settings)
    try:
        yield container, node
    finally:
        await container.close()
        await asyncio.to_thread(set_apply_delay, cluster, node, None)


async def test_the_api_hands_out_the_token_and_order_history_honours_it(
    shop_on_cluster: tuple[Container, PostgresNode],
) -> None:
    """Through the running app: a write's response carries the commit LSN (header and cookie); the
    customer's order history with it shows the order placed just before, without it the delayed
    replica serves a history that lacks it; /readyz lists the replica."""
    container, _ = shop_on_cluster
    await product(container, "RYW-1", 500)
    with_token_stale = without_token_stale = 0
    # A live shop commits all the time; an idle primary ages the replica's last replayed commit, so
    # its time lag grows past the bound and the primary serves (the safe side; ADR 0032). Keep the
    # primary committing, as traffic would, so the delayed replica stays in rotation.
    stop = asyncio.Event()

    async def traffic() -> None:
        while not stop.is_set():
            await container.inventory.set_available("RYW-1", 500)
            await asyncio.sleep(0.1)

    background = asyncio.create_task(traffic())
    await asyncio.sleep(0.5)
    assert container.db.replicas is not None
    await container.db.replicas.refresh(container.db.engine)  # measured under that traffic
    async with api(container) as client:
        for _ in range(20):
            me, headers = await customer(container)
            await container.cart.set_item(me, "RYW-1", 1)
            order = await container.checkout.start(me, correlation_id=str(uuid.uuid4()))
            put = await client.put("/v1/carts/me/items/RYW-1", json={"quantity": 1}, headers=headers)
            assert put.status_code == 200, put.text
            token = put.headers["mercato-consistency-token"]
            assert f"mercato_ct={token}" in put.headers["set-cookie"]
            client.cookies.clear()  # the header alone carries it here
            seen = await client.get("/v1/orders", headers={**headers, "Mercato-Consistency-Token": token})
            assert seen.status_code == 200, seen.text
            with_token_stale += str(order.id) not in seen.text
            blind = await client.get("/v1/orders", headers=headers)
            without_token_stale += str(order.id) not in blind.text
        ready = (await client.get("/readyz")).json()
    stop.set()
    await background
    assert with_token_stale == 0
    assert without_token_stale > 0
    assert [r["in_rotation"] for r in ready["replicas"]] == [True]
