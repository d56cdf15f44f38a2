"""Round trips per message, counted from the server's own socket writes during a sending phase.

`MERCATO_BENCH_TRACE_DIR=<dir>` makes `bench realtime` run `strace` on the server for each sending
phase and count, per peer, the writes the server made: to PostgreSQL (port 5432), to Redis (6379),
to NATS (4222) and to the WebSocket clients. A request to a database or a broker is one write (a
pipelined batch too), so writes per message sent are the round trips per message, a figure the
load of a shared machine does not move (CPU time per delivery does). `strace` slows the server:
the latency and CPU figures of a traced run are not comparable with an untraced one.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

__all__ = ["PhaseTrace", "count_writes", "trace_dir"]

_TRACE_DIR_ENV = "MERCATO_BENCH_TRACE_DIR"
_PEERS = {5432: "postgresql", 6379: "redis", 4222: "nats"}
_WRITE = re.compile(r"^\d+\s+(?:write|writev|sendto|sendmsg)\((\d+),")


def trace_dir() -> Path | None:
    folder = os.environ.get(_TRACE_DIR_ENV)
    return Path(folder) if folder and shutil.which("strace") else None


class PhaseTrace:
    """`strace` on `pid` (all threads) for one phase; `finish` returns the writes per peer."""

    def __init__(self, pid: int, out: Path) -> None:
        self.pid = pid
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        args = ["strace", "-f", "-qq", "-e", "trace=write,writev,sendto,sendmsg", "-o", str(out)]
        self._proc = subprocess.Popen(  # noqa: S603 - a bench-only tool on our own server
            [*args, "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def finish(self) -> Counter[str]:
        peers = _socket_peers(self.pid)  # while the server and its sockets are still up
        self._proc.terminate()
        self._proc.wait(timeout=30)
        counts = count_writes(self.out.read_text(errors="replace").splitlines(), peers)
        self.out.with_suffix(".counts").write_text(
            "".join(f"{peer} {n}\n" for peer, n in sorted(counts.items()))
        )
        return counts


def count_writes(lines: list[str], peers: dict[int, str]) -> Counter[str]:
    """Writes per peer name from `strace -f` lines (`pid syscall(fd, ...`); fds not in `peers`
    count as "other" (pipes, the log)."""
    counts: Counter[str] = Counter()
    for line in lines:
        match = _WRITE.match(line)
        if match:
            counts[peers.get(int(match.group(1)), "other")] += 1
    return counts


def _socket_peers(pid: int) -> dict[int, str]:
    """fd -> what the socket talks to: a database or broker by its port, else "client"."""
    inodes: dict[str, int] = {}
    for fd in (Path("/proc") / str(pid) / "fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes[target[8:-1]] = int(fd.name)
    peers: dict[int, str] = {}
    for table in ("tcp", "tcp6"):
        path = Path("/proc") / str(pid) / "net" / table
        if not path.exists():
            continue
        for row in path.read_text().splitlines()[1:]:
            fields = row.split()
            inode, remote = fields[9], fields[2]
            if inode in inodes:
                port = int(remote.rsplit(":", 1)[1], 16)
                peers[inodes[inode]] = _PEERS.get(port, "client")
    return peers
