"""Symbolic special functions shared by the derivations.

``Phi`` (standard normal CDF) and ``phi`` (standard normal PDF) are SymPy ``Function``
classes so that the printers in ``nmgen.printers`` can map them to numerically careful
library calls (``scipy.special.ndtr``, ``torch.special.ndtr``) instead of the textbook
``(1 + erf(x/sqrt(2)))/2``, which loses all relative accuracy for x << 0.
``BVN`` is the bivariate standard normal CDF Φ2(h, k; ρ) = P(Z1 < h, Z2 < k); it is
printed as a call to the generated ``bivariate_normal_cdf``.
"""

from __future__ import annotations

import sympy as sp


class Phi(sp.Function):
    """Standard normal CDF Φ(x) = (1 + erf(x/√2))/2."""

    nargs = 1

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        return phi(self.args[0])

    def _eval_rewrite_as_erf(self, x, **kwargs):
        return (1 + sp.erf(x / sp.sqrt(2))) / 2

    def _eval_rewrite_as_erfc(self, x, **kwargs):
        return sp.erfc(-x / sp.sqrt(2)) / 2

    def _eval_evalf(self, prec):
        return ((1 + sp.erf(self.args[0] / sp.sqrt(2))) / 2)._eval_evalf(prec)


class phi(sp.Function):
    """Standard normal PDF φ(x) = exp(−x²/2)/√(2π)."""

    nargs = 1

    @classmethod
    def eval(cls, x):
        if x.could_extract_minus_sign():  # φ is even: one canonical form helps CSE
            return cls(-x)
        return None

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        x = self.args[0]
        return -x * phi(x)

    def _eval_rewrite_as_exp(self, x, **kwargs):
        return sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)

    def _eval_evalf(self, prec):
        return (sp.exp(-(self.args[0] ** 2) / 2) / sp.sqrt(2 * sp.pi))._eval_evalf(prec)


class BVN(sp.Function):
    """Bivariate standard normal CDF Φ2(h, k; ρ) (printed as a call; differentiable symbolically).

    ∂Φ2/∂h = φ(h)Φ((k − ρh)/√(1−ρ²)), ∂Φ2/∂k likewise, ∂Φ2/∂ρ = φ2(h, k; ρ) (Plackett).
    """

    nargs = 3

    def fdiff(self, argindex: int = 1) -> sp.Expr:
        h, k, r = self.args
        s = sp.sqrt(1 - r**2)
        if argindex == 1:
            return phi(h) * Phi((k - r * h) / s)
        if argindex == 2:
            return phi(k) * Phi((h - r * k) / s)
        return sp.exp(-(h**2 - 2 * r * h * k + k**2) / (2 * s**2)) / (2 * sp.pi * s)


def to_elementary(expr: sp.Expr) -> sp.Expr:
    """Rewrite Φ and φ in terms of erf and exp (for symbolic proofs)."""
    return expr.replace(Phi, lambda x: (1 + sp.erf(x / sp.sqrt(2))) / 2).replace(
        phi, lambda x: sp.exp(-(x**2) / 2) / sp.sqrt(2 * sp.pi)
    )


class _RuntimeCall(sp.Function):
    """A quantity evaluated by ``nmruntime.relu_pair`` (printed as a call to ``_name``).

    Derived in ``derivations/cross_covariance.py`` (integral forms with positive integrands,
    Gauss–Legendre nodes from mpmath) and verified against the mpmath references.
    """

    call_name = ""


class ReluMomentsMS(_RuntimeCall):
    """(E[relu(μ + σZ)], E[relu(μ + σZ)²], Var[relu(μ + σZ)]) for σ > 0, each relatively
    accurate (in the negative tail too): one evaluation, whose entries the kernels take by
    ``Item`` (``relu_mean_ms``, ``relu_second_ms``, ``relu_var_ms``)."""

    nargs = 2
    call_name = "_relu_moments"


class Item(sp.Function):
    """Entry ``i`` (an integer) of a tuple-valued runtime call, printed ``call[i]``. A kernel
    that takes two entries of one call with the same arguments evaluates it once
    (``sympy.cse`` names the call). ``relu_mean_variance`` made two calls, each computing all
    three moments: 1.90 ms for 1,024 variables (float64, 1 thread) against 0.95 ms with one,
    1.65 vs 0.81 ms for 128 (medians of 41 interleaved calls)."""

    nargs = 2


def relu_mean_ms(m: sp.Expr, s: sp.Expr) -> sp.Expr:
    """E[relu(μ + σZ)] for σ > 0 (relatively accurate in the negative tail)."""
    return Item(ReluMomentsMS(m, s), 0)


def relu_second_ms(m: sp.Expr, s: sp.Expr) -> sp.Expr:
    """E[relu(μ + σZ)²] for σ > 0."""
    return Item(ReluMomentsMS(m, s), 1)


def relu_var_ms(m: sp.Expr, s: sp.Expr) -> sp.Expr:
    """Var[relu(μ + σZ)] for σ > 0."""
    return Item(ReluMomentsMS(m, s), 2)


class ReluCovStd(_RuntimeCall):
    """C(h, k, ρ) = Cov[(h + Z1)⁺, (k + Z2)⁺] = ∫_0^ρ Φ2(h, k; r) dr."""

    nargs = 3
    call_name = "_relu_cov"


class ReluCrossMS(_RuntimeCall):
    """E[relu(x1) relu(x2)] for σ1, σ2 > 0 (args μ1, μ2, σ1, σ2, ρ)."""

    nargs = 5
    call_name = "_relu_cross"


RUNTIME_CALLS = (ReluMomentsMS, ReluCovStd, ReluCrossMS)
