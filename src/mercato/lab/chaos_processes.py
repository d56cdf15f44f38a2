"""The processes of the checkout chaos run: starting one with its log, waiting until it serves, and the
killer that SIGKILLs the saga worker at random moments and restarts it."""

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from mercato.lab.chaos_model import ChaosConfig, Log


class ShopProcess:
    """One `mercato ...` subprocess with its own log file; restartable."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.workdir = workdir
        self.log = workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts + 1} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and arguments
                [sys.executable, "-m", "mercato.cli.main", *self.args],
                cwd=self.workdir,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.starts += 1

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, no lease release, no flush — a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def tail(self, lines: int = 30) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


async def wait_http(process: ShopProcess, url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if not process.alive:
                raise RuntimeError(f"{process.name} exited early:\n{process.tail()}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{process.name} did not become ready:\n{process.tail()}")


WORKER_READY = b"Mercato worker running"


async def wait_worker_ready(worker: ShopProcess, timeout_s: float = 60.0) -> None:
    """Until this start of the worker printed its banner (imports done, container built, about to
    run): a kill before that would only interrupt Python's start-up, not the worker's work."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if worker.log.read_bytes().count(WORKER_READY) >= worker.starts:
            return
        if not worker.alive:
            raise RuntimeError(f"worker exited:\n{worker.tail()}")
        await asyncio.sleep(0.1)
    raise RuntimeError(f"worker did not start:\n{worker.tail()}")


async def killer(
    worker: ShopProcess, config: ChaosConfig, rng: random.Random, log: Log, kill_times: list[float]
) -> None:
    """SIGKILL the running worker `kills` times, each at a random moment after it got going."""
    started = time.monotonic()
    for n in range(config.kills):
        await wait_worker_ready(worker)
        await asyncio.sleep(rng.uniform(*config.kill_gap_s))
        worker.kill()
        kill_times.append(time.monotonic() - started)
        log(f"worker SIGKILLed ({n + 1}/{config.kills}) at {kill_times[-1]:.1f} s")
        await asyncio.sleep(rng.uniform(*config.down_s))
        worker.start()
    await wait_worker_ready(worker)
