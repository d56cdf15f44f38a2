"""The Universal Scalability Law (Gunther): throughput of N workers

    X(N) = lambda * N / (1 + sigma * (N - 1) + kappa * N * (N - 1))

`lambda` is one worker's throughput, `sigma` the contention (the serial share: Amdahl), `kappa` the
coherency cost (pairwise crosstalk; the reason throughput can fall past a peak at
N* = sqrt((1 - sigma) / kappa)). Fitted by linear least squares on N / X(N) = a + b (N-1) + c N (N-1)
(a = 1/lambda, b = sigma/lambda, c = kappa/lambda), solved through the normal equations (at most
three unknowns: plain Python, so `mercato capacity plan` needs neither numpy nor scipy); negative
coefficients are clamped to 0 and the rest refitted, so the result is always a meaningful curve.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """Least squares for a few columns: Gaussian elimination on the normal equations."""
    k = len(a[0])
    m = [
        [sum(r[i] * r[j] for r in a) for j in range(k)] + [sum(r[i] * y for r, y in zip(a, b, strict=True))]
        for i in range(k)
    ]
    for col in range(k):
        pivot = max(range(col, k), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        if abs(m[col][col]) < 1e-12:
            raise ValueError("degenerate fit")
        for r in range(k):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [x - f * y for x, y in zip(m[r], m[col], strict=True)]
    return [m[i][k] / m[i][i] for i in range(k)]


def fit_usl(ns: Sequence[float], xs: Sequence[float]) -> UslFit:
    if len(ns) != len(xs) or not ns:
        raise ValueError("need as many throughputs as worker counts, at least one")
    if any(x <= 0 for x in xs):
        raise ValueError("throughputs must be positive")
    n = [float(v) for v in ns]
    y = [v / x for v, x in zip(n, xs, strict=True)]

    def column(i: int, v: float) -> float:
        return (1.0, v - 1, v * (v - 1))[i]

    keep = [0, 1, 2][: max(1, min(3, len(set(ns))))]  # no more unknowns than distinct N
    while True:
        try:
            solved = _solve([[column(i, v) for i in keep] for v in n], y)
        except ValueError:
            keep = keep[:-1]
            continue
        coef = [0.0, 0.0, 0.0]
        for i, value in zip(keep, solved, strict=True):
            coef[i] = value
        negative = [i for i in keep if i > 0 and coef[i] < 0]
        if not negative:
            break
        keep = [i for i in keep if i not in negative]
    a0 = coef[0] if coef[0] > 0 else min(y)
    fit = UslFit(lam=1 / a0, sigma=coef[1] / a0, kappa=coef[2] / a0, r2=0.0)
    mean = sum(xs) / len(xs)
    total = sum((x - mean) ** 2 for x in xs)
    residual = sum((x - fit.throughput(v)) ** 2 for x, v in zip(xs, n, strict=True))
    r2 = 1 - residual / total if total > 0 else 1.0
    return UslFit(fit.lam, fit.sigma, fit.kappa, round(r2, 4))
