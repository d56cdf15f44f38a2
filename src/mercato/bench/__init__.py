"""Open-loop HTTP benchmarking: a coordinated-omission-free load generator and a rate search.

The pure parts (timetable, histograms and counts, the rate search) and the generator are exported
here; starting servers and running a whole benchmark live in `mercato.bench.runner`, which the
``mercato bench http`` command drives.
"""

from mercato.bench.client import GeneratorConfig, GeneratorResult, OpenLoopGenerator, run_generator
from mercato.bench.search import RateSearch, SearchPolicy
from mercato.bench.stats import Counts, LatencyHistogram, Slo, StepResult, achieved_rate, ratio
from mercato.bench.timetable import Timetable, total_requests

__all__ = [
    "Counts",
    "GeneratorConfig",
    "GeneratorResult",
    "LatencyHistogram",
    "OpenLoopGenerator",
    "RateSearch",
    "SearchPolicy",
    "Slo",
    "StepResult",
    "Timetable",
    "achieved_rate",
    "ratio",
    "run_generator",
    "total_requests",
]
