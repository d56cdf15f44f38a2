"""Runs periodic jobs until told to stop.

A pass that handled a full batch runs again at once (there is a backlog); an idle pass waits the
job's interval, jittered by ±10% so several worker processes do not sweep in lockstep. A job that
names `wake_on` channels (kit/storage/signals.py) is woken at once by a signal on them, and its
interval is only the safety poll; a job that `announces` a channel fires it after a pass that
handled something (the relay announces the stream to its consumers). A failing pass is logged and
retried after the interval: one bad pass never stops the worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time

from prometheus_client import CollectorRegistry, Counter, Histogram

from mercato.kit.observability import get_logger
from mercato.kit.storage.signals import WorkSignals
from mercato.workers.jobs import PeriodicJob

__all__ = ["JobMetrics", "run_job", "run_jobs"]

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


async def run_job(
    job: PeriodicJob,
    stop: asyncio.Event,
    *,
    metrics: JobMetrics | None = None,
    rng: random.Random | None = None,
    signals: WorkSignals | None = None,
) -> None:
    rng = rng or random.Random()
    wake_on = job.wake_on if signals is not None else ()
    while not stop.is_set():
        start = time.perf_counter()
        handled = 0
        # Read before the pass: a signal fired while it runs ends the wait below at once.
        mark = signals.mark(wake_on) if signals is not None and wake_on else ()
        try:
            handled = await job.run()
        except Exception:  # noqa: BLE001 - a worker survives a failed pass and tries again
            _log.exception("job_failed", job=job.name)
            if metrics is not None:
                metrics.failures.labels(job.name).inc()
        else:
            if handled:
                _log.info("job_pass", job=job.name, handled=handled)
            if metrics is not None:
                metrics.items.labels(job.name).inc(handled)
            if handled and job.announces is not None and signals is not None:
                try:
                    await signals.announce(job.announces)
                except Exception:  # noqa: BLE001 - the listeners' safety poll covers a lost announcement
                    _log.warning("job_announce_failed", job=job.name, exc_info=True)
        if metrics is not None:
            metrics.duration.labels(job.name).observe(time.perf_counter() - start)
        if job.batch is not None and handled >= job.batch:
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
    signals: WorkSignals | None = None,
) -> None:
    """Run every job concurrently until `stop` is set (woken by `signals` where jobs say so)."""
    async with asyncio.TaskGroup() as group:
        for job in jobs:
            group.create_task(run_job(job, stop, metrics=metrics, signals=signals), name=f"job:{job.name}")
