"""Apply new configuration versions in this process: all or nothing, within a bounded time.

Each `poll_once` reads the latest version number (one indexed query); when it differs from the one in
force, the document is read and parsed into the typed model, then every registered *preparer* builds
what it needs from the new model (a parsed policy set, new limits) without touching what is in force.
Only when every preparer succeeded do the returned commits run, one after another with no `await` in
between: a request sees all of the old version or all of the new, never a mix. A document this process
cannot parse or prepare (e.g. written for a newer code version) is rejected and the old one stays.

The bound: a version stored at `t` is in force everywhere by `t + poll_interval_s + one poll's time`
(measured by `mercato_config_apply_delay_seconds`, and by `tests/integration/test_runtime_config.py`).
Each applied version, and every `REPORT_EVERY_S` otherwise, refreshes this process's version report
(`runtime_processes`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mercato.kit.clock import Clock
from mercato.kit.dynconfig.store import ConfigStore, ProcessReport
from mercato.kit.observability import get_logger

__all__ = ["ConfigHook", "ConfigWatcher", "ProcessIdentity", "PrometheusConfigHook"]

T = TypeVar("T")
# How often a process refreshes its version report when nothing changed; readers of the reports
# (the contract migration) take a process unseen for 30 s as gone.
REPORT_EVERY_S = 5.0
_log = get_logger("mercato.dynconfig")

# A preparer builds the new state from the parsed document and returns the commit that installs it.
Commit = Callable[[], None]


class ConfigHook(Protocol):
    def applied(self, version: int, *, delay_s: float | None) -> None: ...
    def rejected(self, version: int, *, error: str) -> None: ...


class PrometheusConfigHook:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._version = Gauge(
            "mercato_config_version",
            "The runtime-configuration version in force in this process.",
            registry=registry,
        )
        self._outcomes = Counter(
            "mercato_config_applies_total",
            "New configuration versions seen: applied, or rejected (the previous stays in force).",
            ["outcome"],
            registry=registry,
        )
        self._delay = Histogram(
            "mercato_config_apply_delay_seconds",
            "From a version's storing to its being in force in this process.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=registry,
        )

    def applied(self, version: int, *, delay_s: float | None) -> None:
        self._version.set(version)
        self._outcomes.labels("applied").inc()
        if delay_s is not None:
            self._delay.observe(max(0.0, delay_s))

    def rejected(self, version: int, *, error: str) -> None:
        self._outcomes.labels("rejected").inc()


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    process_id: str
    role: str  # api | worker | cli
    app_version: str  # the code's version (a release name)
    # Schema objects this code still uses that a contract migration would drop: the migration refuses
    # to run while a live process reports one (ADR 0047).
    needs: tuple[str, ...] = ()


class ConfigWatcher(Generic[T]):
    """The in-process copy of the configuration document (`current`, `version`)."""

    def __init__(
        self,
        store: ConfigStore,
        parse: Callable[[dict[str, Any]], T],
        *,
        clock: Clock,
        identity: ProcessIdentity,
        poll_interval_s: float = 1.0,
        hook: ConfigHook | None = None,
    ) -> None:
        self.store = store
        self._parse = parse
        self._clock = clock
        self.identity = identity
        self.poll_interval_s = poll_interval_s
        self._hook = hook
        self._preparers: list[Callable[[T], Commit]] = []
        self.current: T = parse({})
        self.version = 0
        self.applied_at: datetime | None = None
        self.last_error: str | None = None
        self._rejected_version: int | None = None
        self._started_at = clock.now()
        self.report_every_s = REPORT_EVERY_S
        self._reported_at_s: float | None = None

    def on_change(self, preparer: Callable[[T], Commit]) -> None:
        """Register a preparer. Before the first version (0: the start-up settings) there is nothing to
        apply; after it, the preparer is applied at once to the version in force."""
        self._preparers.append(preparer)
        if self.version > 0:
            preparer(self.current)()

    def detail(self) -> dict[str, Any]:
        """What `/readyz` reports."""
        return {
            "version": self.version,
            "applied_at": None if self.applied_at is None else self.applied_at.isoformat(),
            "app_version": self.identity.app_version,
            "error": self.last_error,
        }

    async def poll_once(self) -> bool:
        """Apply the latest version if it is new; True when something new was applied."""
        latest = await self.store.latest_version()
        changed = False
        if latest != self.version and latest != self._rejected_version:
            changed = await self._load(latest)
        now_s = self._clock.monotonic()
        # A write per process every few seconds, not every poll (SQLite has one writer at a time).
        if changed or self._reported_at_s is None or now_s - self._reported_at_s >= self.report_every_s:
            await self._report()
            self._reported_at_s = now_s
        return changed

    async def _load(self, latest: int) -> bool:
        found = await self.store.get(latest) if latest > 0 else None
        document = found.document if found is not None else {}
        try:
            parsed = self._parse(document)
            commits = [prepare(parsed) for prepare in self._preparers]
        except Exception as exc:  # noqa: BLE001 - any failure leaves the old version whole
            self._rejected_version = latest
            self.last_error = f"version {latest} rejected: {exc}"
            _log.error("runtime_config_rejected", version=latest, error=str(exc))
            if self._hook is not None:
                self._hook.rejected(latest, error=str(exc))
            return False
        # No await from here on: the swap is atomic for every coroutine of this process.
        for commit in commits:
            commit()
        self.current = parsed
        self.version = latest
        self.applied_at = self._clock.now()
        self.last_error = None
        self._rejected_version = None
        delay = None if found is None else (self.applied_at - found.created_at).total_seconds()
        _log.info("runtime_config_applied", version=latest, delay_s=delay)
        if self._hook is not None:
            self._hook.applied(latest, delay_s=delay)
        return True

    async def _report(self) -> None:
        await self.store.report(
            ProcessReport(
                process_id=self.identity.process_id,
                role=self.identity.role,
                app_version=self.identity.app_version,
                config_version=self.version,
                started_at=self._started_at,
                seen_at=self._clock.now(),
                needs=self.identity.needs,
            )
        )

    async def run(self) -> None:
        """Poll until cancelled; a failed poll (database down) is logged and retried next interval."""
        try:
            while True:
                try:
                    await self.poll_once()
                except Exception:  # noqa: BLE001 - the loop must outlive outages
                    _log.warning("runtime_config_poll_failed", exc_info=True)
                await asyncio.sleep(self.poll_interval_s)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.forget(self.identity.process_id))
