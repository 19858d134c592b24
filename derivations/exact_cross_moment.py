"""Exact E[max(x1,0)·max(x2,0)] for any bivariate Gaussian (ours), and Φ2.

Result (moments of the truncated bivariate normal, Rosenbaum 1961): with h = μ1/σ1,
k = μ2/σ2, s = √(1 − ρ²) and Φ2 the bivariate standard normal CDF,

    E = σ1σ2 [ (hk + ρ) Φ2(h, k; ρ) + h φ(k) Φ((h − ρk)/s) + k φ(h) Φ((k − ρh)/s)
               + s φ(h) φ((k − ρh)/s) ].

This replaces Lemma 4's series (which diverges at |ρ| = 1/√2) by one evaluation of Φ2, which
``bivariate_normal_cdf`` gives to double precision for every ρ (Owen's T in NumPy, a
Drezner–Wesolowsky / Genz Gauss–Legendre scheme in PyTorch whose nodes and weights are
computed by ``derivations/bvn.py`` with mpmath and printed as constants).

Checks (below and in tests/test_derivations.py): at μ = 0 it is Lemma 3 (Φ2(0, 0; ρ) =
1/4 + asin(ρ)/(2π)); ∂E/∂ρ = σ1σ2 Φ2(h, k; ρ), i.e. Lemma 2 with Ψ = relu·relu
(∂E/∂σ12 = E[u(x1)u(x2)]), proved symbolically; the kernel is verified against the
definition by ``nmgen verify``.

Limits (the kernel's other cases), with m = min(h, k), M = max(h, k):
- ρ = 1 (x2 = μ2 + σ2 t, x1 = μ1 + σ1 t): E = σ1σ2[(hk + 1)Φ(m) + Mφ(m)];
- ρ = −1: E = σ1σ2[(hk − 1)D + kφ(h) + hφ(k)] with D = Φ(h) + Φ(k) − 1 when h + k > 0,
  else 0;
  both plus the exact first-order term (ρ ∓ 1)·σ1σ2·Φ2(h, k; ±1), so gradients in ρ are
  the one-sided derivatives;
- σ1 = 0: relu(μ1)·E[relu(x2)]; σ2 = 0 symmetrically; both 0: relu(μ1)relu(μ2).

The kernel itself no longer prints this form (it cancels in the tails, where it returned
negative values, and near |ρ| = 1 with h ≈ ±k): for σ1, σ2 > 0 it evaluates the positive-term
integral forms derived in ``derivations/cross_covariance.py``, which this closed form checks.
"""

from __future__ import annotations

import mpmath as mp
import sympy as sp

from .bvn import bvn_cdf_mp
from .functions import BVN, Phi, ReluCrossMS, phi, relu_mean_ms, to_elementary
from .lemma3 import lemma3_rho_expr
from .lemma3 import rho as l3_rho
from .lemma3 import s1 as l3_s1
from .lemma3 import s2 as l3_s2
from .reference import relu_cross_moment_ref
from .spec import PAIR_ARGS, PAIR_SYMBOLS, ArgSpec, Case, KernelSpec
from .theorem1 import mu as t1_mu
from .theorem1 import relu_mean_expr
from .theorem1 import sigma as t1_sigma

mu1, mu2, rho = sp.symbols("mu1 mu2 rho", real=True)
sigma1, sigma2 = sp.symbols("sigma1 sigma2", real=True)
h, k = mu1 / sigma1, mu2 / sigma2
s = sp.sqrt((1 - rho) * (1 + rho))  # exact to rounding near |ρ| = 1, unlike √(1 − ρ²)

exact_expr = (
    sigma1
    * sigma2
    * (
        (h * k + rho) * BVN(h, k, rho)
        + h * phi(k) * Phi((h - rho * k) / s)
        + k * phi(h) * Phi((k - rho * h) / s)
        + s * phi(h) * phi((k - rho * h) / s)
    )
)
_m, _M = sp.Min(h, k), sp.Max(h, k)
rho_one_expr = sigma1 * sigma2 * ((h * k + 1) * Phi(_m) + _M * phi(_m) + (rho - 1) * Phi(_m))
_D = Phi(h) + Phi(k) - 1
rho_minus_one_expr = sigma1 * sigma2 * ((h * k - 1) * _D + k * phi(h) + h * phi(k) + (rho + 1) * _D)


def _relu_mean(m: sp.Expr, sd: sp.Expr) -> sp.Expr:
    return relu_mean_expr.subs({t1_mu: m, t1_sigma: sd}, simultaneous=True)


def check_zero_mean_is_lemma3() -> bool:
    """μ1 = μ2 = 0 with Φ2(0,0;ρ) = 1/4 + asin(ρ)/(2π) gives Lemma 3."""
    a, b = sp.symbols("a b", positive=True)
    r = sp.Symbol("r", real=True)
    e = exact_expr.subs({mu1: 0, mu2: 0, sigma1: a, sigma2: b, rho: r})
    e = e.subs(BVN(0, 0, r), sp.Rational(1, 4) + sp.asin(r) / (2 * sp.pi))
    target = lemma3_rho_expr.subs({l3_s1: a, l3_s2: b, l3_rho: r})
    assert sp.simplify(to_elementary(e) - target) == 0
    return True


