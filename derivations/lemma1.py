"""Lemma 1: the second moment and variance of a ReLU of a Gaussian.

Paper (zero mean): E[max²(x, 0)] = σ²/2. General mean (ours, same derivation), h = μ/σ:

    E[max(x, 0)²] = (μ² + σ²) Φ(h) + μσ φ(h).

Variance. Writing m(h) = hΦ(h) + φ(h) (so E[max(x,0)] = σ m(h)), the identity
(h² + 1)Φ(h) + hφ(h) = Φ(h) + h m(h) and h − m(h) = −m(−h) give

    Var[max(x, 0)] = σ² (Φ(h) − m(h) m(−h)),

which, unlike "second moment − mean²", does not subtract two numbers ≈ μ² when h ≫ 0
(proved equal below). σ = 0: relu(μ)², variance 0. For h < −2 both forms cancel; the kernels
use E[max(x,0)²] = σ²φ(x)·2R(x)F(x)/D(x) (x = −h, Mills ratio R, continued fraction F, D, see
``nmruntime/relu_pair.py``) and Var = second moment − mean² (mean² < 2% of it there).
"""

from __future__ import annotations

import sympy as sp

from .functions import Phi, phi, relu_mean_ms, relu_second_ms, relu_var_ms, to_elementary
from .reference import relu_mean_ref, relu_second_moment_ref, relu_variance_ref
from .spec import ArgSpec, Case, KernelSpec
from .theorem1 import gaussian_density, relu_mean_expr

mu = sp.Symbol("mu", real=True)
sigma = sp.Symbol("sigma", positive=True)
x = sp.Symbol("x", real=True)
h = mu / sigma


def m_of(t: sp.Expr) -> sp.Expr:
    """m(t) = tΦ(t) + φ(t) = E[max(z + t, 0)], z ~ N(0, 1)."""
    return t * Phi(t) + phi(t)


relu_second_moment_expr = (mu**2 + sigma**2) * Phi(h) + mu * sigma * phi(h)
relu_variance_expr = sigma**2 * (Phi(h) - m_of(h) * m_of(-h))


def check_zero_mean() -> bool:
    """Lemma 1 as printed: μ = 0 gives σ²/2 (from the definition by SymPy integration)."""
    integral = sp.integrate(x**2 * gaussian_density(x, 0, sigma), (x, 0, sp.oo))
    assert sp.simplify(integral - sigma**2 / 2) == 0
    assert sp.simplify(to_elementary(relu_second_moment_expr.subs(mu, 0)) - sigma**2 / 2) == 0
    return True


def check_definition() -> bool:
    """∫_0^∞ x² N(x; μ, σ²) dx equals the general-mean second moment."""
    integral = sp.integrate(x**2 * gaussian_density(x, mu, sigma), (x, 0, sp.oo), conds="none")
    diff = sp.simplify(sp.expand_func(integral - to_elementary(relu_second_moment_expr)))
    assert diff == 0, f"second moment mismatch: {diff}"
    return True


def check_variance_identity() -> bool:
    """σ²(Φ(h) − m(h)m(−h)) = E[max²] − E[max]² (uses Φ(−h) = 1 − Φ(h), φ even)."""
    lhs = relu_variance_expr
    rhs = relu_second_moment_expr - relu_mean_expr**2
    diff = sp.expand(lhs - rhs).subs(Phi(-h), 1 - Phi(h)).subs(phi(-h), phi(h))
    assert sp.simplify(sp.expand(diff)) == 0, f"variance identity fails: {diff}"
    return True


CHECKS = (check_zero_mean, check_definition, check_variance_identity)

_m, _s = sp.symbols("mu sigma", real=True)
_sub = {mu: _m, sigma: _s}


def _scale2(m: float, s: float) -> float:
    return (abs(m) + s) ** 2


def _mean_var_ref(m, s):
    return relu_mean_ref(m, s), relu_variance_ref(m, s)


def _mean_var_scale(m: float, s: float) -> tuple[float, float]:
    return abs(m) + s, (abs(m) + s) ** 2


_ARGS = (ArgSpec(_m, "real"), ArgSpec(_s, "nonneg"))
_SAFE = {_s: 1.0}

KERNELS = (
    KernelSpec(
        name="relu_second_moment",
        args=_ARGS,
        cases=(
            Case(relu_second_ms(_m, _s), _s > 0, _SAFE, "σ > 0 (tail-exact form below μ/σ = −2)"),
            Case(sp.Max(_m, 0) ** 2, sp.true, {}, "σ = 0: relu(μ)²"),
        ),
        doc="E[max(x, 0)²] for x ~ N(mu, sigma²).",
        source="derivations/lemma1.py",
        equation="Lemma 1 (general mean)",
        reference=relu_second_moment_ref,
        scale=_scale2,
        grid="single",
    ),
    KernelSpec(
        name="relu_variance",
        args=_ARGS,
        cases=(
            Case(
                relu_var_ms(_m, _s),
                _s > 0,
                _SAFE,
                "σ > 0: σ²(Φ(h) − m(h)m(−h)); below μ/σ = −2 second moment − mean²",
            ),
            Case(sp.Integer(0), sp.true, {}, "σ = 0: no variance"),
        ),
        doc="Var[max(x, 0)] for x ~ N(mu, sigma²).",
        source="derivations/lemma1.py",
        equation="Lemma 1 (general mean) and Theorem 1",
        reference=relu_variance_ref,
        scale=_scale2,
        grid="single",
    ),
    KernelSpec(
        name="relu_mean_variance",
        args=_ARGS,
        cases=(
            Case((relu_mean_ms(_m, _s), relu_var_ms(_m, _s)), _s > 0, _SAFE, "σ > 0"),
            Case((sp.Max(_m, 0), sp.Integer(0)), sp.true, {}, "σ = 0"),
        ),
        doc="(E[max(x, 0)], Var[max(x, 0)]) for x ~ N(mu, sigma²), sharing one CSE.",
        source="derivations/lemma1.py",
        equation="Theorem 1 and Lemma 1",
        output_names=("mean", "variance"),
        reference=_mean_var_ref,
        scale=_mean_var_scale,
        grid="single",
    ),
)
