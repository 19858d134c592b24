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

__all__ = ["CHECKS", "WEIGHTS", "interval_integral_ref", "tail_integral_ref"]

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


# --- the Gaussian substitution (interior peaks; ``nmruntime.pair_tail.gauss_integral``) -----
#
# Result (ours; issue #10). M = max(|h|, |k|), m = min(|h|, |k|), sg = sign(hk), ts = sg·m/M,
# Δ = M² − m² = M²(1 − ts²). For every t ∈ (−1, 1):
#
#     q(t) = M²(1 − t²) + M²(t − ts)²,  hence  G(t) = −M²/2 − u²/2,  u = M(t − ts)/√(1 − t²).
#
# With t = tanh w, ts = tanh a and x = sinh(w − a): u = √Δ·x, du = √Δ √(1 + x²) dw and
# φ2 dt = e^G sech w dw/(2π), so
#
#     ∫_{t_a}^{t_b} w(t) φ2(h, k; t) dt = e^{−M²/2}/(2π√Δ) ∫_{u_a}^{u_b} w(t) e^{−u²/2}
#                                                           / (cosh w √(1 + x²)) du,
#
#     cosh w = (√(1 + x²) + ts·x)/√(1 − ts²) = (1 + (u/M)²)/((√(1 + x²) − ts·x)√(1 − ts²)),
#     t − ts = u/(M cosh w),  t0 − t = sinh(w0 − w)/(cosh w0 cosh w),
#     sinh(w0 − w) = x0√(1 + x²) − x√(1 + x0²) = (x0² − x²)/(x0√(1 + x²) + x√(1 + x0²)).
#
# Proof: ``check_gauss_square`` (the completed square), ``check_gauss_substitution`` (u in
# terms of w, the density in w and the Jacobian), ``check_gauss_forms`` (the one-sign forms).
# u is increasing in t (du/dt = M(1 − t·ts)/(1 − t²)^{3/2} > 0), so e^{−u²/2} is largest on
# [u_a, u_b] at u0 = clip(0, u_a, u_b): the runtime splits there.

_mm, _m_small = sp.symbols("M m", positive=True)
_sg = sp.Symbol("sg")
_w, _a, _x, _x0 = sp.symbols("w a x x0", real=True)


def check_gauss_square() -> bool:
    """q(t) = M²(1 − t²) + M²(t − ts)² with hk = sg·M·m, h² + k² = M² + m², sg² = 1."""
    q = _mm**2 + _m_small**2 - 2 * _sg * _mm * _m_small * t
    ts = _sg * _m_small / _mm
    rhs = _mm**2 * (1 - t**2) + _mm**2 * (t - ts) ** 2
    assert sp.expand(sp.expand(q - rhs).subs(_sg**2, 1)) == 0
    # so G = −q/(2(1 − t²)) = −M²/2 − u²/2 with u = M(t − ts)/√(1 − t²)
    u = _mm * (t - ts) / sp.sqrt(1 - t**2)
    g = -q / (2 * (1 - t**2))
    assert sp.simplify(sp.expand(g + _mm**2 / 2 + u**2 / 2).subs(_sg**2, 1)) == 0
    return True


def check_gauss_substitution() -> bool:
    """t = tanh w, ts = tanh a: (t − ts)/√(1 − t²) = sinh(w − a)/cosh a (so u = √Δ sinh(w − a),
    √Δ = M/cosh a), dt/√(1 − t²) = sech w dw, and d/dw sinh(w − a) = √(1 + sinh²(w − a))."""
    tt, tsa = sp.tanh(_w), sp.tanh(_a)
    lhs = (tt - tsa) * sp.cosh(_w)  # 1/√(1 − tanh²w) = cosh w
    assert sp.simplify((lhs - sp.sinh(_w - _a) / sp.cosh(_a)).rewrite(sp.exp)) == 0
    assert sp.simplify((1 - tsa**2) - 1 / sp.cosh(_a) ** 2) == 0  # √Δ = M√(1 − ts²) = M/cosh a
    assert sp.simplify(sp.diff(tt, _w) * sp.cosh(_w) - 1 / sp.cosh(_w)) == 0
    assert sp.simplify(sp.cosh(_w - _a) ** 2 - (1 + sp.sinh(_w - _a) ** 2)) == 0
    return True


