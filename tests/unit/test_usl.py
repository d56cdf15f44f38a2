"""The USL fit recovers known coefficients and never returns a negative one."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mercato.bench.usl import fit_usl


def test_recovers_known_coefficients() -> None:
    ns = [1, 2, 3, 4, 6, 8]
    truth = (500.0, 0.08, 0.02)
    xs = [truth[0] * n / (1 + truth[1] * (n - 1) + truth[2] * n * (n - 1)) for n in ns]
    fit = fit_usl(ns, xs)
    assert fit.lam == pytest.approx(500, rel=1e-6)
    assert fit.sigma == pytest.approx(0.08, abs=1e-6)
    assert fit.kappa == pytest.approx(0.02, abs=1e-6)
    assert fit.peak_n == pytest.approx(((1 - 0.08) / 0.02) ** 0.5)
    assert fit.r2 == pytest.approx(1.0)


@given(st.lists(st.floats(min_value=1, max_value=10_000), min_size=2, max_size=6))
def test_coefficients_are_never_negative(xs: list[float]) -> None:
    fit = fit_usl(list(range(1, len(xs) + 1)), xs)
    assert fit.lam > 0
    assert fit.sigma >= 0
    assert fit.kappa >= 0


def test_bad_input() -> None:
    with pytest.raises(ValueError):
        fit_usl([1, 2], [100])
    with pytest.raises(ValueError):
        fit_usl([1], [0])
