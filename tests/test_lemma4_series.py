"""Lemma 4 series (Eqs. 1-3, 5, 6) against quadrature oracles."""

from __future__ import annotations

import itertools
import math

import mpmath
import pytest
import sympy as sp

from derivations.functions import to_elementary
from derivations.lemma4_series import (
    SYMBOLS,
    TERMS,
    HermiteH,
    I_series,
    I_tail_series,
    eq5_integral_mp,
    evaluate_series,
    omega,
    omega_printed,
    series_branches,
)
from derivations.reference import relu_cross_moment_ref as cross_moment_definition_mp
from derivations.reference import relu_mean_ref as relu_mean_mp

KNOWN = mpmath.mpf("0.241372141917743807")  # μ = 0, σ = 1, ρ = 0.3
# (μ1, μ2, σ1, σ2, ρ) from the paper's grid μ ∈ [-2, 2], σ ∈ [0.2, 2], |ρ| ≤ 0.5
GRID = [
    (1.0, -0.5, 0.5, 1.5, 0.4),
    (-2.0, 2.0, 0.2, 2.0, -0.5),
    (2.0, -1.0, 0.2, 2.0, 0.5),
    (-1.5, -2.0, 1.0, 0.2, 0.25),
    (0.3, 1.7, 2.0, 0.7, -0.1),
    (-2.0, -2.0, 0.2, 0.2, 0.3),
]


def test_hermite_function() -> None:
    x = sp.Symbol("x")
    for n in (0, 1, 7, 50):
        h = HermiteH(n, x)
        assert isinstance(h, HermiteH)  # stays unexpanded
        assert sp.expand(h.expand_poly() - sp.hermite(n, x)) == 0
        for xv in ("0.3", "8", "-2.5"):
            exact = sp.hermite(n, sp.Rational(xv))
            got = HermiteH(n, sp.Float(xv, 40)).evalf(30)
            assert abs(got - exact) <= sp.Float("1e-28") * max(1, abs(exact))
    assert sp.diff(HermiteH(5, x), x) == 10 * HermiteH(4, x)
    assert HermiteH(4, 0) == 12 and HermiteH(3, 0) == 0


def test_omega_matches_printed_eq2() -> None:
    exprs = (to_elementary(omega(*SYMBOLS)), omega_printed(*SYMBOLS))
    for p in [GRID[0], GRID[5], (0.7, -1.1, 1.3, 0.4, 0.85)]:
        vals = dict(zip(SYMBOLS, [sp.Float(v, 40) for v in p], strict=True))
        a, b = (e.evalf(35, subs=vals) for e in exprs)
        assert abs(a - b) < 1e-30


@pytest.mark.parametrize("x", [sp.Rational(13, 10), sp.Rational(-7, 10), sp.oo])
def test_I_series_eq3_against_quadrature(x) -> None:
    av, bv = sp.Rational(1, 2), sp.Rational(7, 10)
    with mpmath.workdps(35):
        xm = mpmath.inf if x is sp.oo else mpmath.mpf(x)
        ref = (
            mpmath.sqrt(mpmath.pi)
            / 2
            * mpmath.quad(lambda t: mpmath.exp(-t * t) * mpmath.erf(av * t + bv), [0, xm])
        )
        ref = sp.Float(mpmath.nstr(ref, 33), 33)
    got = sp.N(I_series(av, bv, x, 60), 30)
    assert abs(got - ref) < 1e-25
    if x is not sp.oo:  # the cancellation-free tail form is the same truncated sum
        tail = sp.N(I_tail_series(av, bv, x, 12), 30)
        diff = sp.N(I_series(av, bv, sp.oo, 12) - I_series(av, bv, x, 12), 30)
        assert abs(tail - diff) < 1e-25


def test_known_value() -> None:
    assert abs(eq5_integral_mp(0, 0, 1, 1, 0.3) - KNOWN) < 1e-17
    assert abs(evaluate_series(0, 0, 1, 1, 0.3, 50, dps=30) - KNOWN) < 1e-17
    assert abs(evaluate_series(0, 0, 1, 1, 0.3, 50) - float(KNOWN)) < 1e-15


@pytest.mark.slow
def test_known_value_definition_oracle() -> None:
    assert abs(cross_moment_definition_mp(0, 0, 1, 1, 0.3, dps=20) - KNOWN) < 1e-18


def test_series_vs_definition_oracle() -> None:
    p = (1.0, -0.5, 0.5, 1.5, 0.4)
    ref = cross_moment_definition_mp(*p, dps=15)
    assert abs(evaluate_series(*p, 50) - float(ref)) < 1e-12
    assert abs(eq5_integral_mp(*p) - ref) < 1e-14


@pytest.mark.parametrize("p", GRID)
def test_series_50_terms_vs_eq5(p) -> None:
    ref = eq5_integral_mp(*p)
    assert abs(evaluate_series(*p, 50, dps=30) - ref) < 1e-12
    assert abs(evaluate_series(*p, 50) - float(ref)) < 1e-12  # float64 arrangement


def test_rearrangement_equals_printed_eq1() -> None:
    for p in [GRID[0], GRID[3], (0.7, -1.1, 1.3, 0.4, 0.85), (-0.4, 0.9, 0.8, 1.1, -0.8)]:
        br = 1 if abs(p[4]) < 0.5**0.5 else 2
        a = evaluate_series(*p, 10, dps=30, branch=br)
        b = evaluate_series(*p, 10, dps=30, branch=br, printed=True)
        assert abs(a - b) < 1e-25


