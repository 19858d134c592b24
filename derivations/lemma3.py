"""Lemma 3: E[max(x1,0)·max(x2,0)] for a zero-mean bivariate Gaussian.

With σ12 = Cov(x1, x2) = ρσ1σ2 (paper's statement, Section 3.2 and Appendix):

    E[relu(x1) relu(x2)] = (σ12 asin(σ12/(σ1σ2)) + σ1σ2 √(1 − σ12²/(σ1²σ2²)))/(2π) + σ12/4.

Proof route of the paper: Lemma 2 with p = 4 gives the PDE (16)
∂²E/∂σ12² = E[δ(x1)δ(x2)] = 1/(2πσ1σ2√(1 − σ12²/(σ1σ2)²)) with boundary conditions
E|σ12=0 = σ1σ2/(2π) (independence, Remark 1) and ∂E/∂σ12|σ12=0 = E[u(x1)]E[u(x2)] = 1/4.
All three are checked symbolically below, and integrating the PDE twice is checked to
reproduce the formula. Correction to the printed paper: Eq. (16) prints the square root as
√(1 − σ12²/σ1σ2); it is √(1 − σ12²/(σ1σ2)²).

Kernel in terms of ρ: σ1σ2[(ρ asin ρ + √(1 − ρ²))/(2π) + ρ/4]. Its ρ-derivative is
σ1σ2(asin ρ/(2π) + 1/4), finite at |ρ| = 1, but autograd of the two terms separately gives
∞ − ∞ there; the kernel therefore uses the exact first-order expansion at ρ = ±1
(value σ1σ2/2 and slope σ1σ2/2 at ρ = 1, value 0 and slope 0 at ρ = −1), so both the value
and its gradient are exact at the end points.

Near ρ = −1 the two terms cancel (the value is O((1 + ρ)^{3/2}): 6.6e-6 relative error at
ρ = −(1 − 1e-8) in float64, negative values in float32). With α = acos(−ρ) = π − acos ρ,
√(1 − ρ²) = sin α and ρ = −cos α, so E = σ1σ2 (sin α − α cos α)/(2π) = σ1σ2/(2π) ∫_0^α x sin x dx,
whose Taylor series Σ_{n≥1} (−1)^{n+1} 2n α^{2n+1}/(2n+1)! has terms falling by ≥ 10× for
α ≤ 1 (ρ ≤ −cos 1): the kernel uses its first ``SERIES_TERMS`` terms there (truncation
< 1e-25 relative, ``check_small_alpha_series``); acos(−ρ) is exact to rounding since 1 + ρ is.
"""

from __future__ import annotations

import sympy as sp

from .reference import relu_cross_moment_zero_mean_ref
from .spec import ArgSpec, Case, KernelSpec

s1, s2 = sp.symbols("sigma1 sigma2", positive=True)
s12 = sp.Symbol("sigma12", real=True)
rho = sp.Symbol("rho", real=True)

lemma3_expr = (s12 * sp.asin(s12 / (s1 * s2)) + s1 * s2 * sp.sqrt(1 - s12**2 / (s1**2 * s2**2))) / (
    2 * sp.pi
) + s12 / 4
lemma3_rho_expr = s1 * s2 * ((rho * sp.asin(rho) + sp.sqrt(1 - rho**2)) / (2 * sp.pi) + rho / 4)
# Printed form: √((1 − ρ)(1 + ρ)) is exact to rounding near |ρ| = 1, where 1 − ρ² cancels.
lemma3_kernel_expr = (
    s1 * s2 * ((rho * sp.asin(rho) + sp.sqrt((1 - rho) * (1 + rho))) / (2 * sp.pi) + rho / 4)
)


#: Terms of the α-series used for −1 < ρ < −cos 1.
SERIES_TERMS = 12
_alpha = sp.Symbol("alpha", positive=True)
alpha_series = sum(
    (-1) ** (n + 1) * 2 * n * _alpha ** (2 * n + 1) / sp.factorial(2 * n + 1)
    for n in range(1, SERIES_TERMS + 1)
)


def check_small_alpha_series() -> bool:
    """sin α − α cos α = Σ (−1)^{n+1} 2n α^{2n+1}/(2n+1)!, equal to the ρ form at ρ = −cos α, and
    the first omitted term at α = 1 is < 1e-25 of the value."""
    exact = sp.sin(_alpha) - _alpha * sp.cos(_alpha)
    full = sp.series(exact, _alpha, 0, 2 * SERIES_TERMS + 3).removeO()
    assert sp.expand(full - alpha_series) == 0
    r_form = lemma3_rho_expr.subs(rho, -sp.cos(_alpha)) / (s1 * s2)
    assert (
        sp.simplify(sp.expand_trig(r_form - exact / (2 * sp.pi)).subs(_alpha, sp.Rational(1, 3)))
        == 0
    )
    n = SERIES_TERMS + 1
    nxt = 2 * n / sp.factorial(2 * n + 1)
    assert nxt / exact.subs(_alpha, 1) < sp.Float("1e-25")
    return True


