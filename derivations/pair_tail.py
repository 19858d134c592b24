"""ρ-integrals of the bivariate normal density in the joint tail, by inverting the exponent.

Result (ours; issue #10). For hk > 0 and −1 ≤ t_a ≤ t_e ≤ 0, with
φ2(h, k; t) = e^{G(t)}/(2π√(1 − t²)), G(t) = −q(t)/(2(1 − t²)), q(t) = h² − 2hk t + k²:

    ∫_{t_a}^{t_e} w(t) φ2(t) dt = e^{G(t_e)}/(2π) ∫_0^{Y} w(t(y)) e^{−y} J(t(y)) dy,

    t(y) = (N0 − 2y)/(hk + √((a0 + 2y)(b0 + 2y))),   J(t) = (1 − t²)^{3/2}/(hk(1 − t²) − t q(t)),

    c0 = q(t_e)/(1 − t_e²) = −2G(t_e),  N0 = t_e(2hk − t_e(h² + k²))/(1 − t_e²) = h² + k² − c0,
    a0 = (k − h t_e)²/(1 − t_e²) = c0 − h²,  b0 = (h − k t_e)²/(1 − t_e²) = c0 − k²,
    Y = G(t_e) − G(t_a) = (t_e − t_a)(2hk(1 + t_a t_e) − (h² + k²)(t_a + t_e))/(2(1 − t_a²)(1 − t_e²)),

and on that curve 1 − t² = q(t)/c, c = c0 + 2y, and t_e − t = 2y(1 − t²)/(2hk − c0(t + t_e)).

Proof. G' = (hk(1 − t²) − t q)/(1 − t²)² > 0 for t ≤ 0 < hk (``check_g_prime``), so
y = G(t_e) − G(t) is a bijection of [t_a, t_e] onto [0, Y] with dt = dy/G'(t), and
e^{G(t)} = e^{G(t_e)} e^{−y}. G(t) = −c/2 is the quadratic c t² − 2hk t + (h² + k² − c) = 0
whose discriminant/4 is (c − h²)(c − k²); its smaller root (the one ≤ 0 < hk/c) is
(hk − √D)/c = (h² + k² − c)/(hk + √D) (``check_root``). Subtracting the quadratics at c and c0
gives the gap (``check_gap``); the rest are rational identities (``check_identities``). Every
quantity above is a sum of terms of one sign for hk > 0, t ≤ 0, so none cancels in floating
point; the runtime (``nmruntime/pair_tail.py``) integrates in s = √(min(a0, b0) + 2y), which
removes the branch point of √ at y = −min(a0, b0)/2.

The oracle ``tail_integral_ref`` integrates w(t) φ2(t) over t by mpmath quadrature of the
definition, with e^{G(t_e)} factored out by hand and break points at geometrically growing
multiples of the decay length 1/G'(t_e) (mpmath's error criterion is absolute: an unscaled
integrand of size 1e-150 "converges" at the first level). It is checked against the
independent bvn oracle: ∫_{−1}^{ρ} φ2 dt = Φ2(h, k; ρ) − Φ2(h, k; −1) (``check_oracle``).
"""

from __future__ import annotations

import mpmath as mp
import sympy as sp

from .bvn import bvn_cdf_mp

__all__ = ["CHECKS", "WEIGHTS", "tail_integral_ref"]

h, k, t, te, ta, y, c = sp.symbols("h k t t_e t_a y c", real=True)
_q = h**2 - 2 * h * k * t + k**2
_g = -_q / (2 * (1 - t**2))


def _at(expr, v):
    return expr.subs(t, v)


def check_g_prime() -> bool:
    """dG/dt = (hk(1 − t²) − t q(t))/(1 − t²)²."""
    claim = (h * k * (1 - t**2) - t * _q) / (1 - t**2) ** 2
    assert sp.simplify(sp.diff(_g, t) - claim) == 0
    return True


def check_root() -> bool:
    """(h² + k² − c)/(hk + √D) solves c t² − 2hk t + h² + k² − c = 0, D = (c − h²)(c − k²),
    and G = −c/2 there (the quadratic is G(t) = −c/2 times 2(1 − t²))."""
    r = sp.Symbol("R", positive=True)  # R = √D
    d = (c - h**2) * (c - k**2)
    root = (h**2 + k**2 - c) / (h * k + r)
    quad = c * t**2 - 2 * h * k * t + h**2 + k**2 - c
    num = sp.numer(sp.together(quad.subs(t, root)))
    assert sp.rem(sp.expand(num), r**2 - d, r) == 0  # vanishes once R² = D
    assert sp.simplify(sp.expand(2 * (1 - t**2) * (_g + c / 2) + quad)) == 0
    return True


