"""The paper's method as a kernel: Lemma 4's series truncated to ``terms`` >= 1 terms.

One generated kernel ``relu_cross_moment_series(mu1, mu2, sigma1, sigma2, rho, terms)``: the
series is printed as a loop over its terms (``lemma4_series.series_program``), so any
``terms`` >= 1 works at O(terms) cost. ``_relu_cross_moment_series_N`` (N in ``TERMS``) are
that kernel with ``terms`` bound, printed as one line each: the entry points of ``nmgen
verify``.
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
from .functions import Phi, phi
from .lemma4_series import SYMBOLS, TERMS, evaluate_series, series_program
from .spec import PAIR_ARGS, PAIR_SYMBOLS, Case, KernelSpec, Loop

_m1, _m2, _s1, _s2, _r = PAIR_SYMBOLS
_terms = sp.Symbol("terms", integer=True, positive=True)
_sub = dict(zip(SYMBOLS, (_m1, _m2, _s1, _s2, _r), strict=True))
_both = sp.And(_s1 > 0, _s2 > 0)
_ARGS = PAIR_ARGS
_exact = next(k for k in _EXACT if k.name == "relu_cross_moment")
_h, _k = _m1 / _s1, _m2 / _s2
_t = sp.Max(-_h, -_k)
_SAFE = {_s1: 1.0, _s2: 1.0}
#: After the |ρ| < 1 series cases: ρ = ±1 in closed form (cheap: a sync-free kernel evaluates
#: every case everywhere), then σ = 0 as in the exact kernel. With h = μ1/σ1, k = μ2/σ2:
#: ρ = 1: x2 = μ2 + σ2 z when x1 = μ1 + σ1 z, so E = σ1σ2 ∫_t^∞ (h + z)(k + z) φ dz
#: = σ1σ2 [(hk + 1) Φ(−t) + (h + k + t) φ(t)], t = max(−h, −k);
#: ρ = −1: E = σ1σ2 ∫_{−h}^{k} (h + z)(k − z) φ dz = σ1σ2 [(hk − 1)(Φ(k) − Φ(−h)) + k φ(h)
#: + h φ(k)] for h + k > 0, else 0 (∫z²φ = [Φ − zφ] and ∫zφ = −φ over [−h, k]).
_LIMIT_CASES = (
    Case(
        _s1 * _s2 * ((_h * _k + 1) * Phi(-_t) + (_h + _k + _t) * phi(_t)),
        sp.And(_both, _r > 0),
        _SAFE,
        "ρ = 1: σ1σ2[(hk + 1)Φ(−t) + (h + k + t)φ(t)], t = max(−h, −k)",
    ),
    Case(
        _s1 * _s2 * ((_h * _k - 1) * (Phi(_k) - Phi(-_h)) + _k * phi(_h) + _h * phi(_k)),
        sp.And(_both, _m1 * _s2 + _m2 * _s1 > 0),
        _SAFE,
        "ρ = −1, h + k > 0: σ1σ2[(hk − 1)(Φ(k) − Φ(−h)) + kφ(h) + hφ(k)]",
    ),
    Case(sp.S.Zero, _both, {}, "ρ = −1, h + k ≤ 0: the supports do not overlap"),
    *_exact.cases[1:],
)


def _subs_lets(lets):
    return tuple(
        x.xreplace(_sub) if isinstance(x, Loop) else (x[0], x[1].xreplace(_sub)) for x in lets
    )


def series_reference(terms: int, m1, m2, a, b, r):
    """The truncated series in mpmath (30 digits) from the direct form ``series_branches``;
    the limits (σ = 0, |ρ| = 1) from the definition."""
    if a > 0 and b > 0 and abs(r) < 1:
        return evaluate_series(m1, m2, a, b, r, terms, dps=30)
    return _exact.reference(m1, m2, a, b, r)


def _scale(m1: float, m2: float, a: float, b: float, r: float) -> float:
    return (abs(m1) + a) * (abs(m2) + b)


def _series_spec() -> KernelSpec:
    lets1, e1, lets2, e2 = series_program(*SYMBOLS, _terms)
    half = sp.Rational(1, 2)
    return KernelSpec(
        name="relu_cross_moment_series",
        args=_ARGS,
        cases=(
            Case(
                e1.xreplace(_sub),
                sp.And(_both, _r**2 <= half),
                {_s1: 1.0, _s2: 1.0, _r: 0.0},
                "|ρ| ≤ 1/√2: Eq. 1 first branch, `terms` terms",
                _subs_lets(lets1),
            ),
            Case(
                e2.xreplace(_sub),
                sp.And(_both, sp.Abs(_r) < 1),
                {_s1: 1.0, _s2: 1.0, _r: 0.9},
                "1/√2 < |ρ| < 1: Eq. 1 second branch (Eq. 6), `terms` terms",
                _subs_lets(lets2),
            ),
            *_LIMIT_CASES,
        ),
        doc="E[max(x1,0)·max(x2,0)] by Lemma 4's series truncated to ``terms`` >= 1 terms "
        "(the paper's method; use relu_cross_moment for the exact value).",
        source="derivations/series_kernel.py",
        equation="Lemma 4, Eqs. 1-3 and 6 (truncated series, the paper's method)",
        int_args=("terms",),
    )


def _bound_spec(kernel: KernelSpec, terms: int) -> KernelSpec:
    return KernelSpec(
        name=f"_relu_cross_moment_series_{terms}",
        args=_ARGS,
        cases=kernel.cases,
        doc=f"``relu_cross_moment_series`` with terms={terms}.",
        source="derivations/series_kernel.py",
        equation=kernel.equation,
        reference=partial(series_reference, terms),
        scale=_scale,
        grid="series",
        public=False,
        bound=(kernel.name, (terms,)),
    )


_SERIES = _series_spec()
KERNELS = (_SERIES, *(_bound_spec(_SERIES, n) for n in TERMS))
CHECKS = ()
