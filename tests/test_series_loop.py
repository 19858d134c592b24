"""Lemma 4's series printed as a loop: any ``terms`` >= 1, against mpmath (issue #13)."""

from __future__ import annotations

import mpmath
import numpy as np
import pytest
import torch
from nmgen.derivations.lemma4_series import eq5_integral_mp, evaluate_series
from nmgen.derivations.reference import relu_cross_moment_ref, to_float
from nmgen.generated import numpy_kernels as NK
from nmgen.generated import torch_kernels as TK

# both branches of Eq. 1 (|ρ| ≤ 1/√2 and above), both signs of ρ and of the means
POINTS = (
    (1.0, -0.5, 0.5, 1.5, 0.4),
    (-2.0, 0.6, 0.2, 2.0, -0.5),
    (0.3, 0.8, 1.1, 0.7, 0.8),
    (-0.4, -1.2, 0.9, 1.3, -0.85),
)


def _both(pt, terms):
    n = float(NK.relu_cross_moment_series(*pt, terms))
    t = TK.relu_cross_moment_series(*[torch.tensor(v, dtype=torch.float64) for v in pt], terms)
    return n, float(t)


@pytest.mark.parametrize("terms", [1, 2, 7, 13])
@pytest.mark.parametrize("pt", POINTS)
def test_any_terms_equals_mpmath_truncated_series(pt, terms):
    """The generated loop reproduces the truncated series evaluated by mpmath (30 digits)
    from the direct, unrestructured form of Eqs. 1-3 (``series_branches``)."""
    want = to_float(evaluate_series(*pt, terms, dps=30))
    for got in _both(pt, terms):
        assert abs(got - want) <= 1e-14 * max(1.0, abs(want))


@pytest.mark.parametrize("pt", POINTS[:2])
def test_seven_terms_matches_eq5_quadrature_as_the_series_allows(pt):
    """Issue bar: terms=7 matches the Eq. 5 quadrature up to the truncation error, which is
    measured by mpmath (series at 7 terms vs Eq. 5) and must shrink with more terms."""
    with mpmath.workdps(30):
        exact = eq5_integral_mp(*pt)
        trunc7 = abs(to_float(evaluate_series(*pt, 7, dps=30) - exact))
        trunc30 = abs(to_float(evaluate_series(*pt, 30, dps=30) - exact))
    assert trunc30 < trunc7 < 1e-2
    for got in _both(pt, 7):
        assert abs(got - to_float(exact)) <= trunc7 * (1 + 1e-6) + 1e-15
    for got in _both(pt, 30):
        assert abs(got - to_float(exact)) <= trunc30 * (1 + 1e-6) + 1e-15


@pytest.mark.parametrize("rho", [1.0, -1.0])
def test_limits_at_unit_correlation_match_the_definition(rho):
    """|ρ| = 1 closed forms of the series kernel vs the nested-quadrature oracle."""
    rng = np.random.default_rng(3)
    for _ in range(4):
        m1, m2 = rng.normal(0, 1.5, 2)
        s1, s2 = rng.uniform(0.2, 2.0, 2)
        want = to_float(relu_cross_moment_ref(m1, m2, s1, s2, rho))
        for got in _both((m1, m2, s1, s2, rho), 3):
            assert abs(got - want) <= 1e-14 * (abs(m1) + s1) * (abs(m2) + s2)


def test_generated_torch_file_is_compact():
    """Issue bar: one looped series kernel, generated/torch_kernels.py under 1,000 lines."""
    from pathlib import Path

    src = (Path(TK.__file__)).read_text()
    assert len(src.splitlines()) < 1000
    assert src.count("def relu_cross_moment_series(") == 1 and "for u in range(1, terms)" in src
