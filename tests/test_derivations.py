"""Every derivation's symbolic/numeric checks, and the mpmath oracles against identities."""

from __future__ import annotations

import mpmath as mp
import pytest
from nmgen.derivations import cross_covariance, lemma2
from nmgen.derivations.reference import (
    _conditional_relu_mean,
    relu_cross_moment_ref,
    relu_mean_ref,
    relu_second_moment_ref,
)

from nmgen import registry

#: Checks run below on fewer points or digits (their full runs: slow, and `nmgen prove`):
#: ∫_0^ρ Φ2 dr by quadrature of quadratures took 252 s (4 points) and 171 s (2 × 2) at 30
#: digits on session 35's machine.
REDUCED = (
    lemma2.check_price_relu_product,
    cross_covariance.check_positive_forms,
    cross_covariance.check_reflection,
)
FAST_CHECKS = [
    (m.__name__.rsplit(".", 1)[-1], c)
    for m in registry.modules()
    for c in getattr(m, "CHECKS", ())
    if c not in REDUCED
]


@pytest.mark.parametrize(
    ("module", "check"), FAST_CHECKS, ids=[f"{m}.{c.__name__}" for m, c in FAST_CHECKS]
)
def test_derivation_check(module, check):
    assert check() is True


def test_lemma2_price_relu_product():
    assert lemma2.check_price_relu_product()


def test_cross_covariance_positive_forms_one_point_per_sign():
    """The swapped forms against ∫_0^ρ Φ2 dr and the closed form, one point with ρ > 0 and
    one with ρ < 0 (the two forms), at 15 digits (within 1e-10): 24 s."""
    points = (cross_covariance.POSITIVE_FORMS_POINTS[0], cross_covariance.POSITIVE_FORMS_POINTS[2])
    assert points[0][2] > 0 > points[1][2]
    assert cross_covariance.check_positive_forms(points, dps=15)


def test_cross_covariance_reflection_one_point():
    """C(h, k, ρ) = ρ P(−h < Z < k) + C(−h, −k, ρ) at one point (ρ < 0), 15 digits (within
    1e-10): about 15 s; both points at 30 digits in the slow test below."""
    point = cross_covariance.REFLECTION_POINTS[1]
    assert point[2] < 0
    assert cross_covariance.check_reflection((point,), dps=15)


@pytest.mark.slow
def test_cross_covariance_forms_and_reflection_in_full():
    assert cross_covariance.check_positive_forms()
    assert cross_covariance.check_reflection()


@pytest.mark.slow
def test_lemma2_price_smooth():
    assert lemma2.check_price_smooth()


@pytest.mark.parametrize(("mu", "sigma"), [(0.3, 1.0), (-8.0, 1.0), (40.0, 2.0), (-40.0, 1.0)])
def test_oracle_identities_single(mu, sigma):
    """E[relu(x)] − E[relu(−x)] = μ and E[relu(x)²] + E[relu(−x)²] = μ² + σ²."""
    with mp.workdps(40):
        m, sd = mp.mpf(mu), mp.mpf(sigma)
        d = relu_mean_ref(mu, sigma) - relu_mean_ref(-mu, sigma)
        assert abs(d - m) < mp.mpf(10) ** -28 * (abs(m) + sd)
        s = relu_second_moment_ref(mu, sigma) + relu_second_moment_ref(-mu, sigma)
        assert abs(s - (m**2 + sd**2)) < mp.mpf(10) ** -28 * (abs(m) + sd) ** 2


def test_oracle_identities_pair():
    """E[x1⁺x2⁺] − E[x1⁺(−x2)⁺] = E[x1⁺ x2] = μ2E[x1⁺] + ρσ1σ2Φ(μ1/σ1); swap symmetry;
    the nested-quadrature inner expectation agrees with its closed form."""
    with mp.workdps(40):
        m1, m2, s1, s2, r = (mp.mpf(v) for v in ("0.4", "-0.7", "1.3", "0.6", "0.45"))
        e = relu_cross_moment_ref(m1, m2, s1, s2, r)
        lhs = e - relu_cross_moment_ref(m1, -m2, s1, s2, -r)
        rhs = m2 * relu_mean_ref(m1, s1) + r * s1 * s2 * mp.ncdf(m1 / s1)
        assert abs(lhs - rhs) < 1e-28
        assert abs(relu_cross_moment_ref(m2, m1, s2, s1, r) - e) < 1e-28


@pytest.mark.parametrize(("m", "s"), [(0.3, 1.0), (-4.0, 0.5), (6.0, 2.0), (0.0, 1e-3)])
def test_oracle_inner_closed_form_equals_quadrature(m, s):
    """The cross-moment oracle's inner E[relu(x1) | x2] (closed form, mpmath) = its quadrature."""
    with mp.workdps(40):
        closed = _conditional_relu_mean(mp.mpf(m), mp.mpf(s), "closed", 30)
        quad = _conditional_relu_mean(mp.mpf(m), mp.mpf(s), "quad", 30)
        assert abs(closed - quad) < mp.mpf(10) ** -28 * (abs(m) + s)


@pytest.mark.slow
def test_oracle_nested_quadrature_inner():
    quad_inner = relu_cross_moment_ref(0.4, -0.7, 1.3, 0.6, 0.45, dps=15, inner="quad")
    assert abs(quad_inner - relu_cross_moment_ref(0.4, -0.7, 1.3, 0.6, 0.45)) < 1e-14