def check_boundary_conditions() -> bool:
    """E|σ12=0 = σ1σ2/(2π), ∂E/∂σ12|σ12=0 = 1/4, and ∂²E/∂σ12² = PDE (16) right-hand side."""
    assert sp.simplify(lemma3_expr.subs(s12, 0) - s1 * s2 / (2 * sp.pi)) == 0
    assert sp.simplify(sp.diff(lemma3_expr, s12).subs(s12, 0) - sp.Rational(1, 4)) == 0
    pde_rhs = 1 / (2 * sp.pi * s1 * s2 * sp.sqrt(1 - s12**2 / (s1 * s2) ** 2))
    assert sp.simplify(sp.diff(lemma3_expr, s12, 2) - pde_rhs) == 0
    return True


def check_pde_solution() -> bool:
    """Integrating PDE (16) twice with the boundary conditions reproduces Lemma 3.

    First integral: F(y) = 1/4 + σ1σ2 asin(y/(σ1σ2))/(2π)·(1/(σ1σ2)) has F' = PDE right side and
    F(0) = 1/4; second: Lemma 3 has derivative F and value σ1σ2/(2π) at 0 (fundamental theorem of
    calculus, so no indefinite integration with branch conditions is needed).
    """
    first = sp.Rational(1, 4) + sp.asin(s12 / (s1 * s2)) / (2 * sp.pi)
    pde_rhs = 1 / (2 * sp.pi * s1 * s2 * sp.sqrt(1 - s12**2 / (s1 * s2) ** 2))
    assert sp.simplify(sp.diff(first, s12) - pde_rhs) == 0
    assert first.subs(s12, 0) == sp.Rational(1, 4)
    assert sp.simplify(sp.diff(lemma3_expr, s12) - first) == 0
    assert sp.simplify(lemma3_expr.subs(s12, 0) - s1 * s2 / (2 * sp.pi)) == 0
    return True


def check_rho_form() -> bool:
    """The ρ-parameterised kernel equals the σ12 form with σ12 = ρσ1σ2, |ρ| < 1."""
    r = sp.Symbol("r", positive=True)
    diff = lemma3_expr.subs(s12, r * s1 * s2) - lemma3_rho_expr.subs(rho, r)
    assert sp.simplify(diff) == 0
    assert sp.simplify(sp.expand(lemma3_kernel_expr - lemma3_rho_expr)) == 0
    return True


def check_endpoint_expansions() -> bool:
    """Value and ρ-slope at ρ = ±1 used by the kernel's end-point cases."""
    for end, value, slope in ((1, s1 * s2 / 2, s1 * s2 / 2), (-1, 0, 0)):
        assert sp.simplify(sp.limit(lemma3_rho_expr, rho, end) - value) == 0
        dexpr = sp.simplify(sp.diff(lemma3_rho_expr, rho))  # = σ1σ2(asin ρ/(2π) + 1/4)
        assert sp.simplify(dexpr.subs(rho, end) - slope) == 0
    return True


CHECKS = (
    check_boundary_conditions,
    check_pde_solution,
    check_rho_form,
    check_endpoint_expansions,
    check_small_alpha_series,
)

_s1, _s2, _r = sp.symbols("sigma1 sigma2 rho", real=True)


def _scale(a: float, b: float, r: float) -> float:
    return a * b


KERNELS = (
    KernelSpec(
        name="relu_cross_moment_zero_mean",
        args=(ArgSpec(_s1, "nonneg"), ArgSpec(_s2, "nonneg"), ArgSpec(_r, "corr")),
        cases=(
            Case(
                _s1 * _s2 * alpha_series.subs(_alpha, sp.acos(-_r)) / (2 * sp.pi),
                sp.And(_r > -1, _r < -0.5403023058681398),
                {_r: -0.9},
                "−1 < ρ < −cos 1: σ1σ2(sin α − α cos α)/(2π), α = acos(−ρ), as its Taylor series",
            ),
            Case(
                lemma3_kernel_expr.subs({s1: _s1, s2: _s2, rho: _r}),
                sp.Abs(_r) < 1,
                {_r: 0.0},
                "|ρ| < 1: Lemma 3",
            ),
            Case(_s1 * _s2 * _r / 2, _r > 0, {}, "ρ = 1: σ1σ2/2 + (σ1σ2/2)(ρ − 1)"),
            Case(sp.Integer(0) * _r, sp.true, {}, "ρ = −1: 0 with slope 0"),
        ),
        doc="E[max(x1,0)·max(x2,0)] for zero-mean x with stds sigma1, sigma2, corr rho.",
        source="derivations/lemma3.py",
        equation="Lemma 3",
        reference=relu_cross_moment_zero_mean_ref,
        scale=_scale,
        grid="pair_zero_mean",
    ),
)
