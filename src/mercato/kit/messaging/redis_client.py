"""The Redis client of the stream and the real-time broker: `socket_timeout` without a task per command.

redis-py bounds each command's write with `asyncio.wait_for` whenever `socket_timeout` is set, and its
default is 5 s: on Python < 3.12 `wait_for` wraps the write in a task of its own, ~13 µs of CPU per
round trip on the bench VM (docs/benchmarks.md, h-rt7), and a chat pass makes five or six. Here a
write that cannot wait (the connection open, the bytes under the transport's high-water mark) is sent
in the caller's task with no deadline to arm; one that may wait runs under `asyncio.timeout`: the same
deadline, the same `redis.exceptions.TimeoutError`, the connection dropped when it passes. Reads keep
redis-py's own deadline (a timer, no task), which is what ends a command on a server that stopped
answering (ADR 0082).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.connection import Connection
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["DeadlineConnection", "redis_client"]

# redis-py's own default (`redis._defaults.DEFAULT_SOCKET_TIMEOUT`), stated: a dead server must end a
# command with an error, never hang it.
DEFAULT_SOCKET_TIMEOUT_S = 5.0


class DeadlineConnection(Connection):
    """`Connection` whose write deadline costs no task: none at all when the write cannot wait.

    A write waits only in `drain`, when the transport's buffer goes over its high-water mark (a
    server that stopped reading). When the connection is open and the command fits under the mark,
    the write cannot wait and is sent as is; otherwise it runs under `asyncio.timeout` (a timer in
    the caller's task). Either way no `wait_for` task; the read keeps redis-py's own deadline."""

    async def send_packed_command(
        self, command: bytes | str | Iterable[bytes], check_health: bool = True
    ) -> None:
        timeout = self.socket_timeout
        if not timeout:
            await super().send_packed_command(command, check_health)
            return
        if isinstance(command, str):
            command = command.encode()
        if isinstance(command, bytes):
            command = [command]
        elif not isinstance(command, list):
            command = list(command)
        # Off for redis-py's own call (no `wait_for`), on again before the reply is read: a connection
        # serves one command at a time, and nothing else runs on it in between.
        self.socket_timeout = None
        try:
            if self._fits(command):
                await super().send_packed_command(command, check_health)
                return
            async with asyncio.timeout(timeout):
                await super().send_packed_command(command, check_health)
        except TimeoutError:
            # The write was cancelled at the deadline; redis-py dropped the connection on the way out.
            raise RedisTimeoutError("Timeout writing to socket") from None
        finally:
            self.socket_timeout = timeout

    def _fits(self, command: list[bytes]) -> bool:
        """Open, no health check due, and the command fits under the write buffer's high-water mark:
        `drain` returns at once."""
        writer = self._writer
        if writer is None or not self.is_connected or self.health_check_interval:
            return False
        transport = writer.transport
        if transport.is_closing():
            return False
        _low, high = transport.get_write_buffer_limits()
        return transport.get_write_buffer_size() + sum(len(part) for part in command) <= high


def redis_client(url: str, *, socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S, **kwargs: Any) -> Redis:
    """A client for `url` on `DeadlineConnection`s; no I/O until first used."""
    return Redis.from_url(url, connection_class=DeadlineConnection, socket_timeout=socket_timeout_s, **kwargs)
