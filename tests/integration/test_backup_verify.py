"""`mercato backup verify --cluster` and the restore's refusals, on a real pgBackRest repository.

One single-node Patroni "cluster" with WAL archiving per module (the backup machinery is the same as
on three nodes), the shop's schema migrated on it, real checkouts run through the saga with the
simulated PSP and carrier (two paid and shipped, one declined), then a full backup. The destructive
cases (a corrupted backup file, a missing WAL segment) run last: they damage the repository.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from typer.testing import CliRunner

from mercato.bootstrap import SCRIPT_LOCATION
from mercato.cli.main import app
from mercato.cluster import Topology
from mercato.cluster.backup import BackupFailed, backup, backups, restore_and_start, stop_scratch
from mercato.cluster.patroni import create_database_on_primary
from mercato.kit.storage.migrations import upgrade
from mercato.lab.backup_verify import verify_cluster_backup
from tests.integration.ha_support import running_cluster, shop_history

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

DATABASE = "hha_shop"


@dataclass(frozen=True)
class Backed:
    topology: Topology
    orders: list[str]


@pytest.fixture(autouse=True, scope="module")
def _only_with_slow(request: pytest.FixtureRequest) -> None:
    """A cluster, real checkouts, backups and five restores (~4 min): behind the marker."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a pgBackRest drill of minutes: run it with -m slow")


@pytest.fixture(scope="module")
def backed() -> Iterator[Backed]:
    with running_cluster(members=1, backups=True) as topology:
        create_database_on_primary(topology, DATABASE)
        url = topology.database_url(database=DATABASE)
        upgrade(SCRIPT_LOCATION, url)
        data = Path(tempfile.mkdtemp(prefix="hha-providers-"))
        try:
            orders = asyncio.run(shop_history(url, data, completed=2, declined=1))
        finally:
            shutil.rmtree(data, ignore_errors=True)
        backup(topology, kind="full")
        yield Backed(topology, orders)


def _delete_shipment_record(url: str, order_id: str) -> None:
    async def delete() -> None:
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            await conn.execute(
                "DELETE FROM saga_steps WHERE saga_id = $1::uuid AND step = 'create_shipment'", order_id
            )
        finally:
            await conn.close()

    asyncio.run(delete())


def test_verify_restores_the_backup_and_the_books_balance(backed: Backed) -> None:
    report = verify_cluster_backup(backed.topology, database=DATABASE)
    assert report.orders == 3
    assert report.ok, report.problems()
    assert {v.name for v in report.verdicts} == {
        "stock_conserved",
        "completed_paid_and_shipped",
        "no_capture_without_order",
        "orders_and_sagas_agree",
    }
    assert all(v.checked > 0 for v in report.verdicts)
    assert not Path(report.restored_into).exists()  # the scratch copy is gone again
    print(f"\nverify: restore + open {report.restore_s:.1f} s, books checked in {report.check_s:.2f} s")


def test_verify_fails_when_the_restored_copy_lost_a_shipment(backed: Backed) -> None:
    paid = backed.orders[0]
    report = verify_cluster_backup(
        backed.topology, database=DATABASE, tamper=lambda url: _delete_shipment_record(url, paid)
    )
    assert not report.ok
    assert report.problems() == [
        f"completed_paid_and_shipped: completed order {paid}: no shipment recorded (create_shipment step)"
    ]


def test_the_cli_prints_the_table_and_exits_non_zero_only_on_a_violation(backed: Backed) -> None:
    runner = CliRunner()
    done = runner.invoke(
        app, ["backup", "verify", "--cluster", str(backed.topology.root), "--database", DATABASE]
    )
    assert done.exit_code == 0, done.output
    assert "completed_paid_and_shipped" in done.output
    assert "books balance" in done.output


def test_a_time_before_the_first_backup_is_refused(backed: Backed, tmp_path: Path) -> None:
    first = min(b.stopped for b in backups(backed.topology))
    target = backed.topology.dir("restored", "too-early")
    with pytest.raises(BackupFailed, match="before the first backup completed"):
        restore_and_start(backed.topology, target, to_time=first - timedelta(hours=1))
    assert not target.exists()  # refused before anything was written


def test_restore_promote_puts_the_checked_copy_into_service(backed: Backed) -> None:
    """`mercato restore --cluster R --latest --promote`: invariants checked, then the copy becomes the
    primary under a new Patroni scope, the old data folder kept aside; the shop's URL writes to it."""
    root = backed.topology.root
    done = CliRunner().invoke(
        app, ["restore", "--cluster", str(root), "--latest", "--promote", "--database", DATABASE]
    )
    assert done.exit_code == 0, done.output
    assert "invariants hold" in done.output
    assert "RTO restore → serving" in done.output
    adopted = Topology.load(root)
    assert adopted.scope == f"{backed.topology.scope}-r1"
    assert list(root.joinpath("postgres", "pg0").glob("data.replaced-*"))

    async def orders_and_write() -> int:
        url = adopted.database_url(database=DATABASE, driver="postgresql")
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE hha_after_promote (n int)")
            await conn.execute("INSERT INTO hha_after_promote VALUES (1)")
            return int(await conn.fetchval("SELECT count(*) FROM orders"))
        finally:
            await conn.close()

    assert asyncio.run(orders_and_write()) == len(backed.orders)


def test_a_corrupted_backup_file_is_refused_and_nothing_is_written(backed: Backed) -> None:
    newest = backups(backed.topology)[-1].label  # the set a restore of the latest state reads
    repo = backed.topology.dir("pgbackrest", "repo", "backup", "mercato", newest)
    files = sorted(p for p in repo.rglob("*.lz4") if p.is_file() and p.stat().st_size > 64)
    victim = max(files, key=lambda p: p.stat().st_size)
    saved = victim.read_bytes()
    middle = len(saved) // 2
    victim.write_bytes(
        saved[:middle] + bytes(b ^ 0xFF for b in saved[middle : middle + 32]) + saved[middle + 32 :]
    )
    try:
        with pytest.raises(BackupFailed) as refused:
            verify_cluster_backup(backed.topology, database=DATABASE)
        assert "verify" in str(refused.value)
        target = backed.topology.dir("restored", "corrupt")
        with pytest.raises(BackupFailed, match=r"(?i)checksum") as restore_refused:
            restore_and_start(backed.topology, target, timeout_s=60.0)
        assert "no live node touched" in str(restore_refused.value)
        assert not target.exists()
    finally:
        victim.write_bytes(saved)


def test_a_missing_wal_segment_is_refused(backed: Backed) -> None:
    async def write_and_switch() -> None:
        conn = await asyncpg.connect(backed.topology.database_url(database=DATABASE, driver="postgresql"))
        try:
            await conn.execute("CREATE TABLE IF NOT EXISTS hha_after (n int)")
            await conn.execute("INSERT INTO hha_after VALUES (1)")
            await conn.execute("SELECT pg_switch_wal()")
        finally:
            await conn.close()

    asyncio.run(write_and_switch())
    time.sleep(3.0)
    later = datetime.now().astimezone()
    archive = backed.topology.dir("pgbackrest", "repo", "archive")
    segments = sorted(p for p in archive.rglob("0000000*") if p.is_file() and ".history" not in p.name)
    segments[-1].unlink()
    target = backed.topology.dir("restored", "no-wal")
    with pytest.raises(BackupFailed, match="did not finish recovery"):
        restore_and_start(backed.topology, target, to_time=later + timedelta(seconds=2), timeout_s=60.0)
    stop_scratch(target)