def check_gauss_forms() -> bool:
    """The runtime's one-sign forms: cosh w from x = sinh(w − a) (both forms), t − ts,
    the tanh difference and sinh(asinh x0 − asinh x)."""
    tsv = sp.Symbol("t_s", real=True)
    ax, ax0 = sp.sqrt(1 + _x**2), sp.sqrt(1 + _x0**2)
    # cosh(a + asinh x) = cosh a √(1 + x²) + sinh a x, cosh a = 1/√(1 − ts²), sinh a = ts cosh a
    ca = 1 / sp.sqrt(1 - tsv**2)
    direct = ca * ax + tsv * ca * _x
    assert sp.simplify(direct - (ax + tsv * _x) / sp.sqrt(1 - tsv**2)) == 0
    other = (1 + _x**2 * (1 - tsv**2)) / ((ax - tsv * _x) * sp.sqrt(1 - tsv**2))
    assert sp.simplify(sp.radsimp(direct - other)) == 0
    e = sp.exp
    addition = sp.expand_trig(sp.cosh(_a + sp.asinh(_x)))  # cosh(a + asinh x)
    assert sp.simplify(addition - (sp.cosh(_a) * ax + sp.sinh(_a) * _x)) == 0
    # t − ts = sinh(w − a)/(cosh w cosh a) and tanh w0 − tanh w = sinh(w0 − w)/(cosh w0 cosh w)
    for lhs, rhs in (
        (sp.tanh(_w) - sp.tanh(_a), sp.sinh(_w - _a) / (sp.cosh(_w) * sp.cosh(_a))),
        (sp.tanh(_x0) - sp.tanh(_x), sp.sinh(_x0 - _x) / (sp.cosh(_x0) * sp.cosh(_x))),
    ):
        assert sp.simplify((lhs - rhs).rewrite(e)) == 0
    # sinh(asinh x0 − asinh x) = x0√(1 + x²) − x√(1 + x0²) and its difference-of-squares form
    sd = sp.sinh(sp.asinh(_x0) - sp.asinh(_x))
    assert sp.simplify(sp.expand_trig(sd) - (_x0 * ax - _x * ax0)) == 0
    assert sp.simplify((_x0 * ax - _x * ax0) * (_x0 * ax + _x * ax0) - (_x0**2 - _x**2)) == 0
    return True


def interval_integral_ref(hv, kv, tav, tbv, weight: str, dps: int = 30) -> mp.mpf:
    """∫_{t_a}^{t_b} w(t) φ2(h, k; t) dt from the definition (quadrature over t), any h, k,
    −1 ≤ t_a ≤ t_b ≤ 1, w = 1 ("one") or t_b − t ("gap"); ``ArithmeticError`` when the
    quadrature cannot certify ``dps`` digits.

    e^{G(p)} is factored out at the maximum p of G on the interval (ts = sg·m/M clipped), and
    the quadrature is split at p ± j·1.1^j·ℓ, ℓ the integrand's decay length there, so its
    (absolute) error criterion sees the peak at unit size.
    """
    with mp.workdps(dps + 15):
        hv, kv, tav, tbv = (mp.mpf(v) for v in (hv, kv, tav, tbv))
        if tav >= tbv:
            return mp.mpf(0)
        big, small = max(abs(hv), abs(kv)), min(abs(hv), abs(kv))
        ts = mp.sign(hv * kv) * small / big if big > 0 else mp.mpf(0)
        p = min(max(ts, tav), tbv)

        def g(tt):
            return -(hv * hv - 2 * hv * kv * tt + kv * kv) / (2 * (1 - tt) * (1 + tt))

        if abs(p) == 1:  # the maximum sits at t = ±1 (only if h = ±k): no factoring
            g0 = mp.mpf(0)
        else:
            g0 = g(p)

        def f(tt):
            s2 = (1 - tt) * (1 + tt)
            if s2 <= 0:
                return mp.mpf(0)
            wv = 1 if weight == "one" else tbv - tt
            return wv * mp.exp(g(tt) - g0) / (2 * mp.pi * mp.sqrt(s2))

        # decay length at p: 1/(|G'| + √|G''|) in t, from u: dt/du·1/(1 + |u|)
        if abs(p) < 1 and big > 0:
            up = big * (p - ts) / mp.sqrt((1 - p) * (1 + p))
            dtdu = ((1 - p) * (1 + p)) ** mp.mpf(1.5) / (big * (1 - p * ts))
            scale = dtdu / (1 + abs(up))
        else:
            scale = mp.mpf(1) / 16
        pts = {tav, tbv, p}
        for j in range(1, 400):
            d = scale * j * mp.mpf("1.1") ** j
            if p - d <= tav and p + d >= tbv:
                break
            pts |= {v for v in (p - d, p + d) if tav < v < tbv}
        val, err = mp.quad(f, sorted(pts), error=True, maxdegree=10)
        if not err <= mp.mpf(10) ** (-dps) * abs(val):
            raise ArithmeticError(f"interval_integral_ref({hv}, {kv}, {tav}, {tbv}): error {err}")
        return val * mp.exp(g0)


def check_interval_oracle() -> bool:
    """∫_{−1}^{ρ} φ2 dt = Φ2(h, k; ρ) − Φ2(h, k; −1) against the independent bvn oracle, at
    interior peaks of both signs of hk."""
    for hv, kv, r in ((-8.005, 7.865, -0.3), (-3.0, -1.2, 0.6), (0.3, -5.0, -0.7)):
        got = interval_integral_ref(hv, kv, -1, r, "one")
        with mp.workdps(40):
            ref = bvn_cdf_mp(hv, kv, r, 35) - bvn_cdf_mp(hv, kv, -1, 35)
            assert abs(got - ref) <= mp.mpf(10) ** -25 * abs(ref), (hv, kv, r, got, ref)
    return True


CHECKS = (
    check_g_prime,
    check_root,
    check_gap,
    check_identities,
    check_oracle,
    check_gauss_square,
    check_gauss_substitution,
    check_gauss_forms,
    check_interval_oracle,
)
