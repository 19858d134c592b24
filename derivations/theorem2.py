"""Theorem 2: the second moment and variance of g_i(x) = B(i,:) relu(Ax) + c2(i), x ~ N(0, Σx).

With z = Ax ~ N(0, Σ̄), Σ̄ = AΣxAᵀ, σ̄_v² = Σ̄(v,v), expanding the square of
Σ_v B(i,v) relu(z_v) + c2(i):

    E[g_i²] = Σ_v B(i,v)² σ̄_v²/2                                  (Lemma 1, μ = 0)
            + 2 Σ_{v1 > v2} B(i,v1) B(i,v2) L3(σ̄_v1, σ̄_v2, σ̄_v1v2)  (Lemma 3)
            + 2 c2(i) Σ_v B(i,v) σ̄_v/√(2π)                         (Remark 1)
            + c2(i)².

Correction to the printed paper: Theorem 2 ends in "+ c2(i)"; the square of the bias gives the
last two lines instead (the printed form is right only for c2 = 0). The variance
Var[g_i] = E[g_i²] − E[g_i]² = Σ_{v,w} B(i,v) B(i,w) C_vw − (Σ_v B(i,v)σ̄_v/√(2π))², with
C_vw = L3(σ̄_v, σ̄_w, σ̄_vw) and C_vv = σ̄_v²/2, does not depend on c2 (checked below).
Theorem 2 needs no kernel of its own: torchbridge assembles it from
``relu_cross_moment_zero_mean`` and ``relu_mean``.
"""

from __future__ import annotations

import sympy as sp

from .lemma3 import lemma3_expr, s1, s2, s12

P = 3  # the symbolic check uses p = 3 hidden units (every pairwise term appears)


def _symbols(p: int = P):
    b = sp.symbols(f"b0:{p}", real=True)
    sig = sp.symbols(f"s0:{p}", positive=True)
    cov = {
        (v, w): sp.Symbol(f"c{min(v, w)}{max(v, w)}", real=True) for v in range(p) for w in range(p)
    }
    c2 = sp.Symbol("c2", real=True)
    return b, sig, cov, c2


def _pair_moment(sig, cov, v: int, w: int) -> sp.Expr:
    if v == w:
        return sig[v] ** 2 / 2  # Lemma 1
    return lemma3_expr.subs({s1: sig[v], s2: sig[w], s12: cov[(v, w)]}, simultaneous=True)


def second_moment(p: int = P):
    """E[g_i²] (corrected Theorem 2) as a SymPy expression in b_v, σ̄_v, σ̄_vw, c2."""
    b, sig, cov, c2 = _symbols(p)
    quad = sum(b[v] * b[w] * _pair_moment(sig, cov, v, w) for v in range(p) for w in range(p))
    mean_relu = [sig[v] / sp.sqrt(2 * sp.pi) for v in range(p)]
    return quad + 2 * c2 * sum(b[v] * mean_relu[v] for v in range(p)) + c2**2


def mean(p: int = P):
    """E[g_i] for μx = 0, c1 = 0 (Theorem 1)."""
    b, sig, _, c2 = _symbols(p)
    return sum(b[v] * sig[v] / sp.sqrt(2 * sp.pi) for v in range(p)) + c2


def printed_second_moment(p: int = P):
    """Theorem 2 exactly as printed (ends in + c2(i))."""
    b, sig, cov, c2 = _symbols(p)
    cross = 2 * sum(
        b[v1] * b[v2] * _pair_moment(sig, cov, v1, v2) for v1 in range(p) for v2 in range(v1)
    )
    return cross + sum(b[r] ** 2 * sig[r] ** 2 / 2 for r in range(p)) + c2


def check_variance_independent_of_c2() -> bool:
    """∂Var[g_i]/∂c2 = 0 symbolically."""
    *_, c2 = _symbols()
    var = second_moment() - mean() ** 2
    assert sp.simplify(sp.diff(var, c2)) == 0
    return True


def check_printed_form_needs_c2_terms() -> bool:
    """Printed and corrected forms agree at c2 = 0 and differ by 2c2E[b·relu] + c2² − c2."""
    b, sig, _, c2 = _symbols()
    diff = sp.simplify(second_moment() - printed_second_moment())
    expected = 2 * c2 * sum(b[v] * sig[v] / sp.sqrt(2 * sp.pi) for v in range(P)) + c2**2 - c2
    assert sp.simplify(diff - expected) == 0
    assert sp.simplify(diff.subs(c2, 0)) == 0
    return True


CHECKS = (check_variance_independent_of_c2, check_printed_form_needs_c2_terms)
KERNELS = ()
