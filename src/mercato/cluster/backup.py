"""pgBackRest for the local cluster: continuous WAL archiving, full and incremental backups, and
point-in-time restores into a scratch data folder (never over a running node) — ADR 0033.

One repository folder under the cluster's root; the stanza lists all three nodes, and pgBackRest
finds the primary among them itself (after a failover too). Everything runs as the PostgreSQL OS
user, like the nodes. A restore goes to a new folder and is started there on a free port, so it can
be checked before anybody points the shop at it: nothing is overwritten until it is verified.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg

from mercato.cluster.patroni import PG_BIN_DIR, ArchiveSettings, node_dir
from mercato.cluster.processes import chown_to_pg, pg_env, pg_user, spawn, stop, wait_until
from mercato.cluster.topology import Topology
from mercato.kit.ports import free_port

STANZA = "mercato"
PGBACKREST = "pgbackrest"


class BackupFailed(RuntimeError):
    """pgBackRest refused or failed; the message carries its own explanation."""


def _folder(topology: Topology) -> Path:
    return topology.dir("pgbackrest")


def config_path(topology: Topology) -> Path:
    return _folder(topology) / "pgbackrest.conf"


def write_config(topology: Topology) -> Path:
    folder = _folder(topology)
    for sub in ("repo", "log", "lock", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    lines = [
        "[global]",
        f"repo1-path={folder / 'repo'}",
        "repo1-retention-full=2",
        f"log-path={folder / 'log'}",
        f"lock-path={folder / 'lock'}",
        f"spool-path={folder / 'spool'}",
        "log-level-console=warn",
        "log-level-file=info",
        "start-fast=y",
        "compress-type=lz4",
        "",
        f"[{STANZA}]",
    ]
    for i, node in enumerate(topology.postgres, start=1):
        lines += [
            f"pg{i}-path={node_dir(topology, node) / 'data'}",
            f"pg{i}-port={node.pg_port}",
            f"pg{i}-socket-path={node_dir(topology, node)}",
        ]
    path = config_path(topology)
    path.write_text("\n".join(lines) + "\n")
    chown_to_pg(folder)
    return path


def archive_settings(topology: Topology) -> ArchiveSettings:
    conf = config_path(topology)
    return ArchiveSettings(
        archive_command=f"{PGBACKREST} --config={conf} --stanza={STANZA} archive-push %p",
        restore_command=f"{PGBACKREST} --config={conf} --stanza={STANZA} archive-get %f %p",
    )


def run(topology: Topology, *args: str, timeout_s: float = 600.0) -> str:
    if shutil.which(PGBACKREST) is None:
        raise BackupFailed("pgbackrest not found: apt-get install pgbackrest")
    argv = [PGBACKREST, f"--config={config_path(topology)}", f"--stanza={STANZA}", *args]
    user = pg_user()
    done = subprocess.run(  # noqa: S603 - our argv, no shell
        argv,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env=pg_env(),
        user=user,
        group=user,
        extra_groups=[] if user else None,
        check=False,
        cwd="/",
    )
    if done.returncode != 0:
        said = done.stderr.strip() or done.stdout.strip()
        raise BackupFailed(f"pgbackrest {' '.join(args)} failed ({done.returncode}): {said}")
    return done.stdout


def stanza_create(topology: Topology) -> None:
    run(topology, "stanza-create")
    run(topology, "check")


def backup(topology: Topology, *, kind: str = "full") -> None:
    if kind not in ("full", "diff", "incr"):
        raise ValueError("kind is full, diff or incr")
    run(topology, "backup", f"--type={kind}")


@dataclass(frozen=True)
class BackupInfo:
    label: str
    kind: str
    started: datetime
    stopped: datetime
    size_bytes: int


def backups(topology: Topology) -> list[BackupInfo]:
    data: list[dict[str, Any]] = json.loads(run(topology, "info", "--output=json"))
    out = []
    for stanza in data:
        for b in stanza.get("backup", []):
            out.append(
                BackupInfo(
                    label=b["label"],
                    kind=b["type"],
                    started=datetime.fromtimestamp(b["timestamp"]["start"]).astimezone(),
                    stopped=datetime.fromtimestamp(b["timestamp"]["stop"]).astimezone(),
                    size_bytes=int(b["info"]["size"]),
                )
            )
    return out


def restore_to(topology: Topology, target: Path, *, to_time: datetime | None = None) -> None:
    """Restore into `target` (a new, empty folder): the latest state, or the state at `to_time`.

    A time before the first backup finished, or one the archive cannot reach (a missing WAL
    segment), fails here or when the scratch server replays: never on a live node."""
    if target.exists() and any(target.iterdir()):
        raise BackupFailed(f"{target} is not empty: a restore never overwrites a folder")
    if to_time is not None:
        first = min((b.stopped for b in backups(topology)), default=None)
        if first is None:
            raise BackupFailed("no backup in the repository")
        if to_time < first:
            raise BackupFailed(
                f"{to_time.isoformat()} is before the first backup completed ({first.isoformat()}): "
                "nothing to restore from"
            )
    target.mkdir(parents=True, exist_ok=True)
    target.chmod(0o700)
    chown_to_pg(target)
    args = ["restore", f"--pg1-path={target}", "--archive-mode=off"]
    if to_time is not None:
        args += ["--type=time", f"--target={to_time.isoformat(sep=' ')}", "--target-action=promote"]
    try:
        run(topology, *args)
    except BackupFailed as exc:
        # A damaged backup file (pgBackRest checks every file's checksum as it restores) stops the
        # restore half way: the half-written folder is ours, nothing live was touched; remove it.
        shutil.rmtree(target, ignore_errors=True)
        raise BackupFailed(
            f"the restore stopped and its folder {target} was removed (no live node touched): {exc}"
        ) from exc


def scratch_server_argv(target: Path, port: int) -> list[str]:
    """How to start a restored folder on its own port (hot standby off: it recovers, then opens)."""
    return [
        str(PG_BIN_DIR / "postgres"),
        "-D", str(target),
        "-p", str(port),
        "-c", "listen_addresses=127.0.0.1",
        "-c", f"unix_socket_directories={target}",
        "-c", "archive_mode=off",
        "-c", "hba_file=" + str(target / "pg_hba.conf"),
    ]  # fmt: skip


@dataclass(frozen=True)
class ScratchRestore:
    """A restored copy running on its own port, to be checked before anyone relies on it."""

    folder: Path
    port: int
    ready_s: float

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"


def restore_and_start(
    topology: Topology, target: Path, *, to_time: datetime | None = None, timeout_s: float = 120.0
) -> ScratchRestore:
    """Restore into `target`, start PostgreSQL there on a free port, and wait until recovery ended
    and it accepts writes (promoted). A recovery that cannot reach the target (a missing WAL
    segment) never opens: that is reported with the server's own last words."""
    started = time.monotonic()
    restore_to(topology, target, to_time=to_time)
    port = free_port()
    spawn(target.parent, f"{target.name}-server", scratch_server_argv(target, port), as_pg=True)

    def promoted() -> bool:
        async def ask() -> bool:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user="postgres", database="postgres")
            try:
                return not await conn.fetchval("SELECT pg_is_in_recovery()")
            finally:
                await conn.close()

        return asyncio.run(ask())

    if not wait_until(promoted, timeout_s=timeout_s, interval_s=0.3):
        log = (target.parent / f"{target.name}-server.log").read_text(errors="replace")[-800:]
        stop_scratch(target)
        raise BackupFailed(f"the restored copy did not finish recovery; its log ends:\n{log}")
    return ScratchRestore(target, port, time.monotonic() - started)


def stop_scratch(target: Path) -> None:
    stop(target.parent, f"{target.name}-server")
