"""The Universal Scalability Law (Gunther): throughput of N workers

    X(N) = lambda * N / (1 + sigma * (N - 1) + kappa * N * (N - 1))

`lambda` is one worker's throughput, `sigma` the contention (the serial share: Amdahl), `kappa` the
coherency cost (pairwise crosstalk; the reason throughput can fall past a peak at
N* = sqrt((1 - sigma) / kappa)). Fitted by linear least squares on N / X(N) = a + b (N-1) + c N (N-1)
(a = 1/lambda, b = sigma/lambda, c = kappa/lambda) with numpy; negative coefficients are clamped to
0 and the rest refitted, so the result is always a physically meaningful curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["UslFit", "fit_usl"]


@dataclass(frozen=True)
class UslFit:
    lam: float
    sigma: float
    kappa: float
    r2: float

    def throughput(self, n: float) -> float:
        return self.lam * n / (1 + self.sigma * (n - 1) + self.kappa * n * (n - 1))

    @property
    def peak_n(self) -> float:
        """Where X(N) peaks (infinite without coherency cost)."""
        return math.sqrt((1 - self.sigma) / self.kappa) if self.kappa > 0 and self.sigma < 1 else math.inf


def fit_usl(ns: Sequence[float], xs: Sequence[float]) -> UslFit:
    if len(ns) != len(xs) or not ns:
        raise ValueError("need as many throughputs as worker counts, at least one")
    if any(x <= 0 for x in xs):
        raise ValueError("throughputs must be positive")
    n = np.asarray(ns, dtype=float)
    y = n / np.asarray(xs, dtype=float)
    columns = [np.ones_like(n), n - 1, n * (n - 1)]
    keep = [0, 1, 2][: max(1, min(3, len(set(ns))))]  # no more unknowns than distinct N
    coef = np.zeros(3)
    while True:
        a = np.stack([columns[i] for i in keep], axis=1)
        solved, *_ = np.linalg.lstsq(a, y, rcond=None)
        coef = np.zeros(3)
        coef[keep] = solved
        negative = [i for i in keep if i > 0 and coef[i] < 0]
        if not negative:
            break
        keep = [i for i in keep if i not in negative]
    a0 = float(coef[0]) if coef[0] > 0 else float(y.min())
    fit = UslFit(lam=1 / a0, sigma=float(coef[1]) / a0, kappa=float(coef[2]) / a0, r2=0.0)
    xs_arr = np.asarray(xs, dtype=float)
    predicted = np.array([fit.throughput(v) for v in n])
    total = float(((xs_arr - xs_arr.mean()) ** 2).sum())
    r2 = 1 - float(((xs_arr - predicted) ** 2).sum()) / total if total > 0 else 1.0
    return UslFit(fit.lam, fit.sigma, fit.kappa, round(r2, 4))
