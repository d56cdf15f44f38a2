"""One auto-pipelined Redis connection for the limiter's hot path (ADR 0020).

A rate-limit decision is one EVALSHA on every request. Through redis-py (or coredis) each call checks a
connection out of a pool, packs the command, writes it, waits for its own reply and checks the
connection back in: ~50-70 µs of the API process's CPU per decision measured here, more than the bare
request it guards. This connection instead:

- writes every command issued in one event-loop tick as a single `write` (automatic pipelining: under
  load many requests decide in the same tick, and they share one syscall and one reply read);
- matches replies to callers by order (RESP replies arrive in command order on one connection), with
  hiredis parsing them in C;
- packs commands from a template, without per-call option handling.

Measured: ~4 µs of client CPU per decision instead of ~50-70 µs (ADR 0020 has the table).

It is deliberately small: the commands the limiter needs (`EVALSHA`, `SCRIPT LOAD`, `PING`), AUTH and
SELECT from the URL, TLS for `rediss://`. Failure semantics are those of redis-py's exceptions, so the
limiter's error handling is the same for both clients:

- connect and first reply bounded by `socket_timeout_s`; a reply overdue by more than `socket_timeout_s`
  (a silent server) aborts the connection, failing every caller waiting on it with `TimeoutError`;
- a lost connection fails every waiting caller with `ConnectionError`; the next call reconnects (one
  connect at a time, shared by the callers that arrive meanwhile);
- a Redis error reply becomes `ResponseError` (`NoScriptError` for NOSCRIPT) for that caller only.
A caller cancelled while waiting (its own deadline) keeps its slot in the reply order, so the replies
of the callers behind it are never mismatched.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from typing import Any, cast
from urllib.parse import unquote, urlparse

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["PipelinedRedis"]

Arg = str | bytes | int


def _encode(arg: Arg) -> bytes:
    if isinstance(arg, bytes):
        return arg
    return str(arg).encode("utf-8")


def pack_bulk(arg: Arg) -> bytes:
    """One RESP bulk string: a command's name or argument."""
    data = _encode(arg)
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pack_command(*args: Arg) -> bytes:
    """The RESP array for one command."""
    return b"*%d\r\n" % len(args) + b"".join([pack_bulk(arg) for arg in args])


class _Protocol(asyncio.Protocol):
    """The wire side: buffers writes per tick, hands replies to waiters in order."""

    def __init__(self, owner: PipelinedRedis, reply_timeout_s: float) -> None:
        self._owner = owner
        self._reply_timeout_s = reply_timeout_s
        self._watchdog: asyncio.TimerHandle | None = None
        self._reader = hiredis.Reader()
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.waiters: deque[tuple[asyncio.Future[Any], float]] = deque()
        self._pending: list[bytes] = []
        self._flush_scheduled = False
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport by construction (create_connection); uvloop's does not subclass asyncio's.
        self.transport = cast(asyncio.Transport, transport)

    def send(self, payload: bytes) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self.waiters.append((future, self._loop.time()))
        self._pending.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._reply_timeout_s, self._check_overdue)
        return future

    def _check_overdue(self) -> None:
        # One timer per connection, not per call: it wakes when the oldest reply could first be overdue.
        self._watchdog = None
        if not self.waiters or self.closed:
            return
        overdue_at = self.waiters[0][1] + self._reply_timeout_s
        if self._loop.time() >= overdue_at:
            self.abort(RedisTimeoutError(f"redis reply overdue by more than {self._reply_timeout_s}s"))
        else:
            self._watchdog = self._loop.call_at(overdue_at, self._check_overdue)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._pending and self.transport is not None and not self.closed:
            self.transport.write(b"".join(self._pending))
        self._pending.clear()

    def data_received(self, data: bytes) -> None:
        try:
            self._reader.feed(data)
            while (reply := self._reader.gets()) is not False:
                if not self.waiters:
                    raise hiredis.ProtocolError("reply without a command")
                future, _ = self.waiters.popleft()
                if future.done():  # its caller gave up (deadline); the slot kept the order intact
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    message = str(reply)
                    error = NoScriptError if message.startswith("NOSCRIPT") else ResponseError
                    future.set_exception(error(message))
                else:
                    future.set_result(reply)
        except hiredis.ProtocolError as exc:
            self.abort(RedisConnectionError(f"redis protocol error: {exc}"))

    def abort(self, error: Exception) -> None:
        self._fail_all(error)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail_all(RedisConnectionError(f"connection to redis lost: {exc or 'closed'}"))
        self._owner._lost(self)

    def _fail_all(self, error: Exception) -> None:
        self.closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._pending.clear()
        while self.waiters:
            future, _ = self.waiters.popleft()
            if not future.done():
                future.set_exception(error)


