"""Start, find and stop the cluster's long-lived processes by pid file, never by name.

Each process runs in its own session (so a Ctrl-C in the shell that ran `mercato cluster up` does
not take the cluster down), writes to `<name>.log` next to its `<name>.pid`, and is stopped by
signalling that pid's process group: SIGTERM, a bounded wait, then SIGKILL.

PostgreSQL refuses to run as root, so when we are root the PostgreSQL side (Patroni, pgBackRest)
runs as the unprivileged `postgres` OS user (`subprocess.Popen(user=...)`, the same as `runuser`)
and the folders it writes are chowned to it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

PG_OS_USER = "postgres"


def pg_user() -> str | None:
    """The OS user to run PostgreSQL as: `postgres` when we are root, else ourselves (None)."""
    return PG_OS_USER if os.geteuid() == 0 else None


def chown_to_pg(path: Path) -> None:
    """Give `path` (recursively) to the PostgreSQL OS user when we run as root."""
    user = pg_user()
    if user is None:
        return
    entry = pwd.getpwnam(user)
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(FileNotFoundError):
            os.chown(p, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


def make_traversable(path: Path) -> None:
    """Let the PostgreSQL OS user reach `path`: every ancestor needs the search (x) bit for it.

    A folder under a private one (pytest's 0700 tmp dirs) cannot work: say so instead of letting
    PostgreSQL fail later with a bare "permission denied"."""
    if pg_user() is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o755)
    for parent in path.resolve().parents:
        mode = parent.stat().st_mode
        if not mode & 0o001:
            raise PermissionError(
                f"{parent} is not searchable by other users (mode {oct(mode & 0o777)}): the "
                f"PostgreSQL OS user cannot reach {path}; choose a folder outside it"
            )


def pg_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "MERCATO_"))}
    user = pg_user()
    if user is not None:
        home = pwd.getpwnam(user).pw_dir
        env.update(HOME=home, USER=user, LOGNAME=user)
    env["LC_ALL"] = "C.UTF-8"
    return env


def spawn(
    folder: Path,
    name: str,
    argv: Sequence[str],
    *,
    as_pg: bool = False,
    env: dict[str, str] | None = None,
) -> int:
    """Start `argv` detached, logging to `folder/name.log`; its pid goes to `folder/name.pid`."""
    folder.mkdir(parents=True, exist_ok=True)
    log = (folder / f"{name}.log").open("ab")
    user = pg_user() if as_pg else None
    try:
        proc = subprocess.Popen(  # noqa: S603 - argv is ours, never a shell
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=folder,
            env=env if env is not None else (pg_env() if as_pg else None),
            user=user,
            group=user,
            extra_groups=[] if user else None,
        )
    finally:
        log.close()
    (folder / f"{name}.pid").write_text(str(proc.pid))
    return proc.pid


def read_pid(folder: Path, name: str) -> int | None:
    try:
        return int((folder / f"{name}.pid").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours still answers kill(0): reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop(folder: Path, name: str, *, timeout_s: float = 20.0) -> bool:
    """SIGTERM the process group of `name`, SIGKILL after `timeout_s`; True if it was running."""
    pid = read_pid(folder, name)
    if not alive(pid):
        (folder / f"{name}.pid").unlink(missing_ok=True)
        return False
    assert pid is not None
    _signal_group(pid, signal.SIGTERM)
    if not wait_until(lambda: not alive(pid), timeout_s=timeout_s):
        _signal_group(pid, signal.SIGKILL)
        wait_until(lambda: not alive(pid), timeout_s=5.0)
    (folder / f"{name}.pid").unlink(missing_ok=True)
    return True


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.2) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes (a harness helper, never the request
    path)."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(Exception):
            if predicate():
                return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)
