"""`PostgresNode`: one private PostgreSQL cluster that a test or lab owns, stops, kills and restarts.

Why our own: fault tests must never touch the shared server (5432) other sessions use, and an outage can
only be measured on a server we may take down. So each node is a fresh `initdb` in a temporary folder,
listening on a free loopback port, run by an unprivileged OS user (PostgreSQL refuses to run as root:
when we are root the binaries run through `runuser -u <os_user> --`). Trust authentication on loopback
only; no fsync (a node dies with its test, and a `kill -9` of the server alone keeps the OS page cache).

    node = PostgresNode.create()          # initdb + start
    url = node.url("mercato")             # postgresql+asyncpg://postgres@127.0.0.1:<port>/mercato
    node.stop()                           # clean shutdown: sessions get "terminating connection ..."
    node.start()
    node.kill()                           # kill -9 of the postmaster and every backend: a crash
    node.destroy()                        # stop and remove the folder

Everything is synchronous (subprocess): call it from a thread (`asyncio.to_thread`) inside a running
event loop so the app under test keeps serving while the node goes down.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from mercato.kit.ports import free_port

__all__ = ["DEFAULT_BIN_DIR", "PostgresNode", "PostgresNodeError"]

DEFAULT_BIN_DIR = Path("/usr/lib/postgresql/15/bin")

# Settings for a throwaway node: durability traded for speed, and enough connections for a load test.
_SETTINGS = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
    "logging_collector": "off",
}


class PostgresNodeError(RuntimeError):
    """A node command failed; the message carries its output and the tail of the server log."""


class PostgresNode:
    """A private PostgreSQL cluster in `base_dir` listening on 127.0.0.1:`port`.

    `os_user` runs the server (needed when we are root); `bin_dir` holds initdb/pg_ctl/postgres.
    The node is not started by the constructor: `init()` then `start()`, or `PostgresNode.create()`.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        port: int | None = None,
        os_user: str = "postgres",
        bin_dir: Path = DEFAULT_BIN_DIR,
        superuser: str = "postgres",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.base_dir = base_dir
        self.data_dir = base_dir / "data"
        self.log_file = base_dir / "server.log"
        self.port = port or free_port()
        self.os_user = os_user
        self.bin_dir = bin_dir
        self.superuser = superuser
        self._settings = {**_SETTINGS, **(settings or {})}

    # --- lifecycle ----------------------------------------------------------------------------------

    @classmethod
    def create(
        cls, *, port: int | None = None, os_user: str = "postgres", start: bool = True
    ) -> PostgresNode:
        """A node in a fresh temporary folder (owned by `os_user`), initialised and, by default, started."""
        base = Path(tempfile.mkdtemp(prefix="mercato-pg-"))
        node = cls(base, port=port, os_user=os_user)
        try:
            node.init()
            if start:
                node.start()
        except BaseException:
            node.destroy()
            raise
        return node

    def init(self) -> None:
        """`initdb` with trust authentication and this node's settings appended to postgresql.conf."""
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self._chown(self.base_dir)
        self._run(
            [
                str(self.bin_dir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                self.superuser,
                "--auth=trust",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ]
        )
        conf = {**self._settings, "port": str(self.port), "unix_socket_directories": f"'{self.base_dir}'"}
        lines = "".join(f"{name} = {value}\n" for name, value in conf.items())
        self._run(["sh", "-c", f"cat >> '{self.data_dir / 'postgresql.conf'}'"], stdin=lines)

    def allow_hosts(self, cidr: str) -> None:
        """Trust connections from `cidr` too (pg_hba.conf; e.g. a lab's veth subnet). Before
        `start()`, or followed by a restart; `listen_addresses` must include an address there."""
        self._run(
            ["sh", "-c", f"cat >> '{self.data_dir / 'pg_hba.conf'}'"], stdin=f"host all all {cidr} trust\n"
        )

    def start(self, *, timeout_s: float = 30.0) -> None:
        """Start the server and wait until it accepts connections."""
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "start",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_file),
                "-w",
                "-t",
                str(int(timeout_s)),
            ],
            timeout_s=timeout_s + 5,
        )

    def stop(self, *, mode: str = "fast", wait: bool = True, timeout_s: float = 30.0) -> None:
        """Shut down: `fast` terminates sessions and rolls their transactions back (what an operator's
        restart does), `smart` waits for them, `immediate` aborts without a checkpoint.

        `wait=False` returns once the signal is sent: with `smart` and a session open, the server then
        sits in "the database system is shutting down", refusing new connections (57P03).
        """
        if not self.is_running():
            return
        self._run(
            [
                str(self.bin_dir / "pg_ctl"),
                "stop",
                "-D",
                str(self.data_dir),
                "-m",
                mode,
                "-w" if wait else "-W",
            ],
            timeout_s=timeout_s,
        )

    def kill(self) -> None:
        """Crash the node: SIGKILL to the postmaster and each of its children (backends, walwriter...).

        Clients see their connections reset with no goodbye; the next `start()` runs crash recovery.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        for child in _children(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        # A killed postmaster leaves its pid file, and where nobody reaps orphans (a container's PID 1)
        # its pid stays taken by a zombie, which the next start would take for a live server.
        # The same goes for the socket's lock file.
        for stale in (
            self.data_dir / "postmaster.pid",
            self.base_dir / f".s.PGSQL.{self.port}.lock",
            self.base_dir / f".s.PGSQL.{self.port}",
        ):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def wait_stopped(self, *, timeout_s: float = 30.0) -> None:
        """Wait for a shutdown begun with `stop(wait=False)` to finish."""
        deadline = time.monotonic() + timeout_s
        while self.is_running():
            if time.monotonic() > deadline:
                raise PostgresNodeError(f"still running after {timeout_s}s\n{self.log_tail()}")
            time.sleep(0.02)

    def restart(self, *, mode: str = "fast") -> None:
        self.stop(mode=mode)
        self.start()

    def destroy(self) -> None:
        """Stop the server (immediately) if it runs and remove the node's folder."""
        with contextlib.suppress(PostgresNodeError, subprocess.TimeoutExpired):
            self.stop(mode="immediate")
        if self.is_running():
            self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> PostgresNode:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    # --- state and addresses ------------------------------------------------------------------------

    def postmaster_pid(self) -> int | None:
        """The running postmaster's pid, from postmaster.pid, or None when it does not run."""
        try:
            first = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except (FileNotFoundError, PermissionError):
            return None
        pid = int(first) if first.strip().isdigit() else None
        return pid if pid is not None and _alive(pid) else None

    def is_running(self) -> bool:
        return self.postmaster_pid() is not None

    def dsn(self, database: str = "postgres") -> str:
        """A libpq/asyncpg DSN: `postgresql://postgres@127.0.0.1:<port>/<database>`."""
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def url(self, database: str = "postgres", *, driver: str = "asyncpg") -> str:
        """A SQLAlchemy URL for `database` with `driver` (`postgresql+asyncpg://...`)."""
        return f"postgresql+{driver}://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, *, database: str = "postgres") -> str:
        """Run one SQL string through the postgres binary's own client (`psql -At`) and return its output."""
        return self._run(
            [
                str(self.bin_dir / "psql"),
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                "-d",
                database,
                "-At",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                sql,
            ]
        )

    def create_database(self, name: str) -> str:
        """CREATE DATABASE `name` (a plain identifier) and return its SQLAlchemy URL."""
        if not name.replace("_", "").isalnum():
            raise ValueError(f"not a plain identifier: {name!r}")
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except (FileNotFoundError, PermissionError):
            return ""

    # --- helpers ------------------------------------------------------------------------------------

    def _as_user(self, argv: Sequence[str]) -> list[str]:
        if os.geteuid() == 0:
            return ["runuser", "-u", self.os_user, "--", *argv]
        return list(argv)

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, user=self.os_user, group=None)
            path.chmod(0o700)

    def _run(self, argv: Sequence[str], *, stdin: str | None = None, timeout_s: float = 60.0) -> str:
        done = subprocess.run(  # noqa: S603 - our own argv: the node's binaries and paths
            self._as_user(argv),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            cwd=self.base_dir,
            check=False,
        )
        if done.returncode != 0:
            raise PostgresNodeError(
                f"{' '.join(argv[:2])} failed ({done.returncode}): "
                f"{done.stderr.strip() or done.stdout.strip()}"
                f"\n--- server log ---\n{self.log_tail()}"
            )
        return done.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (killed, not yet reaped by its parent) is not a running server.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    """The direct children of `pid` (the postmaster's backends and auxiliary processes), from /proc."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out