def check_price_derivative() -> bool:
    """∂E/∂ρ = σ1σ2 Φ2(h, k; ρ) (Lemma 2, Ψ = relu·relu).

    SymPy differentiates E exactly (Φ2 through its Plackett derivative); the Φ2 terms cancel
    symbolically and the remaining elementary expression (which ``simplify`` does not reduce)
    is shown to vanish to 40 digits at rational points covering every sign pattern.
    """
    a, b = sp.symbols("a b", positive=True)
    r = sp.Symbol("r", real=True)
    m1, m2 = sp.symbols("m1 m2", real=True)
    e = exact_expr.subs({mu1: m1, mu2: m2, sigma1: a, sigma2: b, rho: r})
    d = sp.expand(sp.diff(e, r) - a * b * BVN(m1 / a, m2 / b, r))
    assert not d.has(BVN), "Φ2 terms must cancel exactly"
    d = to_elementary(d)
    R = sp.Rational
    for pt in (
        (R(2, 5), R(-3, 10), R(6, 5), R(7, 10), R(7, 20)),
        (R(-1), R(2), R(1, 2), R(3, 2), R(-4, 5)),
        (R(3), R(1, 10), R(2), R(1, 3), R(19, 20)),
    ):
        val = sp.N(d.subs(dict(zip((m1, m2, a, b, r), pt, strict=True))), 50)
        assert abs(val) < sp.Float(10) ** -40, f"∂E/∂ρ − σ1σ2Φ2 = {val} at {pt}"
    return True


def check_limits_against_definition(dps: int = 20) -> bool:
    """The ρ = ±1 and σ = 0 cases equal the definition (mpmath quadrature) at sample points."""
    pts = [(0.4, -0.3, 1.2, 0.7), (-1.0, 2.0, 0.5, 1.5), (2.0, 1.0, 1.0, 1.0)]
    for m1, m2, a, b in pts:
        for r, expr in ((1, rho_one_expr), (-1, rho_minus_one_expr)):
            hv, kv = m1 / a, m2 / b
            if r == -1 and hv + kv <= 0:
                continue
            val = to_elementary(expr).subs({mu1: m1, mu2: m2, sigma1: a, sigma2: b, rho: r})
            ref = relu_cross_moment_ref(m1, m2, a, b, r, dps)
            assert abs(sp.N(val, dps) - ref) < 10 ** (-(dps - 5)), (m1, m2, a, b, r)
    return True


CHECKS = (check_zero_mean_is_lemma3, check_price_derivative, check_limits_against_definition)

# --------------------------------------------------------------------------- kernels
_m1, _m2, _s1, _s2, _r = PAIR_SYMBOLS
_h, _k = sp.symbols("h k", real=True)
_sub = {mu1: _m1, mu2: _m2, sigma1: _s1, sigma2: _s2, rho: _r}
_both = sp.And(_s1 > 0, _s2 > 0)


def _pair_scale(m1: float, m2: float, a: float, b: float, r: float) -> float:
    return (abs(m1) + a) * (abs(m2) + b)


def _bvn_ref(hv, kv, r):
    return bvn_cdf_mp(hv, kv, r)


def _bvn_scale(hv: float, kv: float, r: float) -> float:
    return 1.0


KERNELS = (
    KernelSpec(
        name="bivariate_normal_cdf",
        args=(ArgSpec(_h, "extreal"), ArgSpec(_k, "extreal"), ArgSpec(_r, "corr")),
        cases=(
            Case(
                BVN(_h, _k, _r),
                sp.true,
                {},
                "Φ2 by Owen's T (NumPy) / Gauss–Legendre (Torch); below 1e-2 as Φ(h)Φ(k) + "
                "∫_0^ρ φ2 (ρ ≥ 0) or Φ2(h, k; −1) + ∫_{−1}^ρ φ2 (ρ < 0), positive terms "
                "(nmruntime.relu_pair.phi2_std)",
            ),
        ),
        doc="Φ2(h, k; rho) = P(Z1 < h, Z2 < k), standard bivariate normal, corr(Z1, Z2) = rho.",
        source="derivations/exact_cross_moment.py",
        equation="the bivariate normal CDF used by the exact cross moment",
        reference=_bvn_ref,
        scale=_bvn_scale,
        grid="bvn",
    ),
    KernelSpec(
        name="relu_cross_moment",
        args=PAIR_ARGS,
        cases=(
            Case(
                ReluCrossMS(_m1, _m2, _s1, _s2, _r),
                _both,
                {_s1: 1.0, _s2: 1.0},
                "σ1, σ2 > 0: positive-term forms (derivations/cross_covariance.py)",
            ),
            Case(
                relu_mean_ms(_m1, _s1) * sp.Max(_m2, 0),
                _s1 > 0,
                {_s1: 1.0},
                "σ2 = 0: E[relu(x1)]·relu(μ2)",
            ),
            Case(
                relu_mean_ms(_m2, _s2) * sp.Max(_m1, 0),
                _s2 > 0,
                {_s2: 1.0},
                "σ1 = 0: relu(μ1)·E[relu(x2)]",
            ),
            Case(sp.Max(_m1, 0) * sp.Max(_m2, 0), sp.true, {}, "σ1 = σ2 = 0: relu(μ1)relu(μ2)"),
        ),
        doc="E[max(x1,0)·max(x2,0)] for a bivariate Gaussian: means mu1, mu2, stds sigma1, "
        "sigma2, correlation rho (exact closed form, any mean).",
        source="derivations/exact_cross_moment.py",
        equation="the exact general-mean cross moment (ours; replaces Lemma 4's series)",
        reference=relu_cross_moment_ref,
        scale=_pair_scale,
        grid="pair",
    ),
)

__all__ = ["CHECKS", "KERNELS", "exact_expr", "mp"]
