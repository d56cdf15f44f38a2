"""The etcd adapter of the election port (ADR 0041): etcd's Raft elects, we only ask it.

A campaign is one etcd transaction on the key `<prefix>/<name>`: *if the key was never created*
(`create_revision == 0`) put our holder id on it, attached to a lease of `ttl_s` seconds. Whoever
succeeds leads; the key's create revision, which etcd makes strictly larger for each new key, is the
term's fencing token. The leader refreshes its lease every `ttl_s / 3`; when the lease expires (the
leader died, paused or lost etcd) etcd deletes the key and the next campaign wins with a larger
revision. Followers campaign every `ttl_s / 3`. etcd grants at least 1.5 election timeouts
(3 s by default, 3 × 2 s on the local cluster's calmer settings) whatever is asked: the takeover
waits for the granted TTL (`granted_ttl_s`), while the leader still steps down after `ttl_s`.

The client is `aetcd` (asyncio over etcd's gRPC API). It talks to one endpoint at a time; on a
failed call we move to the next endpoint of `endpoints`, so a killed etcd member costs one retry,
not leadership, as long as a majority of members is up (Raft's quorum).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Sequence
from typing import Any

import aetcd

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.coordination.election import ElectionHook, OnElected, Term, _Believed
from mercato.kit.observability import get_logger

__all__ = ["EtcdElection", "parse_endpoints"]

_log = get_logger("mercato.coordination")


def parse_endpoints(spec: str) -> list[tuple[str, int]]:
    """`"127.0.0.1:2379,h2:2379"` (optionally with `http://`) → [(host, port), ...]."""
    endpoints = []
    for raw in spec.split(","):
        item = raw.strip().removeprefix("http://").removeprefix("https://").rstrip("/")
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {raw!r} is not host:port")
        endpoints.append((host, int(port)))
    if not endpoints:
        raise ValueError("no etcd endpoint given")
    return endpoints


class EtcdElection:
    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        name: str,
        holder: str,
        *,
        ttl_s: int = 10,
        prefix: str = "/mercato/elections",
        hook: ElectionHook | None = None,
        on_elected: OnElected | None = None,
        clock: Clock | None = None,
        request_timeout_s: int | None = None,
    ) -> None:
        if ttl_s < 2:
            raise ValueError("etcd leases are whole seconds; ttl_s must be at least 2")
        self.name = name
        self.holder = holder
        self.key = f"{prefix.rstrip('/')}/{name}".encode()
        self._endpoints = list(endpoints)
        self._next = 0
        self._ttl_s = ttl_s
        # A call to a dead member must fail well inside the term, so the next step can move on.
        self._timeout_s = request_timeout_s or max(1, ttl_s // 4)
        self._on_elected = on_elected
        self._clock = clock or SystemClock()
        self._state = _Believed(name, hook, self._clock)
        self._client: aetcd.Client | None = None
        self._lease: Any = None
        self._token: int | None = None

    @property
    def term(self) -> Term | None:
        return self._state.term

    @property
    def hook(self) -> ElectionHook:
        return self._state.hook

    @property
    def granted_ttl_s(self) -> int | None:
        """The TTL etcd granted the current lease (it may raise a small request to its minimum)."""
        return None if self._lease is None else int(self._lease.ttl)

    @property
    def endpoint(self) -> tuple[str, int]:
        return self._endpoints[(self._next - 1) % len(self._endpoints)]

    async def _connected(self) -> aetcd.Client:
        if self._client is None:
            host, port = self._endpoints[self._next % len(self._endpoints)]
            self._next += 1
            client = aetcd.Client(host=host, port=port, timeout=self._timeout_s, connect_wait_timeout=1)
            await client.connect()
            self._client = client
        return self._client

    async def _drop_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()

    async def step(self) -> None:
        """One campaign (follower) or lease refresh (leader)."""
        sent = self._clock.monotonic()
        try:
            client = await self._connected()
            if self._lease is not None and self._token is not None:
                reply = await client.refresh_lease(self._lease.id)
                if reply is None or reply.TTL <= 0:
                    self._forget("lease expired")
                    return
            else:
                self._forget("")
                if not await self._campaign(client):
                    return
            assert self._token is not None
            if self._on_elected is not None and self._state.term is None:
                await self._on_elected(Term(self.holder, self._token))
        except Exception:  # noqa: BLE001 - a member down or slow: try the next one next time
            _log.warning(
                "etcd_election_error",
                election=self.name,
                endpoint=f"{self.endpoint[0]}:{self.endpoint[1]}",
                error=repr(sys.exc_info()[1])[:300],
            )
            self._state.hook.error(self.name)
            await self._drop_client()
            return
        assert self._token is not None
        self._state.confirm(Term(self.holder, self._token), ttl_s=self._ttl_s, since=sent)

    async def _campaign(self, client: aetcd.Client) -> bool:
        lease = await client.lease(self._ttl_s)
        tx = client.transactions
        won, responses = await client.transaction(
            compare=[tx.create(self.key) == 0],
            success=[tx.put(self.key, self.holder.encode(), lease=lease)],
            failure=[],
        )
        if not won:
            with contextlib.suppress(Exception):
                await client.revoke_lease(lease.id)
            return False
        self._lease = lease
        self._token = int(responses[0].response_put.header.revision)
        return True

    def _forget(self, reason: str) -> None:
        self._lease = None
        self._token = None
        if reason:
            self._state.step_down(reason)

    async def leader(self) -> tuple[str, int] | None:
        """Who leads now according to etcd (holder, token), for status pages and the lab."""
        client = await self._connected()
        got = await client.get(self.key)
        if got is None:
            return None
        return got.value.decode(), int(got.create_revision)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._ttl_s / 3)
        finally:
            await self.resign()

    async def resign(self) -> None:
        """Give leadership up now (revoking the lease deletes the key): the next campaign need not
        wait for the TTL."""
        lease = self._lease
        self._forget("resigned")
        if lease is not None and self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.revoke_lease(lease.id)
        await self._drop_client()
