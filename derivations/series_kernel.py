"""The paper's method as a kernel: Lemma 4's series truncated to N terms, N in {1,5,10,20,50}.

Each N gets its own generated kernel ``_relu_cross_moment_series_N``; the public
``relu_cross_moment_series(mu1, mu2, sigma1, sigma2, rho, terms)`` dispatches on ``terms``.
Interior (σ1, σ2 > 0, 0 < |ρ| < 1): both branches of Eq. 1 as in ``lemma4_series`` — branch 1
for |ρ| ≤ 1/√2 (the paper's "<"; at exactly 1/√2 either diverges, we keep branch 1), branch 2
above — evaluated by the O(N) straight-line program ``series_program`` (recurrences for the
Hermite polynomials, the incomplete-gamma partial sums and the coefficients). Limits σ = 0
and |ρ| = 1 reuse the exact limit expressions of ``exact_cross_moment`` (there is nothing to
truncate there). The kernel reproduces the truncated series, *including* its truncation error:
``nmgen verify`` compares it with the same truncated sum evaluated by mpmath from the direct
(unrestructured) form ``series_branches``; ``nm fig2`` measures the truncation error itself.
"""

from __future__ import annotations

from functools import partial

import sympy as sp

from .exact_cross_moment import KERNELS as _EXACT
from .lemma4_series import SYMBOLS, TERMS, evaluate_series, series_program
from .spec import ArgSpec, Case, Dispatcher, KernelSpec

_m1, _m2, _s1, _s2, _r = sp.symbols("mu1 mu2 sigma1 sigma2 rho", real=True)
_sub = dict(zip(SYMBOLS, (_m1, _m2, _s1, _s2, _r), strict=True))
_both = sp.And(_s1 > 0, _s2 > 0)
_ARGS = (
    ArgSpec(_m1, "real"),
    ArgSpec(_m2, "real"),
    ArgSpec(_s1, "nonneg"),
    ArgSpec(_s2, "nonneg"),
    ArgSpec(_r, "corr"),
)
_exact = next(k for k in _EXACT if k.name == "relu_cross_moment")
_LIMIT_CASES = _exact.cases  # after the |ρ| < 1 series cases: ρ = ±1 and σ = 0, exact


def _subs_lets(lets):
    return tuple((s, e.xreplace(_sub)) for s, e in lets)


def series_reference(terms: int, m1, m2, a, b, r):
    """The truncated series in mpmath (30 digits) from the direct form ``series_branches``;
    the limits (σ = 0, |ρ| = 1) from the definition."""
    if a > 0 and b > 0 and abs(r) < 1:
        return evaluate_series(m1, m2, a, b, r, terms, dps=30)
    return _exact.reference(m1, m2, a, b, r)


def _scale(m1: float, m2: float, a: float, b: float, r: float) -> float:
    return (abs(m1) + a) * (abs(m2) + b)


def _spec(terms: int) -> KernelSpec:
    lets1, e1, lets2, e2 = series_program(*SYMBOLS, terms)
    half = sp.Rational(1, 2)
    return KernelSpec(
        name=f"_relu_cross_moment_series_{terms}",
        args=_ARGS,
        cases=(
            Case(
                e1.xreplace(_sub),
                sp.And(_both, _r**2 <= half),
                {_s1: 1.0, _s2: 1.0, _r: 0.0},
                f"|ρ| ≤ 1/√2: Eq. 1 first branch, {terms} terms",
                _subs_lets(lets1),
            ),
            Case(
                e2.xreplace(_sub),
                sp.And(_both, sp.Abs(_r) < 1),
                {_s1: 1.0, _s2: 1.0, _r: 0.9},
                f"1/√2 < |ρ| < 1: Eq. 1 second branch (Eq. 6), {terms} terms",
                _subs_lets(lets2),
            ),
            *_LIMIT_CASES,
        ),
        doc=f"Lemma 4's E[max(x1,0)·max(x2,0)] with the series of Eq. 3 truncated to {terms} terms.",
        source="derivations/series_kernel.py",
        equation="Lemma 4, Eqs. 1-3 and 6 (truncated series, the paper's method)",
        reference=partial(series_reference, terms),
        scale=_scale,
        grid="series",
        public=False,
    )


KERNELS = tuple(_spec(n) for n in TERMS)
DISPATCHERS = (
    Dispatcher(
        name="relu_cross_moment_series",
        args=_ARGS,
        int_arg="terms",
        variants={n: f"_relu_cross_moment_series_{n}" for n in TERMS},
        doc="E[max(x1,0)·max(x2,0)] by Lemma 4's series truncated to ``terms`` terms "
        "(the paper's method; use relu_cross_moment for the exact value).",
        source="derivations/series_kernel.py",
        equation="Lemma 4, Eqs. 1-3 and 6",
    ),
)
CHECKS = ()
