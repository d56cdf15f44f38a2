"""`MERCATO_WORKER_SIDE_JOB_WINDOW_S` reaches the worker's side jobs (ADR 0055): the relay, the
stream consumers, the projectors and the notifier batch their woken passes by it; no saga job does."""

from __future__ import annotations

from mercato.bootstrap import build_container
from mercato.config.sections import WorkerSettings
from mercato.kit.clock import ManualClock
from mercato.workers import shop_jobs
from tests.conftest import make_settings

_SIDE_JOBS = {
    "outbox_relay",
    "payments_ledger",
    "projection:order_summary",
    "projection:sales_by_day",
    "notifications",
    "notifier",
    "catalog_cache_invalidation",
}


async def test_the_side_jobs_batch_their_woken_passes_by_the_configured_window(database_url: str) -> None:
    assert WorkerSettings().side_job_window_s == 0.3  # ADR 0089 (was 0.1)
    built = build_container(
        make_settings(database_url, worker=WorkerSettings(side_job_window_s=0.25)), clock=ManualClock()
    )
    try:
        windows = {job.name: job.batch_window_s for job in shop_jobs(built)}
    finally:
        await built.close()
    assert windows.keys() >= _SIDE_JOBS
    assert {name: windows[name] for name in _SIDE_JOBS} == dict.fromkeys(_SIDE_JOBS, 0.25)
    # Only the side jobs: no other job (sweeps, purges, saga watches) waits for a window.
    assert {name for name, window in windows.items() if window} == _SIDE_JOBS
