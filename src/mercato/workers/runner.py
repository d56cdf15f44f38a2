"""Runs periodic jobs until told to stop.

A pass that handled a full batch runs again at once (there is a backlog); an idle pass waits the
job's interval, jittered by ±10% so several worker processes do not sweep in lockstep. A woken
pass starts no sooner than the job's `batch_window_s` after the previous pass started (ADR 0055). A job that
names `wake_on` channels (kit/storage/signals.py) is woken at once by a signal on them, and its
interval is only the safety poll; a job that `announces` a channel fires it after a pass that
handled something (the relay announces the stream to its consumers). A failing pass is logged and
retried after the interval: one bad pass never stops the worker.

Singleton jobs run only while this process leads the election (ADR 0041), and every write
transaction of their pass carries the term's fencing token: the database refuses it (`FencedOut`,
rolled back, counted in `mercato_coordination_fenced_writes_total`) once a newer term has written.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from mercato.kit.coordination import Election, FencedOut, fenced_writes
from mercato.kit.observability import get_logger
from mercato.kit.storage.signals import WorkSignals
from mercato.workers.jobs import PeriodicJob

__all__ = ["JobMetrics", "run_job", "run_jobs", "run_pass"]

_log = get_logger("mercato.worker")


class JobMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.items = Counter(
            "mercato_worker_job_items_total", "Items handled by periodic jobs.", ["job"], registry=registry
        )
        self.failures = Counter(
            "mercato_worker_job_failures_total",
            "Periodic job passes that failed.",
            ["job"],
            registry=registry,
        )
        self.duration = Histogram(
            "mercato_worker_job_duration_seconds", "Duration of one job pass.", ["job"], registry=registry
        )


async def run_pass(job: PeriodicJob, election: Election | None) -> int:
    """One pass: at once for an ordinary job; for a singleton, only as the leader and fenced."""
    if not job.singleton or election is None:
        return await job.run()
    term = election.term
    if term is None:
        return 0  # a follower: the leader runs it
    if term.token is None:
        return await job.run()  # the local election: nobody to fence off
    try:
        with fenced_writes(election.name, term.token):
            return await job.run()
    except FencedOut as exc:
        _log.warning("job_fenced_out", job=job.name, election=election.name, token=exc.token)
        election.hook.fenced(election.name)
        return 0


async def run_job(
    job: PeriodicJob,
    stop: asyncio.Event,
    *,
    metrics: JobMetrics | None = None,
    rng: random.Random | None = None,
    election: Election | None = None,
    signals: WorkSignals | None = None,
) -> None:
    rng = rng or random.Random()
    wake_on = job.wake_on if signals is not None else ()
    previous_start = float("-inf")
    backlog = False
    while not stop.is_set():
        # A woken pass waits out the rest of the batch window since the previous pass started: the
        # commits signalled meanwhile are served by this one pass. A backlog pass goes at once.
        hold_s = previous_start + job.batch_window_s - time.perf_counter()
        if hold_s > 0 and not backlog:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=hold_s)
            if stop.is_set():
                break
        start = previous_start = time.perf_counter()
        handled = 0
        # Read before the pass: a signal fired while it runs ends the wait below at once.
        mark = signals.mark(wake_on) if signals is not None and wake_on else ()
        try:
            handled = await run_pass(job, election)
        except Exception:  # noqa: BLE001 - a worker survives a failed pass and tries again
            _log.exception("job_failed", job=job.name)
            if metrics is not None:
                metrics.failures.labels(job.name).inc()
        else:
            if handled:
                # Debug, not info: under load every side job passes several times a second, and a
                # rendered log line per pass was ~0.5 % of the worker's CPU (py-spy, bench checkout
                # at 50/s); `mercato_worker_job_items_total` counts the same items.
                _log.debug("job_pass", job=job.name, handled=handled)
            if metrics is not None:
                metrics.items.labels(job.name).inc(handled)
            if handled and job.announces is not None and signals is not None:
                try:
                    await signals.announce(job.announces)
                except Exception:  # noqa: BLE001 - the listeners' safety poll covers a lost announcement
                    _log.warning("job_announce_failed", job=job.name, exc_info=True)
        if metrics is not None:
            metrics.duration.labels(job.name).observe(time.perf_counter() - start)
        backlog = job.batch is not None and handled >= job.batch
        if backlog:
            continue
        delay = job.interval_s * rng.uniform(0.9, 1.1)
        if signals is not None and wake_on:
            await signals.wait(wake_on, since=mark, timeout_s=delay, stop=stop)
            continue
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay)


async def run_jobs(
    jobs: list[PeriodicJob],
    stop: asyncio.Event,
    *,
    metrics: JobMetrics | None = None,
    election: Election | None = None,
    signals: WorkSignals | None = None,
) -> None:
    """Run every job concurrently until `stop` is set (woken by `signals` where jobs say so), and
    the election's loop beside them (without an election every singleton runs here: a caller that
    knows it is alone)."""
    async with asyncio.TaskGroup() as group:
        if election is not None:
            group.create_task(election.run(stop), name=f"election:{election.name}")
        for job in jobs:
            group.create_task(
                run_job(job, stop, metrics=metrics, election=election, signals=signals),
                name=f"job:{job.name}",
            )
