r"""Lemma 4: E[max(x1,0) max(x2,0)] for a general bivariate Gaussian, series form.

Result (paper Eqs. 1-3, 5, 6). For (x1, x2) ~ N([μ1, μ2], [[σ1², ρσ1σ2], [ρσ1σ2, σ2²]]),
σ1, σ2 > 0 and 0 < |ρ| < 1 (branch 1 also at ρ = 0), with
``a = ρ/√(1-ρ²)``, ``b = μ1/(√2 σ1 √(1-ρ²))``, ``κ = -μ2/(√2 σ2)``,
``s0 = aκ + b = (μ1/σ1 - ρ μ2/σ2)/(√2 √(1-ρ²))``,
``a2 = 1/|a| = √(1-ρ²)/|ρ|`` and ``b2 = -b/a = -μ1/(√2 ρ σ1)``::

    E = Ω + (μ1μ2 + ρσ1σ2)/π · (I_{a,b}(∞) - I_{a,b}(κ))                       |ρ| < 1/√2
    E = Ω + (μ1μ2 + ρσ1σ2)/π · [π/4 sign ρ - π/4 erf(s0) erf(κ)
             - sign ρ (I_{a2,b2}(∞) - I_{a2,b2}(s0 sign ρ))]                   |ρ| > 1/√2

where ``I_{a,b}(x) = (√π/2) ∫_0^x exp(-t²) erf(a t + b) dt`` is the Fayed-Atiya series
(Eq. 3, H_n = physicists' Hermite, P = regularized lower incomplete gamma)::

    I_{a,b}(x) = π/4 erf(x) erf(b) + √π/2 exp(-b²) Σ_u [ (a/2)^(2u+1)/Γ(u+3/2) P(u+1, x²) H_2u(b)
                                 - sign(x) (a/2)^(2u+2)/Γ(u+2) P(u+3/2, x²) H_(2u+1)(b) ]

and (Eq. 2, written here with Φ/φ: 1 + erf(z/√2) = 2Φ(z))::

    Ω = σ1σ2√(1-ρ²) φ(μ2/σ2) φ(h1) + μ1σ2 φ(μ2/σ2) Φ(h1) + μ2σ1 φ(μ1/σ1) Φ(h2)
        + (μ1μ2 + ρσ1σ2) Φ(μ2/σ2)/2,
    h1 = (μ1/σ1 - ρμ2/σ2)/√(1-ρ²) = e1ᵀΣ̃μ,   h2 = (μ2/σ2 - ρμ1/σ1)/√(1-ρ²) = e2ᵀΣ̃μ,

(φ(μ2/σ2) φ(h1) = exp(-μᵀΣ⁻¹μ/2)/(2π), so the first term is Eq. 2's √|Σ|/(2π) exp(...)).
The |a| < 1 series for I(∞) converges for |ρ| < 1/√2; the integration by parts of Eq. 6
swaps a -> 1/|a| and gives the |ρ| > 1/√2 branch. Near |ρ| = 1/√2 both converge slowly.

Derivation checks (all verified in tests/test_lemma4_series.py): Eq. 3 re-derived from the
Taylor series erf(b + h) = erf(b) + 2/√π e^{-b²} Σ_n (-1)^n H_n(b) h^(n+1)/(n+1)!; Eq. 6
re-derived for both signs of a; Eq. 5/Eq. 1 compared with a nested-quadrature oracle taken
straight from the definition.

Corrections to the printed paper (OCR-damaged text; each one re-derived):

- Eq. 4 (proof): the conditional mean is E[x1⁺ | x2] = (1/σ2)[√|Σ| φ(r/√|Σ|) + r Φ(r/√|Σ|)],
  i.e. the first bracket term is √|Σ|/√(2π) · exp(-r²/(2|Σ|)); the printed
  √|Σ|/(2π) · exp(+r²/(2|Σ|)) has the wrong normalisation (2π for √(2π)) and a missing minus
  sign in the exponent.
- Lemma 4 statement: Σ̃ = Diag([√|Σ|/σ2, √|Σ|/σ1]) Σ⁻¹ with the determinant |Σ| (printed
  "√Σ"); the lower-left entry of Σ is ρσ2σ1 (the ρ was lost). Then e1ᵀΣ̃μ = h1 and
  e2ᵀΣ̃μ = h2 as above.
- Constants (garbled): a1 = ρ/√(1-ρ²), b1 = μ1σ2/√(2|Σ|) = μ1/(√2 σ1 √(1-ρ²)),
  a2 = √(1-ρ²)/|ρ|, b2 = -μ1/(√2 ρ σ1) (the √2 and the minus sign of b2 are in the
  denominator/numerator as written here, not "²ρσ1").
- Eq. 5: the erf argument is (ρz + μ1/(√2σ1))/√(1-ρ²), i.e. μ1/(√2 σ1) not μ1/√2 · σ1, and
  the prefactor (μ1μ2+ρσ1σ2)/(2√π) multiplies ∫_κ^∞ exp(-z²) erf(...) dz (the underbrace
  "∫_κ^∞ φ(z) dz" is only a name for that integral, φ is not the normal pdf there).
- Eq. 3 convergence remark: for finite x the series converges for every a (P(u+1, x²) ~
  x^(2u)/u!); only the I(∞) series needs |a| < 1. Eqs. 1-2 and 6 themselves check out.
- Proposition 1 (appendix): Ω(0,0,σ1,σ2,ρ) = σ1σ2√(1-ρ²)/(2π) + ρσ1σ2/4; in Eq. 17 the
  second branch is I_{√(1-ρ²)/|ρ|, 0}(∞) (printed "√(1-ρ²)|ρ|/"); the closing remark should
  read π/2 - tan⁻¹(√(1-ρ²)/ρ) = π/2 - cos⁻¹(ρ) = sin⁻¹(ρ) for ρ > 1/√2 (printed
  "π/2 = tan⁻¹(√(1-ρ²)/2)").

Numerical arrangement (exact rewrites of the same truncated sums, no new approximation):
P is expanded into exp/erf and finite sums, and I(∞) - I(x) is formed termwise as
1 - P(u+1, x²) = exp(-x²) Σ_{k≤u} x^(2k)/k! and
1 - sign(x) P(u+3/2, x²) = erfc(x) + exp(-x²) Σ_{k≤u} x^(2k+1)/Γ(k+3/2), which needs no
sign(x) and never subtracts numbers close to 1. Ω's last term is merged with the π/4 terms:
branch 1 gives c Φ(μ2/σ2) Φ(√2 b), branch 2 gives c [Φ(μ2/σ2) Φ(√2 s0)
+ sign(ρ) erfc(s0 sign ρ) erfc(b2)/4] (c = μ1μ2 + ρσ1σ2). Branch 1 has no 1/ρ.
Hermite polynomials stay unexpanded (``HermiteH``), to be printed as library calls.
Known float64 limitation: exp(-b²) H_n(b) and exp(-x²) x^n are formed as products, which
gives 0·inf = nan once |b| or |x| exceeds ~1e3 (σ → 0 or |ρ| → 1); those limits are
handled separately by the caller.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from functools import lru_cache

import mpmath
import sympy as sp

from .functions import Phi, phi
from .spec import Loop

TERMS = (1, 5, 10, 20, 50)

mu1, mu2 = sp.symbols("mu1 mu2", real=True)
s1, s2 = sp.symbols("sigma1 sigma2", positive=True)
rho = sp.Symbol("rho", real=True)
SYMBOLS = (mu1, mu2, s1, s2, rho)


class HermiteH(sp.Function):
    """Physicists' Hermite polynomial H_n(x), kept unevaluated (n a nonnegative Integer).

    Printed as ``scipy.special.eval_hermite`` / ``torch.special.hermite_polynomial_h``;
    expanding into monomials loses all float64 precision for large n and |x|.
    Evaluates automatically only at x = 0 (H_2u(0) = (-1)^u (2u)!/u!, H_odd(0) = 0).
    """

    nargs = 2

    @classmethod
    def eval(cls, n, x):
        if n.is_Integer and n.is_negative:
            raise ValueError("HermiteH needs n >= 0")
        if n.is_Integer and x.is_zero:
            k = int(n)
            if k % 2:
                return sp.S.Zero
            return sp.Integer((-1) ** (k // 2) * sp.factorial(k) / sp.factorial(k // 2))
        return None

    def fdiff(self, argindex: int = 2) -> sp.Expr:
        if argindex != 2:
            raise sp.ArgumentIndexError(self, argindex)
        n, x = self.args
        return 2 * n * HermiteH(n - 1, x) if n != 0 else sp.S.Zero

    def _eval_evalf(self, prec):
        n, x = self.args
        if not n.is_Integer:
            return None
        xe = x._eval_evalf(prec + 20) if not x.is_Number else x
        if xe is None or not xe.is_Number:
            return None
        with mpmath.workprec(prec + 20):
            val = hermite_mp(int(n), mpmath.mpf(sp.Float(xe, precision=prec + 20)._mpf_))
        return sp.Float(val, precision=prec)

    def expand_poly(self) -> sp.Expr:
        """The explicit polynomial ``sympy.hermite(n, x)`` (for symbolic checks)."""
        return sp.hermite(*self.args)


def hermite_mp(n: int, x):
    """H_n(x) by the three-term recurrence at the current mpmath precision."""
    x = mpmath.mpf(x)
    h0, h1 = mpmath.mpf(1), 2 * x
    if n == 0:
        return h0
    for k in range(1, n):
        h0, h1 = h1, 2 * x * h1 - 2 * k * h0
    return h1


def expand_hermite(expr: sp.Expr) -> sp.Expr:
    """Replace every ``HermiteH(n, x)`` by the polynomial ``sympy.hermite(n, x)``."""
    return expr.replace(HermiteH, lambda n, x: sp.hermite(n, x))


# ----------------------------------------------------------------------------- Eq. 2


def omega(mu1: sp.Expr, mu2: sp.Expr, s1: sp.Expr, s2: sp.Expr, rho: sp.Expr) -> sp.Expr:
    """Ω of Eq. 2 (with √|Σ| = σ1σ2√(1-ρ²) and 1 + erf(z/√2) = 2Φ(z))."""
    r = sp.sqrt(1 - rho**2)
    h1 = (mu1 / s1 - rho * mu2 / s2) / r
    h2 = (mu2 / s2 - rho * mu1 / s1) / r
    return (
        s1 * s2 * r * phi(mu2 / s2) * phi(h1)
        + mu1 * s2 * phi(mu2 / s2) * Phi(h1)
        + mu2 * s1 * phi(mu1 / s1) * Phi(h2)
        + (mu1 * mu2 + rho * s1 * s2) * Phi(mu2 / s2) / 2
    )


def omega_printed(mu1: sp.Expr, mu2: sp.Expr, s1: sp.Expr, s2: sp.Expr, rho: sp.Expr) -> sp.Expr:
    """Ω exactly as Eq. 2 prints it (matrix form, erf), for cross-checking ``omega``."""
    mu = sp.Matrix([mu1, mu2])
    S = sp.Matrix([[s1**2, rho * s1 * s2], [rho * s1 * s2, s2**2]])
    det = S.det()
    Sinv = S.inv()
    St = sp.diag(sp.sqrt(det) / s2, sp.sqrt(det) / s1) * Sinv
    e1 = (St * mu)[0]
    e2 = (St * mu)[1]
    quad = (mu.T * Sinv * mu)[0]
    q2 = sp.sqrt(2)
    return (
        sp.sqrt(det) / (2 * sp.pi) * sp.exp(-quad / 2)
        + mu1
        * s2
        / (2 * sp.sqrt(2 * sp.pi))
        * sp.exp(-(mu2**2) / (2 * s2**2))
        * (1 + sp.erf(e1 / q2))
        + mu2
        * s1
        / (2 * sp.sqrt(2 * sp.pi))
        * sp.exp(-(mu1**2) / (2 * s1**2))
        * (1 + sp.erf(e2 / q2))
        + (mu1 * mu2 + rho * s1 * s2) / 4 * (1 + sp.erf(mu2 / (q2 * s2)))
    )


# ----------------------------------------------------------------------------- Eq. 3


def _coef_even(a: sp.Expr, u: int) -> sp.Expr:
    """(a/2)^(2u+1)/Γ(u+3/2)."""
    return (a / 2) ** (2 * u + 1) / sp.gamma(sp.Rational(2 * u + 3, 2))


def _coef_odd(a: sp.Expr, u: int) -> sp.Expr:
    """(a/2)^(2u+2)/Γ(u+2)."""
    return (a / 2) ** (2 * u + 2) / sp.factorial(u + 1)


def _exp_partial(x: sp.Expr, u: int) -> sp.Expr:
    """Σ_{k≤u} x^(2k)/k!  (so that 1 - P(u+1, x²) = exp(-x²) · this)."""
    return sp.Add(*[x ** (2 * k) / sp.factorial(k) for k in range(u + 1)])


def _half_partial(x: sp.Expr, u: int) -> sp.Expr:
    """Σ_{k≤u} x^(2k+1)/Γ(k+3/2)  (sign(x)P(u+3/2, x²) = erf(x) - exp(-x²) · this)."""
    return sp.Add(*[x ** (2 * k + 1) / sp.gamma(sp.Rational(2 * k + 3, 2)) for k in range(u + 1)])


def I_series(a: sp.Expr, b: sp.Expr, x: sp.Expr, terms: int) -> sp.Expr:
    """Eq. 3 truncated to u = 0..terms-1; x may be ±oo. P expanded into exp/erf sums."""
    if terms < 1:
        raise ValueError("terms must be >= 1")
    x = sp.sympify(x)
    H = HermiteH
    if x.is_infinite:
        sg = sp.sign(x)
        s = sp.Add(
            *[
                _coef_even(a, u) * H(2 * u, b) - sg * _coef_odd(a, u) * H(2 * u + 1, b)
                for u in range(terms)
            ]
        )
        return sp.pi / 4 * sg * sp.erf(b) + sp.sqrt(sp.pi) / 2 * sp.exp(-(b**2)) * s
    ex = sp.exp(-(x**2))
    s = sp.Add(
        *[
            _coef_even(a, u) * H(2 * u, b) * (1 - ex * _exp_partial(x, u))
            - _coef_odd(a, u) * H(2 * u + 1, b) * (sp.erf(x) - ex * _half_partial(x, u))
            for u in range(terms)
        ]
    )
    return sp.pi / 4 * sp.erf(x) * sp.erf(b) + sp.sqrt(sp.pi) / 2 * sp.exp(-(b**2)) * s


def I_tail_sum(a: sp.Expr, b: sp.Expr, x: sp.Expr, terms: int) -> sp.Expr:
    """The Hermite sum S of I_{a,b}(∞) - I_{a,b}(x) = π/4 erf(b) erfc(x) + √π/2 e^{-b²} S.

    S = Σ_u [(a/2)^(2u+1)/Γ(u+3/2) H_2u(b) (1 - P(u+1,x²))
             - (a/2)^(2u+2)/Γ(u+2) H_(2u+1)(b) (1 - sign(x) P(u+3/2,x²))], arranged without
    cancellation (see module docstring).
    """
    ex = sp.exp(-(x**2))
    return sp.Add(
        *[
            _coef_even(a, u) * HermiteH(2 * u, b) * ex * _exp_partial(x, u)
            - _coef_odd(a, u) * HermiteH(2 * u + 1, b) * (sp.erfc(x) + ex * _half_partial(x, u))
            for u in range(terms)
        ]
    )


def I_tail_series(a: sp.Expr, b: sp.Expr, x: sp.Expr, terms: int) -> sp.Expr:
    """I_{a,b}(∞) - I_{a,b}(x), truncated like ``I_series`` (identical value, better form)."""
    return sp.pi / 4 * sp.erf(b) * sp.erfc(x) + sp.sqrt(sp.pi) / 2 * sp.exp(-(b**2)) * (
        I_tail_sum(a, b, x, terms)
    )


# ----------------------------------------------------------------------------- Eq. 1


def series_branches(
    mu1: sp.Expr, mu2: sp.Expr, s1: sp.Expr, s2: sp.Expr, rho: sp.Expr, terms: int
) -> tuple[sp.Expr, sp.Expr]:
    """Both branches of Eq. 1, each the full E[x1⁺ x2⁺] = Ω + series term, truncated.

    First: valid for |ρ| < 1/√2 (finite at ρ = 0). Second: 1/√2 < |ρ| < 1.
    Ω's last term is merged with the π/4 erf terms (exact rewrite, see module docstring).
    """
    r = sp.sqrt(1 - rho**2)
    c = mu1 * mu2 + rho * s1 * s2
    om = omega(mu1, mu2, s1, s2, rho) - c * Phi(mu2 / s2) / 2
    kappa = -mu2 / (sp.sqrt(2) * s2)
    # branch 1
    a1 = rho / r
    b1 = mu1 / (sp.sqrt(2) * s1 * r)
    e1 = om + c * (
        Phi(mu2 / s2) * Phi(mu1 / (s1 * r))
        + sp.exp(-(b1**2)) / (2 * sp.sqrt(sp.pi)) * I_tail_sum(a1, b1, kappa, terms)
    )
    # branch 2
    sg = sp.sign(rho)
    a2 = r / sp.Abs(rho)
    b2 = -mu1 / (sp.sqrt(2) * rho * s1)
    h1 = (mu1 / s1 - rho * mu2 / s2) / r
    y = sg * h1 / sp.sqrt(2)
    e2 = om + c * (
        Phi(mu2 / s2) * Phi(h1)
        + sg * sp.erfc(y) * sp.erfc(b2) / 4
        - sg * sp.exp(-(b2**2)) / (2 * sp.sqrt(sp.pi)) * I_tail_sum(a2, b2, y, terms)
    )
    return e1, e2


def series_branches_printed(
    mu1: sp.Expr, mu2: sp.Expr, s1: sp.Expr, s2: sp.Expr, rho: sp.Expr, terms: int
) -> tuple[sp.Expr, sp.Expr]:
    """Eq. 1 literally (Eq. 2's Ω plus Eq. 3's I differences), to cross-check the rewrite."""
    r = sp.sqrt(1 - rho**2)
    c = mu1 * mu2 + rho * s1 * s2
    om = omega_printed(mu1, mu2, s1, s2, rho)
    kappa = -mu2 / (sp.sqrt(2) * s2)
    a1, b1 = rho / r, mu1 * s2 / sp.sqrt(2 * s1**2 * s2**2 * (1 - rho**2))
    e1 = om + c / sp.pi * (I_series(a1, b1, sp.oo, terms) - I_series(a1, b1, kappa, terms))
    sg = sp.sign(rho)
    a2, b2 = r / sp.Abs(rho), -mu1 / (sp.sqrt(2) * rho * s1)
    e1s = (mu1 / s1 - rho * mu2 / s2) / r / sp.sqrt(2)
    e2 = om + c / sp.pi * (
        sp.pi / 4 * sg
        + sp.pi / 4 * sp.erf(e1s) * sp.erf(mu2 / (sp.sqrt(2) * s2))
        - sg * (I_series(a2, b2, sp.oo, terms) - I_series(a2, b2, sg * e1s, terms))
    )
    return e1, e2


# ----------------------------------------------------------------------------- numerics

_MP_MODULES = [
    {"HermiteH": lambda n, x: hermite_mp(int(n), x), "Phi": mpmath.ncdf, "phi": mpmath.npdf},
    "mpmath",
]


def _f64_hermite(n, x):
    from scipy.special import eval_hermite

    return eval_hermite(int(n), x)


def _f64_modules() -> list:
    import numpy as np
    from scipy.special import ndtr

    return [
        {
            "HermiteH": _f64_hermite,
            "Phi": ndtr,
            "phi": lambda x: np.exp(-0.5 * x * x) / np.sqrt(2 * np.pi),
        },
        "scipy",
        "numpy",
    ]


@lru_cache(maxsize=32)
def _branch_exprs(terms: int, printed: bool) -> tuple[sp.Expr, sp.Expr]:
    make = series_branches_printed if printed else series_branches
    return make(*SYMBOLS, terms)


@lru_cache(maxsize=64)
def _branch_funcs(terms: int, printed: bool, mp: bool) -> tuple[Callable, Callable]:
    exprs = _branch_exprs(terms, printed)
    mods = _MP_MODULES if mp else _f64_modules()
    return tuple(sp.lambdify(SYMBOLS, e, modules=mods) for e in exprs)


def evaluate_series(
    mu1: float,
    mu2: float,
    s1: float,
    s2: float,
    rho: float,
    terms: int,
    dps: int | None = None,
    branch: int | None = None,
    printed: bool = False,
):
    """Numeric value of the truncated series of Eq. 1.

    ``dps=None``: float64 (scipy/numpy lambdify, the arrangement the generated code uses);
    otherwise mpmath at ``dps`` digits. ``branch`` 1/2 forces a branch, default picks by
    |ρ| ≤ 1/√2. ``printed=True`` evaluates Eq. 1 as printed instead of the rearrangement.
    """
    if branch is None:
        branch = 1 if 2 * rho * rho <= 1 else 2
    f = _branch_funcs(terms, printed, dps is not None)[branch - 1]
    if dps is None:
        return float(f(mu1, mu2, s1, s2, rho))
    with mpmath.workdps(dps + 10):
        args = [mpmath.mpf(v) for v in (mu1, mu2, s1, s2, rho)]
        val = f(*args)
    with mpmath.workdps(dps):
        return +val


def _quad(f: Callable, pts: list, dps: int, what: str, method: str = "tanh-sinh"):
    """mpmath quad of f over the split points, normalised by max|f| at the split points and
    midpoints; raises ArithmeticError unless the error estimate is below 10^-dps relative
    (to the value, or to 10^-3·max|f| for integrals that are tiny next to their integrand).
    """
    samples = list(pts) + [(p + q) / 2 for p, q in itertools.pairwise(pts)]
    M = max(abs(f(x)) for x in samples if mpmath.isfinite(x)) or mpmath.mpf(1)
    val, err = mpmath.quad(lambda x: f(x) / M, pts, error=True, method=method)
    if not err <= mpmath.mpf(10) ** (-dps) * max(abs(val), mpmath.mpf(10) ** -3):
        raise ArithmeticError(f"{what}: quadrature error {err} too large for value {val}")
    return val * M


@lru_cache(maxsize=1)
def _omega_mp() -> Callable:
    return sp.lambdify(SYMBOLS, omega(*SYMBOLS), modules=_MP_MODULES)


def eq5_integral_mp(
    mu1: float, mu2: float, s1: float, s2: float, rho: float, dps: int = 30
) -> mpmath.mpf:
    """Lemma 4 value Ω + (μ1μ2+ρσ1σ2)/(2√π) ∫_κ^∞ e^{-z²} erf(az+b) dz by mpmath quad."""
    with mpmath.workdps(dps + 15):
        m1, m2, a1_, a2_, r_ = (mpmath.mpf(v) for v in (mu1, mu2, s1, s2, rho))
        sq = mpmath.sqrt(1 - r_**2)
        a, b = r_ / sq, m1 / (mpmath.sqrt(2) * a1_ * sq)
        kappa = -m2 / (mpmath.sqrt(2) * a2_)
        pts = [kappa]
        if a != 0 and -b / a > kappa:
            pts.append(-b / a)
        if kappa < 0 < pts[-1] or (kappa < 0 and len(pts) == 1):
            pts.append(mpmath.mpf(0))
        pts = sorted(set(pts))
        if kappa > 0:  # factor the Gaussian tail e^{-κ²} out of the integrand

            def g(v):
                return mpmath.exp(-2 * kappa * v - v * v) * mpmath.erf(a * (kappa + v) + b)

            rel = [p - kappa for p in pts] + [mpmath.inf]
            integral = mpmath.exp(-(kappa**2)) * _quad(g, rel, dps, "eq5 integral")
        else:

            def f(z):
                return mpmath.exp(-z * z) * mpmath.erf(a * z + b)

            integral = _quad(f, [*pts, mpmath.inf], dps, "eq5 integral")
        c = m1 * m2 + r_ * a1_ * a2_
        val = _omega_mp()(m1, m2, a1_, a2_, r_) + c / (2 * mpmath.sqrt(mpmath.pi)) * integral
    with mpmath.workdps(dps):
        return +val


# The definition oracles (nested quadrature of E[relu(x1) relu(x2)], E[relu(x)]) live in
# derivations/reference.py: relu_cross_moment_ref and relu_mean_ref.


# ----------------------------------------------------------------------------- kernel program


def _tail_program(a: sp.Expr, b: sp.Expr, x: sp.Expr, terms: sp.Symbol, tag: str):
    """exp(−b²)·I_tail_sum(a, b, x, terms) as a program (lets ending in a ``Loop``, result).

    Same truncated sum as ``I_tail_sum`` (times exp(−b²)), evaluated by recurrences so the
    cost is O(terms) and every intermediate stays O(1) (float32-safe at 50 terms):
    P_n = exp(−b²)H_n(b)/√(2ⁿn!) (P_{n+1} = b√(2/(n+1))P_n − √(n/(n+1))P_{n−1}, a scaled
    Hermite function), the coefficients (a/2)^(2u+1)/Γ(u+3/2) and (a/2)^(2u+2)/(u+1)! times
    √(2ⁿn!) by their ratios (which tend to a², so they stay bounded for |a| ≤ 1), and
    e_k = exp(−x²)x^(2k)/k!, f_k = exp(−x²)x^(2k+1)/Γ(k+3/2). Term u = 0 is straight-line;
    terms u = 1 .. terms − 1 are one ``Loop`` over u (``terms`` is the kernel's int argument),
    whose per-u coefficients are Python floats.
    """
    lets: list = []

    def let(name: str, expr: sp.Expr) -> sp.Symbol:
        sym = sp.Symbol(f"{tag}{name}", real=True)
        lets.append((sym, expr))
        return sym

    q = let("q", a * a / 4)
    b = let("b", b)
    x2 = let("x2", x * x)
    ex = let("ex", sp.exp(-x2))
    ec = let("erfc", sp.erfc(x))
    p_prev = let("Pp", sp.exp(-b * b))  # P_{2u}
    p_cur = let("Pc", sp.sqrt(2) * b * p_prev)  # P_{2u+1}
    # Where exp(−x²) or exp(−b²) underflows to 0, every term of its recurrence is exactly 0,
    # but the products of the multipliers x² and b can overflow, and 0·inf would make the
    # gradient NaN (at small σ). sign(·) of a value ≥ 0 is 1, or 0 where it underflowed, and has
    # zero derivative, so the loop sees the multiplier 0 there: the same values, finite
    # gradients. (0·x² is 0 unless x² itself overflowed, where the old form was NaN too.)
    x2 = let("x2l", x2 * sp.sign(ex))
    b = let("bl", b * sp.sign(p_prev))
    e_k = let("e", ex)
    big_e = let("E", ex)
    f_k = let("f", 2 * x * ex / sp.sqrt(sp.pi))
    big_f = let("F", f_k)
    ce = let("ce", a / sp.sqrt(sp.pi))
    co = let("co", sp.sqrt(2) * q)
    total = let("S", ce * p_prev * big_e - co * p_cur * (ec + big_f))
    u = sp.Symbol("u", integer=True, positive=True)
    scalars = []

    def scalar(name: str, expr: sp.Expr) -> sp.Symbol:
        sym = sp.Symbol(f"{tag}k_{name}", real=True)
        scalars.append((sym, expr))
        return sym

    # n = 2u − 1: p_cur holds P_n, p_prev holds P_{n−1} on entry
    k1 = scalar("pe1", sp.sqrt(2 / (2 * u)))
    k2 = scalar("pe2", sp.sqrt((2 * u - 1) / (2 * u)))
    k3 = scalar("po1", sp.sqrt(2 / (2 * u + 1)))
    k4 = scalar("po2", sp.sqrt(2 * u / (2 * u + 1)))
    k5 = scalar("e", 1 / u)
    k6 = scalar("f", 1 / (u + sp.Rational(1, 2)))
    k7 = scalar("ce", 2 * sp.sqrt(2 * u * (2 * u - 1)) / (u + sp.Rational(1, 2)))
    k8 = scalar("co", 2 * sp.sqrt(2 * u * (2 * u + 1)) / (u + 1))
    body = (
        (p_prev, b * k1 * p_cur - k2 * p_prev),  # P_{2u}
        (p_cur, b * k3 * p_prev - k4 * p_cur),  # P_{2u+1} (p_prev is P_{2u} now)
        (e_k, e_k * x2 * k5),
        (big_e, big_e + e_k),
        (f_k, f_k * x2 * k6),
        (big_f, big_f + f_k),
        (ce, ce * q * k7),
        (co, co * q * k8),
        (total, total + ce * p_prev * big_e - co * p_cur * (ec + big_f)),
    )
    lets.append(Loop(u, 1, terms, tuple(scalars), body))
    return lets, total


def series_program(
    mu1: sp.Expr, mu2: sp.Expr, s1: sp.Expr, s2: sp.Expr, rho: sp.Expr, terms: sp.Symbol
) -> tuple[tuple, sp.Expr, tuple, sp.Expr]:
    """Both branches of ``series_branches`` as programs (with a ``Loop`` to ``terms``).

    Returns (lets1, e1, lets2, e2): evaluating each ``lets`` in order, then ``e``, gives the
    same value as ``series_branches`` at O(terms) cost (the generated kernel is checked
    against the mpmath truncated series for several ``terms`` in tests/test_series_loop.py).
    √(1−ρ²) is written √((1−ρ)(1+ρ)) (no cancellation near |ρ| = 1).
    """
    r = sp.sqrt((1 - rho) * (1 + rho))
    c = mu1 * mu2 + rho * s1 * s2
    om = omega(mu1, mu2, s1, s2, rho) - c * Phi(mu2 / s2) / 2
    kappa = -mu2 / (sp.sqrt(2) * s2)
    a1 = rho / r
    b1 = mu1 / (sp.sqrt(2) * s1 * r)
    lets1, t1 = _tail_program(a1, b1, kappa, terms, "_s1_")
    e1 = om + c * (Phi(mu2 / s2) * Phi(mu1 / (s1 * r)) + t1 / (2 * sp.sqrt(sp.pi)))
    sg = sp.sign(rho)
    a2 = r / sp.Abs(rho)
    b2 = -mu1 / (sp.sqrt(2) * rho * s1)
    h1 = (mu1 / s1 - rho * mu2 / s2) / r
    y = sg * h1 / sp.sqrt(2)
    lets2, t2 = _tail_program(a2, b2, y, terms, "_s2_")
    e2 = om + c * (
        Phi(mu2 / s2) * Phi(h1) + sg * sp.erfc(y) * sp.erfc(b2) / 4 - sg * t2 / (2 * sp.sqrt(sp.pi))
    )
    return tuple(lets1), e1, tuple(lets2), e2


# ----------------------------------------------------------------------------- conditioning


def _magnitude_expr(e: sp.Expr) -> sp.Expr:
    """``e`` with every sum replaced by the sum of its terms' absolute values (recursively
    through products and positive integer powers; arguments of functions, divisors and roots
    are left as they are: their own rounding is relative)."""
    if e.is_Add:
        return sp.Add(*[sp.Abs(_magnitude_expr(a)) for a in e.args], evaluate=False)
    if e.is_Mul:
        return sp.Mul(*[_magnitude_expr(a) for a in e.args], evaluate=False)
    if e.is_Pow and e.exp.is_Integer and e.exp > 0:
        return sp.Pow(_magnitude_expr(e.base), e.exp, evaluate=False)
    return e


@lru_cache(maxsize=64)
def _magnitude_funcs(terms: int) -> tuple[Callable, Callable]:
    return tuple(
        sp.lambdify(SYMBOLS, _magnitude_expr(e), modules=_MP_MODULES)
        for e in _branch_exprs(terms, False)
    )


def series_magnitude(
    mu1: float, mu2: float, s1: float, s2: float, rho: float, terms: int, dps: int = 20
) -> mpmath.mpf:
    """Σ|terms| of the truncated series of Eq. 1 (the branch ``evaluate_series`` picks), at
    ``dps`` digits: every sum of the rearranged form ``series_branches`` taken with the absolute
    values of its terms. Floating-point evaluation of the series cannot promise better than
    about eps·Σ|terms| absolute error; Σ|terms|/|value| is its condition number (large where the
    truncated series is nearly 0 by cancellation, e.g. 1 term at μ = 0, ρ = −0.999)."""
    branch = 1 if 2 * rho * rho <= 1 else 2
    f = _magnitude_funcs(terms)[branch - 1]
    with mpmath.workdps(dps + 10):
        val = abs(f(*[mpmath.mpf(v) for v in (mu1, mu2, s1, s2, rho)]))
    with mpmath.workdps(dps):
        return +val