def check_gap() -> bool:
    """t_e − t = 2y(1 − t²)/(2hk − c0(t + t_e)) when t, t_e solve the quadratic at c0 + 2y, c0."""
    c0 = sp.Symbol("c0")
    qa = (c0 + 2 * y) * t**2 - 2 * h * k * t + h**2 + k**2 - (c0 + 2 * y)
    qe = c0 * te**2 - 2 * h * k * te + h**2 + k**2 - c0
    lhs = (te - t) * (2 * h * k - c0 * (t + te)) - 2 * y * (1 - t**2)
    assert sp.expand(lhs - (qa - qe)) == 0
    return True


def check_identities() -> bool:
    """c0 = q(t_e)/(1 − t_e²): N0 = h² + k² − c0, a0 = c0 − h², b0 = c0 − k², b0 − a0 = h² − k²,
    1 − t² = q/c on the curve, Y = (c(t_a) − c(t_e))/2 in its one-sign form."""
    om = 1 - te**2
    c0 = _at(_q, te) / om
    n0 = te * (2 * h * k - te * (h**2 + k**2)) / om
    a0 = (k - h * te) ** 2 / om
    b0 = (h - k * te) ** 2 / om
    assert sp.simplify(n0 - (h**2 + k**2 - c0)) == 0
    assert sp.simplify(a0 - (c0 - h**2)) == 0
    assert sp.simplify(b0 - (c0 - k**2)) == 0
    assert sp.simplify(b0 - a0 - (h**2 - k**2)) == 0
    quad = c * t**2 - 2 * h * k * t + h**2 + k**2 - c
    assert sp.expand(c * (1 - t**2) - _q + quad) == 0
    ca = _at(_q, ta) / (1 - ta**2)
    span = (te - ta) * (2 * h * k * (1 + ta * te) - (h**2 + k**2) * (ta + te)) / (om * (1 - ta**2))
    assert sp.simplify(ca - c0 - span) == 0
    return True


#: weight name -> w(t, t_e) of the runtime's ``tail_integral``
WEIGHTS = {
    "one": lambda tt, e: mp.mpf(1),
    "abs": lambda tt, e: -tt,
    "gap": lambda tt, e: e - tt,
}


def tail_integral_ref(hv, kv, tev, tav, weight: str, dps: int = 30) -> mp.mpf:
    """∫_{t_a}^{t_e} w(t) φ2(h, k; t) dt from the definition (quadrature over t), hk > 0,
    −1 ≤ t_a ≤ t_e ≤ 0; ``ArithmeticError`` when the quadrature cannot certify ``dps`` digits."""
    wfn = WEIGHTS[weight]
    with mp.workdps(dps + 15):
        hv, kv, tev, tav = (mp.mpf(v) for v in (hv, kv, tev, tav))
        if tav >= tev:
            return mp.mpf(0)
        g0 = -(hv * hv - 2 * hv * kv * tev + kv * kv) / (2 * (1 - tev) * (1 + tev))

        def f(tt):
            s2 = (1 - tt) * (1 + tt)
            if s2 == 0:
                return mp.mpf(0)
            g = -(hv * hv - 2 * hv * kv * tt + kv * kv) / (2 * s2)
            return wfn(tt, tev) * mp.exp(g - g0) / (2 * mp.pi * mp.sqrt(s2))

        slope = hv * kv * (1 - tev * tev) - tev * (hv * hv - 2 * hv * kv * tev + kv * kv)
        scale = (1 - tev * tev) ** 2 / slope  # 1/G'(t_e): the decay length at t_e
        pts = {tav, tev}
        for j in range(1, 400):
            p = tev - scale * j * mp.mpf("1.1") ** j
            if p <= tav:
                break
            pts.add(p)
        val, err = mp.quad(f, sorted(pts), error=True, maxdegree=10)
        if not err <= mp.mpf(10) ** (-dps) * abs(val):
            raise ArithmeticError(f"tail_integral_ref({hv}, {kv}, {tev}, {tav}): error {err}")
        return val * mp.exp(g0)


def check_oracle() -> bool:
    """∫_{−1}^{ρ} φ2 dt = Φ2(h, k; ρ) − Φ2(h, k; −1), against the independent bvn oracle."""
    for hv, kv, r in ((-1.5, -2.0, -0.3), (-3.0, -0.5, -0.8)):
        got = tail_integral_ref(hv, kv, r, -1, "one")
        with mp.workdps(40):
            ref = bvn_cdf_mp(hv, kv, r, 35) - bvn_cdf_mp(hv, kv, -1, 35)
            assert abs(got - ref) <= mp.mpf(10) ** -25 * abs(ref), (hv, kv, r, got, ref)
    return True


CHECKS = (check_g_prime, check_root, check_gap, check_identities, check_oracle)
