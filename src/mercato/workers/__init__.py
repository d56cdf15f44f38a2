"""Background work: process entry points and the periodic jobs they run."""

from mercato.workers.jobs import PeriodicJob, shop_jobs
from mercato.workers.runner import run_jobs

__all__ = ["PeriodicJob", "run_jobs", "shop_jobs"]