@pytest.mark.parametrize(
    "p",
    [
        (0.7, -1.1, 1.3, 0.4, 0.9),
        (0.7, -1.1, 1.3, 0.4, -0.9),
        (-1.0, 0.5, 0.6, 1.2, 0.8),
        (1.5, 0.5, 0.6, 1.2, -0.8),
    ],
)
def test_branch2_vs_eq5(p) -> None:
    ref = eq5_integral_mp(*p)
    assert abs(evaluate_series(*p, 50, dps=30) - ref) < 1e-10
    assert abs(evaluate_series(*p, 50) - float(ref)) < 1e-10


@pytest.mark.parametrize(
    "p",
    [(0.5, -0.3, 1.2, 0.7, 0.3), (-1.0, 1.0, 0.5, 1.0, -0.5), (0.7, -1.1, 1.3, 0.4, 0.9)],
)
def test_error_decreases_with_terms(p) -> None:
    ref = eq5_integral_mp(*p)
    errs = [abs(evaluate_series(*p, n, dps=30) - ref) for n in TERMS]
    floor = mpmath.mpf(10) ** -25
    # the first few partial sums may oscillate; from 5 terms on the error must not grow
    for e0, e1 in itertools.pairwise(errs[1:]):
        assert e1 <= max(e0, floor)
    assert errs[-1] < 1e-12 and errs[-1] < errs[0]


def test_branch1_at_rho_zero_is_product() -> None:
    p = (0.4, -0.9, 1.1, 0.6, 0.0)
    with mpmath.workdps(30):
        want = relu_mean_mp(0.4, 1.1) * relu_mean_mp(-0.9, 0.6)
        assert abs(eq5_integral_mp(*p) - want) < 1e-25
    assert abs(evaluate_series(*p, 5) - float(want)) < 1e-15


def _E(m1, m2, a1, a2, r):
    return eq5_integral_mp(m1, m2, a1, a2, r)


@pytest.mark.parametrize("p", [(0.6, -1.3, 0.9, 1.7, 0.35), (-1.2, 0.4, 0.3, 0.8, -0.85)])
def test_lemma4_identities(p) -> None:
    m1, m2, a1, a2, r = p
    mpmath.mp.dps = 30
    try:
        _identities(m1, m2, a1, a2, r)
    finally:
        mpmath.mp.dps = 15


def _identities(m1, m2, a1, a2, r) -> None:
    e = _E(m1, m2, a1, a2, r)
    assert abs(e - _E(m2, m1, a2, a1, r)) < 1e-25  # swap (μ1,σ1) <-> (μ2,σ2)
    # E[x1⁺ x2] = μ2 E[x1⁺] + ρσ1σ2 Φ(μ1/σ1)
    m, s = mpmath.mpf(m1), mpmath.mpf(a1)
    lin = m2 * relu_mean_mp(m1, a1) + mpmath.mpf(r) * s * a2 * mpmath.ncdf(m / s)
    assert abs(e - _E(m1, -m2, a1, a2, -r) - lin) < 1e-25
    # E[x1 x2] = μ1μ2 + ρσ1σ2 from the four sign patterns
    four = e - _E(m1, -m2, a1, a2, -r) - _E(-m1, m2, a1, a2, -r) + _E(-m1, -m2, a1, a2, r)
    assert abs(four - (m * m2 + mpmath.mpf(r) * s * a2)) < 1e-25


@pytest.mark.slow
@pytest.mark.parametrize("p", [(0.6, -1.3, 0.9, 1.7, 0.35), (-2.0, -2.0, 0.2, 0.2, 0.3)])
def test_definition_oracle_identities(p) -> None:
    m1, m2, a1, a2, r = p

    def E(*q):
        return cross_moment_definition_mp(*q, dps=20)

    e = E(*p)
    assert abs(e - E(m2, m1, a2, a1, r)) <= 1e-18 * max(abs(e), 1e-30)
    lin = m2 * relu_mean_mp(m1, a1) + r * a1 * a2 * mpmath.ncdf(mpmath.mpf(m1) / a1)
    assert abs(e - E(m1, -m2, a1, a2, -r) - lin) < 1e-18
    assert abs(e - eq5_integral_mp(*p)) < 1e-18 * max(1, abs(e)) + 1e-60


@pytest.mark.slow
@pytest.mark.parametrize("p", [*GRID, (0.7, -1.1, 1.3, 0.4, 0.9), (1.5, 0.5, 0.6, 1.2, -0.8)])
def test_series_vs_definition_grid(p) -> None:
    ref = cross_moment_definition_mp(*p, dps=15)
    assert abs(evaluate_series(*p, 50) - float(ref)) < 1e-12


def test_series_branches_symbolic_structure() -> None:
    e1, e2 = series_branches(*SYMBOLS, 3)
    assert e1.has(HermiteH) and e2.has(HermiteH)
    assert not e1.has(sp.hermite)
    # branch 1 has no 1/ρ: finite at ρ = 0 symbolically
    val = e1.subs(SYMBOLS[4], 0)
    assert val.is_finite is not False and not val.has(sp.zoo, sp.nan)
    assert math.isfinite(evaluate_series(0.1, 0.2, 1.0, 1.0, 0.0, 3))
