"""Leader election: one process at a time leads `name`, each term numbered by a fencing token.

Three adapters behind one port (`Election`):

- `EtcdElection` (etcd.py): distributed mode. etcd's Raft decides; the term's token is the
  election key's create revision, which etcd makes strictly larger for every new key.
- `LeaseElection`: several workers sharing one database and no etcd: the database leases of
  `leases.py` (a row per name, taken over only once expired; the token is the row's term counter).
- `LocalElection`: embedded mode, one process: it always leads, and its term carries no token
  (there is nobody to fence off).

An election believes it leads only until `ttl_s` after its last confirmed renewal, measured on the
monotonic clock, so a process that wakes from a pause longer than the TTL steps down by itself
before its next pass. That check is only an optimisation: a pause can also fall between the check
and the write, which is why the writes carry the token and the database checks it (fencing.py).

The loop (`run`) tries to become leader, renews while it leads, and steps down on a failed renewal;
every change goes to an `ElectionHook` (metrics: `mercato_coordination_is_leader`,
`mercato_coordination_leadership_changes_total`) and, when leading, the new term's token is claimed
at the resource first (`on_elected`), so a stale leader is refused from that moment.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge

from mercato.kit.clock import Clock, SystemClock
from mercato.kit.coordination.leases import Lease, LeaseLost, LeaseStore
from mercato.kit.observability import get_logger

__all__ = [
    "Election",
    "ElectionHook",
    "LeaseElection",
    "LocalElection",
    "PrometheusElectionHook",
    "Term",
]

_log = get_logger("mercato.coordination")


@dataclass(frozen=True, slots=True)
class Term:
    """One leadership term: who leads and the fencing token its writes carry (None: unfenced)."""

    holder: str
    token: int | None


class ElectionHook(Protocol):
    def elected(self, name: str, term: Term) -> None: ...
    def lost(self, name: str, reason: str) -> None: ...
    def error(self, name: str) -> None: ...
    def fenced(self, name: str) -> None: ...


class Election(Protocol):
    """The port. `term` is the current term while this process believes it leads, else None."""

    name: str
    holder: str

    @property
    def term(self) -> Term | None: ...

    @property
    def hook(self) -> ElectionHook: ...

    async def run(self, stop: asyncio.Event) -> None:
        """Campaign, renew and step down until `stop` is set; then resign."""
        ...


OnElected = Callable[[Term], Awaitable[None]]


class PrometheusElectionHook:
    """`mercato_coordination_*` metrics: is-leader, churn, current token, refused writes."""

    def __init__(self, registry: CollectorRegistry, *, election: str | None = None) -> None:
        """`election`: the name to export zeros for from the start (a follower shows 0, not nothing)."""
        self.is_leader = Gauge(
            "mercato_coordination_is_leader",
            "1 while this process leads the election.",
            ["election"],
            registry=registry,
        )
        self.changes = Counter(
            "mercato_coordination_leadership_changes_total",
            "Leadership changes seen by this process (elected or lost).",
            ["election", "change"],
            registry=registry,
        )
        self.token = Gauge(
            "mercato_coordination_fencing_token",
            "The fencing token of this process's current term (0 when not leading).",
            ["election"],
            registry=registry,
        )
        self.errors = Counter(
            "mercato_coordination_election_errors_total",
            "Campaign or renewal attempts that failed on the coordination store.",
            ["election"],
            registry=registry,
        )
        self.fenced_writes = Counter(
            "mercato_coordination_fenced_writes_total",
            "Write transactions refused by the resource because a newer term had written.",
            ["election"],
            registry=registry,
        )

        if election is not None:
            self.is_leader.labels(election).set(0)
            self.token.labels(election).set(0)
            self.errors.labels(election)
            self.fenced_writes.labels(election)
            for change in ("elected", "lost"):
                self.changes.labels(election, change)

    def elected(self, name: str, term: Term) -> None:
        self.is_leader.labels(name).set(1)
        self.token.labels(name).set(term.token or 0)
        self.changes.labels(name, "elected").inc()

    def lost(self, name: str, reason: str) -> None:
        self.is_leader.labels(name).set(0)
        self.token.labels(name).set(0)
        self.changes.labels(name, "lost").inc()

    def error(self, name: str) -> None:
        self.errors.labels(name).inc()

    def fenced(self, name: str) -> None:
        self.fenced_writes.labels(name).inc()


class _NoHook:
    def elected(self, name: str, term: Term) -> None:
        pass

    def lost(self, name: str, reason: str) -> None:
        pass

    def error(self, name: str) -> None:
        pass

    def fenced(self, name: str) -> None:
        pass


class _Believed:
    """Leadership as this process believes it: a term valid until a monotonic deadline."""

    def __init__(self, name: str, hook: ElectionHook | None, clock: Clock) -> None:
        self.name = name
        self.hook: ElectionHook = hook or _NoHook()
        self._clock = clock
        self._term: Term | None = None
        self._valid_until = 0.0

    @property
    def term(self) -> Term | None:
        if self._term is not None and self._clock.monotonic() >= self._valid_until:
            self.step_down("lease not renewed in time")
        return self._term

    def confirm(self, term: Term, *, ttl_s: float, since: float) -> None:
        """`since`: the monotonic time the confirming request was sent (the lease runs from there)."""
        if self._term != term:
            self._term = term
            _log.info("leader_elected", election=self.name, holder=term.holder, token=term.token)
            self.hook.elected(self.name, term)
        self._valid_until = since + ttl_s

    def step_down(self, reason: str) -> None:
        if self._term is None:
            return
        _log.warning("leadership_lost", election=self.name, holder=self._term.holder, reason=reason)
        self._term = None
        self.hook.lost(self.name, reason)


class LocalElection:
    """Embedded mode: the one process leads from the start; its writes carry no token."""

    def __init__(self, name: str, holder: str, *, hook: ElectionHook | None = None) -> None:
        self.name = name
        self.holder = holder
        self._hook: ElectionHook = hook or _NoHook()
        self._term = Term(holder, None)
        self._hook.elected(name, self._term)

    @property
    def hook(self) -> ElectionHook:
        return self._hook

    @property
    def term(self) -> Term | None:
        return self._term

    async def run(self, stop: asyncio.Event) -> None:
        await stop.wait()


class LeaseElection:
    """Several processes, one database, no etcd: the database lease named `name` decides.

    Renewed every `ttl_s / 3`; a process that fails to renew (the row was taken over, or the
    database did not answer) steps down. The token is the lease's term counter.
    """

    def __init__(
        self,
        leases: LeaseStore,
        name: str,
        holder: str,
        *,
        ttl_s: float = 10.0,
        hook: ElectionHook | None = None,
        on_elected: OnElected | None = None,
        clock: Clock | None = None,
    ) -> None:
        self.name = name
        self.holder = holder
        self._leases = leases
        self._ttl_s = ttl_s
        self._on_elected = on_elected
        self._clock = clock or SystemClock()
        self._state = _Believed(name, hook, self._clock)
        self._lease: Lease | None = None

    @property
    def hook(self) -> ElectionHook:
        return self._state.hook

    @property
    def term(self) -> Term | None:
        return self._state.term

    async def step(self) -> None:
        """One campaign or renewal (the loop's body; tests call it directly)."""
        sent = self._clock.monotonic()
        try:
            if self._lease is not None:
                self._lease = await self._leases.renew(self._lease, ttl_s=self._ttl_s)
            else:
                self._lease = await self._leases.acquire(self.name, self.holder, ttl_s=self._ttl_s)
                if self._lease is None:
                    self._state.step_down("another holder leads")
                    return
            term = Term(self.holder, self._lease.fencing_token)
            if self._on_elected is not None and self._state.term != term:
                await self._on_elected(term)
        except LeaseLost:
            self._lease = None
            self._state.step_down("lease taken over")
            return
        except Exception:  # noqa: BLE001 - a store outage costs leadership, never the worker
            _log.exception("election_error", election=self.name)
            self._state.hook.error(self.name)
            return
        self._state.confirm(term, ttl_s=self._ttl_s, since=sent)

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                await self.step()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._ttl_s / 3)
        finally:
            lease, self._lease = self._lease, None
            if lease is not None and self._state.term is not None:
                with contextlib.suppress(Exception):
                    await self._leases.release(lease)
            self._state.step_down("resigned")