class PipelinedRedis:
    """A single auto-pipelined connection to the Redis at `url` (`redis://` or `rediss://`).

    `socket_timeout_s` bounds connecting and how long any reply may be overdue; there are no client-side
    retries (the limiter's breaker decides what a failure means).
    """

    def __init__(self, url: str, *, socket_timeout_s: float = 0.1) -> None:
        parsed = urlparse(url)
        if parsed.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported redis URL scheme {parsed.scheme!r} (redis:// or rediss://)")
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or 6379
        self._db = int(parsed.path.lstrip("/") or 0)
        self._username = unquote(parsed.username) if parsed.username else None
        self._password = unquote(parsed.password) if parsed.password else None
        self._tls = parsed.scheme == "rediss"
        self._timeout_s = socket_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self.connects = 0

    @property
    def call_bound_s(self) -> float:
        """The longest one `execute` can wait: a connect, then a reply, each bounded by `socket_timeout_s`."""
        return 2 * self._timeout_s

    async def execute(self, *args: Arg) -> Any:
        """Send one command and wait for its reply."""
        return await self.execute_packed(pack_command(*args))

    async def execute_packed(self, payload: bytes) -> Any:
        """Send one command already packed as a RESP array (see `pack_command`) and wait for its reply.

        For callers that send the same command shape on every request and can keep its constant parts
        packed: most of a command's client cost is packing it.
        """
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connect()
        return await protocol.send(payload)

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Arg) -> Any:
        return await self.execute("EVALSHA", sha, numkeys, *keys_and_args)

    async def script_load(self, source: str) -> Any:
        reply = await self.execute("SCRIPT", "LOAD", source)
        return reply.decode() if isinstance(reply, bytes) else reply

    async def ping(self) -> bool:
        return bool(await self.execute("PING") == b"PONG")

    async def aclose(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    def _handshake(self) -> list[bytes]:
        commands = []
        if self._password is not None:
            auth: tuple[Arg, ...] = ("AUTH", self._password)
            if self._username is not None:
                auth = ("AUTH", self._username, self._password)
            commands.append(pack_command(*auth))
        if self._db:
            commands.append(pack_command("SELECT", self._db))
        return commands

    def _lost(self, protocol: _Protocol) -> None:
        if self._protocol is protocol:
            self._protocol = None

    async def _connect(self) -> _Protocol:
        # One connect for everyone who needs it now; shielded so one caller's cancellation cannot abort it.
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.get_running_loop().create_task(self._open())
        return await asyncio.shield(self._connecting)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        context = ssl.create_default_context() if self._tls else None
        protocol: _Protocol | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                _, protocol = await loop.create_connection(
                    lambda: _Protocol(self, self._timeout_s), self._host, self._port, ssl=context
                )
                for command in self._handshake():
                    await protocol.send(command)
        except BaseException as exc:
            if protocol is not None:
                protocol.abort(RedisConnectionError("redis handshake failed"))
            if isinstance(exc, TimeoutError):
                where = f"{self._host}:{self._port}"
                raise RedisTimeoutError(f"connecting to redis at {where} timed out") from exc
            if isinstance(exc, OSError):
                where = f"{self._host}:{self._port}"
                raise RedisConnectionError(f"cannot connect to redis at {where}: {exc}") from exc
            raise
        self._protocol = protocol
        self.connects += 1
        return protocol
