"""`bench.servers.settle`: a run's measurement waits until the servers stop working on it (real
processes, their CPU read from /proc), and not longer than its limit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mercato.bench.servers import ServerProcess, settle

# Busy for `seconds` of wall time, then idle until killed.
_BUSY_THEN_IDLE = (
    "import sys, time\n"
    "end = time.monotonic() + float(sys.argv[1])\n"
    "while time.monotonic() < end: pass\n"
    "time.sleep(60)\n"
)


def _process(tmp_path: Path, busy_s: float) -> ServerProcess:
    proc = subprocess.Popen([sys.executable, "-c", _BUSY_THEN_IDLE, str(busy_s)])
    return ServerProcess("busy", proc, 0, tmp_path / "busy.log")


@pytest.mark.parametrize("busy_s", [0.0, 1.5])
async def test_settle_waits_while_a_server_works_and_returns_once_it_is_quiet(
    tmp_path: Path, busy_s: float
) -> None:
    server = _process(tmp_path, busy_s)
    try:
        waited = await settle([server], window_s=0.25, limit_s=10)
    finally:
        server.proc.kill()
        server.proc.wait()
    if busy_s:
        assert busy_s - 0.3 <= waited < busy_s + 2
    else:
        assert waited < 1.0


async def test_settle_gives_up_at_its_limit(tmp_path: Path) -> None:
    server = _process(tmp_path, 30)
    try:
        waited = await settle([server], window_s=0.25, limit_s=1.0)
    finally:
        server.proc.kill()
        server.proc.wait()
    assert 1.0 <= waited < 2.0
