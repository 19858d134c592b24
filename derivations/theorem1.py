"""Remark 1 and Theorem 1: the mean of a ReLU of a Gaussian, and of g(x) = B relu(Ax+c1) + c2.

Result (any μ, σ > 0), with h = μ/σ:

    E[max(x, 0)] = μ Φ(h) + σ φ(h),        x ~ N(μ, σ²).

The paper prints it as ½μ − ½μ erf(−μ/(√2σ)) + σ/√(2π) exp(−μ²/(2σ²)) (Theorem 1); both
forms are proved equal below. Remark 1's special case μ = 0 gives σ/√(2π). Theorem 1 follows
by linearity: E[g_i] = Σ_v B(i, v) E[max(z_v, 0)] + c2(i), z = Ax + c1 ~ N(Aμx + c1, AΣxAᵀ).

The kernel uses ``Phi`` (printed as ``ndtr``) rather than ½(1 − erf(−h/√2)): ``ndtr`` keeps
relative accuracy for h ≪ 0, where 1 + erf(·) cancels. Below h = −2 even μΦ(h) + σφ(h)
cancels (≈ h² digits lost); the kernel then uses σφ(x)R(x)F(x), x = −h, with the Mills ratio
R (erfcx) and F = 1/R − x from Laplace's continued fraction (derivations/cross_covariance.py,
``nmruntime/relu_pair.py``). σ = 0 is the deterministic limit relu(μ).
"""

from __future__ import annotations

import sympy as sp

from .functions import Phi, phi, relu_mean_ms, to_elementary
from .reference import relu_mean_ref
from .spec import ArgSpec, Case, KernelSpec

mu = sp.Symbol("mu", real=True)
sigma = sp.Symbol("sigma", positive=True)
x = sp.Symbol("x", real=True)

h = mu / sigma
relu_mean_expr = mu * Phi(h) + sigma * phi(h)
paper_theorem1_expr = (
    mu / 2
    - mu / 2 * sp.erf(-mu / (sp.sqrt(2) * sigma))
    + sigma / sp.sqrt(2 * sp.pi) * sp.exp(-(mu**2) / (2 * sigma**2))
)


def gaussian_density(t: sp.Expr, m: sp.Expr, s: sp.Expr) -> sp.Expr:
    """N(m, s²) density at t."""
    return sp.exp(-((t - m) ** 2) / (2 * s**2)) / (sp.sqrt(2 * sp.pi) * s)


def check_definition() -> bool:
    """∫_0^∞ x N(x; μ, σ²) dx simplifies to the kernel expression (SymPy integration)."""
    integral = sp.integrate(x * gaussian_density(x, mu, sigma), (x, 0, sp.oo), conds="none")
    diff = sp.simplify(sp.expand_func(integral - to_elementary(relu_mean_expr)))
    assert diff == 0, f"Theorem 1 mismatch: {diff}"
    return True


def check_paper_form() -> bool:
    """The paper's printed Theorem 1 summand equals μΦ(h) + σφ(h)."""
    diff = sp.simplify(to_elementary(relu_mean_expr) - paper_theorem1_expr)
    assert diff == 0, f"paper form differs: {diff}"
    return True


def check_remark1() -> bool:
    """Remark 1: μ = 0 gives σ/√(2π)."""
    assert sp.simplify(to_elementary(relu_mean_expr.subs(mu, 0)) - sigma / sp.sqrt(2 * sp.pi)) == 0
    return True


CHECKS = (check_definition, check_paper_form, check_remark1)

_m, _s = sp.symbols("mu sigma", real=True)


def _scale(m: float, s: float) -> float:
    return abs(m) + s


KERNELS = (
    KernelSpec(
        name="relu_mean",
        args=(ArgSpec(_m, "real"), ArgSpec(_s, "nonneg")),
        cases=(
            Case(
                relu_mean_ms(_m, _s),
                _s > 0,
                {_s: 1.0},
                "σ > 0: μΦ(μ/σ) + σφ(μ/σ) (μ/σ ≥ −2), continued-fraction tail form below",
            ),
            Case(sp.Max(_m, 0), sp.true, {}, "σ = 0: deterministic limit relu(μ)"),
        ),
        doc="E[max(x, 0)] for x ~ N(mu, sigma²).",
        source="derivations/theorem1.py",
        equation="Remark 1 / Theorem 1",
        reference=relu_mean_ref,
        scale=_scale,
        grid="single",
    ),
)
