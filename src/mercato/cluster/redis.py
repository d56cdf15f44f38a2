"""`RedisNode`: one private redis-server a test or lab owns, stops, kills and restarts on the same port.

No persistence (a restarted node comes back empty, as a failed-over cache would) and loopback only.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from mercato.kit.ports import free_port

__all__ = ["RedisNode"]


class RedisNode:
    """A redis-server on 127.0.0.1:`port`, its folder in `base_dir`. `start()` waits until it answers."""

    def __init__(
        self, base_dir: Path, *, port: int | None = None, binary: str = "/usr/bin/redis-server"
    ) -> None:
        self.base_dir = base_dir
        self.port = port or free_port()
        self.binary = binary
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def create(cls, *, port: int | None = None) -> RedisNode:
        node = cls(Path(tempfile.mkdtemp(prefix="mercato-redis-")), port=port)
        node.start()
        return node

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, *, timeout_s: float = 10.0) -> None:
        if self.is_running():
            return
        self._process = subprocess.Popen(  # noqa: S603 - our own argv: the binary and its options
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.base_dir),
                "--logfile",
                str(self.base_dir / "redis.log"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._answers():
                return
            if self._process.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        """SIGTERM and wait: clients see their connections closed."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: connections reset with no goodbye."""
        self._signal(signal.SIGKILL)

    def destroy(self) -> None:
        self.kill()
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def __enter__(self) -> RedisNode:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.destroy()

    def _signal(self, sig: signal.Signals) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=10)
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        self._process = None

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False
