"""`mercato bench idle`: what an idle `mercato up` costs the machine (issue 16: goal <= 1 % of a core).

Starts `mercato up` exactly as a user does (its own process, a fresh SQLite file in a temp dir or
the PostgreSQL database given, the simulated providers on free ports), waits until `/readyz`
answers and a settle time has passed, then reads the process's CPU time (`/proc/<pid>/stat`, user +
system) before and after `seconds` of idleness. Nothing is sent to it meanwhile. The machine's load
average is reported next to the figure: on a loaded machine the same work costs more CPU time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from mercato.bench.servers import free_port

__all__ = ["IdleResult", "measure_idle"]

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class IdleResult:
    seconds: float
    cpu_s: float
    database: str
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]

    @property
    def core_share(self) -> float:
        """Share of one core spent while idle (0.01 = 1 %)."""
        return self.cpu_s / self.seconds


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` (and of its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def measure_idle(*, seconds: float, settle_s: float, database_url: str | None) -> IdleResult:
    with tempfile.TemporaryDirectory(prefix="mercato-idle-") as tmp:
        url = database_url or f"sqlite+aiosqlite:///{tmp}/mercato.db"
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("MERCATO_")}
        env.update(
            {
                "MERCATO_DATABASE_URL": url,
                "MERCATO_DATA_DIR": tmp,
                "MERCATO_PROVIDERS_PSP_PORT": str(free_port()),
                "MERCATO_PROVIDERS_CARRIER_PORT": str(free_port()),
                "MERCATO_PROVIDERS_MAIL_PORT": str(free_port()),
                "MERCATO_PROVIDERS_MAIL_SMTP_PORT": str(free_port()),
                "MERCATO_TELEMETRY_LOG_LEVEL": "warning",
            }
        )
        with (Path(tmp) / "up.log").open("wb") as log:
            proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "mercato.cli.main", "up", "--port", str(port)],
                cwd=tmp,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            try:
                _wait_ready(f"http://127.0.0.1:{port}/readyz", proc, timeout_s=180)
                time.sleep(settle_s)
                load_before = os.getloadavg()
                before = process_cpu_s(proc.pid)
                time.sleep(seconds)
                after = process_cpu_s(proc.pid)
                load_after = os.getloadavg()
            finally:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
    return IdleResult(
        seconds=seconds,
        cpu_s=after - before,
        database="sqlite" if url.startswith("sqlite") else "postgresql",
        load_before=load_before,
        load_after=load_after,
    )


def _wait_ready(url: str, proc: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mercato up exited with {proc.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"mercato up was not ready within {timeout_s:.0f} s")
