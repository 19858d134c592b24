"""ρ-integrals of φ2 in a tail of G by exact inversion of the exponent (NumPy and PyTorch).

For t = corr ∈ (−1, 1), φ2(h, k; t) = e^{G(t)} / (2π √(1 − t²)) with

    G(t) = −q(t) / (2(1 − t²)),   q(t) = h² − 2hk t + k².

G increases on (−1, ts], ts = sign(hk)·min(|h/k|, |k/h|), so for t_a ≤ t ≤ t_e ≤ min(ts, 0)
the substitution y = G(t_e) − G(t) ≥ 0 is one-to-one and e^{G(t)} = e^{G(t_e)} e^{−y}.
G(t) = −c/2, c = c0 + 2y, c0 = −2G(t_e) = a0 + h², is the quadratic
c t² − 2hk t + (h² + k² − c) = 0, whose discriminant/4 is D = (a0 + 2y)(b0 + 2y) with
a0 = (k − h t_e)²/(1 − t_e²) = c0 − h², b0 = (h − k t_e)²/(1 − t_e²) = c0 − k²; t(y) is its
smaller root and, differentiating the quadratic, dt/dy = −(1 − t²)/√D. Hence

    ∫_{t_a}^{t_e} w(t) φ2(t) dt = e^{G(t_e)}/(2π) ∫_0^{Y} w(t(y)) e^{−y} √(1 − t²)/√D dy.

Each quantity is computed in a form whose terms have one sign (no cancellation):
hk > 0: t = (N0 − 2y)/(hk + √D), N0 = h² + k² − c0 = t_e(2hk − t_e(h² + k²))/(1 − t_e²) ≤ 0,
        1 − t² = q(t)/c (q = h² + k² − 2hk t, terms ≥ 0 for t ≤ 0),
        Y = (t_e − t_a)(2hk(1 + t_a t_e) − (h² + k²)(t_a + t_e))/(2(1 − t_a²)(1 − t_e²));
hk < 0: t = (hk − √D)/c, 1 + t = (h + k)²/(c + hk + √D) (the smaller root of the quadratic
        in 1 + t), c + hk = (a + 2y) + M(M − m), M, m = max, min(|h|, |k|), and only t_a = −1
        (Y = ∞) is used;
both:   t_e − t = 2y(1 − t²)/(2hk − c0(t + t_e)) (the difference of the quadratics at c, c0);
        for hk < 0 its denominator loses at most a factor 2 where |t_e| ≥ 2|ts| (``tail_ok``).
The square root's branch point y = −a/2, a = min(a0, b0), nears y = 0 when t_e nears ts; the
substitution y = (s² − a)/2, s = √a + d (y = d(2√a + d)/2, dy = s ds) removes it:
√D = s √(s² + |h² − k²|) (b0 − a0 = h² − k²), and the integrand becomes
w e^{−y} √(1 − t²)/√(s² + |h² − k²|) in d ∈ [0, 2Y'/(√(a + 2Y') + √a)], Y' = min(Y, ``Y_MAX``),
one Gauss–Legendre rule. The integrand is ≤ e^{−y}/√|h² − k² + a|, so the truncation at
``Y_MAX`` costs < e^{−45}·(a few) relative. Used where ``tail_ok`` holds (measured in
tests/test_pair_tail.py against mpmath: ≤ 2e-13 relative, the rounding of e^{G(t_e)}'s
argument); the θ-rule of ``relu_pair`` elsewhere. Derivation and symbolic checks:
``derivations/pair_tail.py``.
"""

from __future__ import annotations

import math

__all__ = ["SUM_MIN", "Y_MAX", "tail_integral", "tail_ok", "tail_or"]

#: Truncation of the y-range (the integrand is ≤ e^{−y}/hk).
Y_MAX = 45.0
#: The y-rule is used where |h + k| ≥ SUM_MIN (hk > 0): near h = k = 0 with ρ → −1, t(y)
#: reaches −1 within y = O((h + k)²) and the factor (1 − t²)^{3/2} is no longer smooth in d.
SUM_MIN = 2.0
_INV_2PI = 1.0 / (2.0 * math.pi)


def _one_minus_sq(te):
    return (1.0 - te) * (1.0 + te)


def tail_ok(o, h, k, te):
    """Mask where ``tail_integral`` is used, for −1 < t_e ≤ 0 and |h + k| ≥ ``SUM_MIN``:
    hk > 0, or hk < 0 with |t_e| ≥ 2|ts| (then t_e < 0; callers pass t_a = −1 there)."""
    ah, ak = o.abs(h), o.abs(k)
    big, small = o.maximum(ah, ak), o.minimum(ah, ak)
    hk = h * k
    neg_ok = (hk < 0) & (o.abs(te) * big >= 2.0 * small)
    return ((hk > 0) | neg_ok) & (o.abs(h + k) >= SUM_MIN) & (te <= 0) & (te > -1.0)


def tail_integral(o, h, k, te, ta, weight: str, rule):
    """∫_{t_a}^{t_e} w(t) φ2(h, k; t) dt where ``tail_ok(h, k, t_e)`` holds, t_a ≤ t_e (1-D arrays;
    t_a = −1 where hk < 0).

    ``weight``: "one" (w = 1), "abs" (w = −t = |t|) or "gap" (w = t_e − t). ``o``: the
    backend's operations (``relu_pair.numpy_ops()``/``torch_ops()``); ``rule``: Gauss–Legendre
    (nodes, weights) on [−1, 1]. Elsewhere the value is finite garbage (callers select with a
    mask, see ``tail_or``). Result ≥ 0, relatively accurate down to underflow.
    """
    x, w = rule
    hk = h * k
    pos = hk > 0
    hh = h * h + k * k
    ah, ak = o.abs(h), o.abs(k)
    big, small = o.maximum(ah, ak), o.minimum(ah, ak)
    om_e = o.maximum(_one_minus_sq(te), 1e-300)
    a0 = (k - h * te) ** 2 / om_e
    b0 = (h - k * te) ** 2 / om_e
    c0 = a0 + h * h
    n0 = te * (2.0 * hk - te * hh) / om_e  # h² + k² − c0 (used where hk > 0)
    # Y = G(t_e) − G(t_a); t_a = −1 gives ∞ (capped at Y_MAX)
    om_a = _one_minus_sq(ta)
    gap = (te - ta) * (2.0 * hk * (1.0 + ta * te) - hh * (ta + te))
    safe_a = o.where(om_a > 0, om_a, 1.0 + 0.0 * om_a)
    span = o.where(om_a > 0, 0.5 * gap / (safe_a * om_e), 0.0 * gap + Y_MAX)
    ymax = o.clip(span, 0.0, Y_MAX)
    # y = (s² − a)/2, s = √a + d ≥ √a, a = min(a0, b0): removes the square-root branch point
    a = o.minimum(a0, b0)
    ra = o.sqrt(a)
    dmax = 2.0 * ymax / o.maximum(o.sqrt(a + 2.0 * ymax) + ra, 1e-300)
    half = 0.5 * dmax
    d = half[..., None] * (x + 1.0)
    s = ra[..., None] + d
    y = 0.5 * d * (ra[..., None] + s)
    hk_, c0_ = hk[..., None], c0[..., None]
    c = c0_ + 2.0 * y
    root = o.sqrt(s * s + o.abs((h - k) * (h + k))[..., None])  # √D = s·root
    sq = s * root
    # hk > 0: t = (N0 − 2y)/(hk + √D), 1 − t² = q/c
    hk_p = o.where(pos, hk, 0.0 * hk)[..., None]
    t_p = (n0[..., None] - 2.0 * y) / o.maximum(hk_p + sq, 1e-300)
    om_p = (hh[..., None] - 2.0 * hk_p * t_p) / c
    # hk < 0: t = (hk − √D)/c, 1 + t = (h + k)²/(c + hk + √D), c + hk = s² + M(M − m)
    t_n = (hk_ - sq) / c
    eps = ((h + k) ** 2)[..., None] / (s * s + (big * (big - small))[..., None] + sq)
    om_n = eps * (2.0 - eps)
    t = o.where(pos[..., None], t_p, t_n)
    om = o.where(pos[..., None], om_p, om_n)
    if weight == "one":
        wt = 1.0 + 0.0 * t
    elif weight == "abs":
        wt = -t
    elif weight == "gap":
        wt = 2.0 * y * om / o.maximum(2.0 * hk_ - c0_ * (t + te[..., None]), 1e-300)
    else:
        raise ValueError(f"tail_integral: weight={weight!r} is not 'one', 'abs' or 'gap'")
    f = wt * o.exp(-y) * o.sqrt(om) / root
    return o.matvec(f, w) * half * o.exp(-0.5 * c0) * _INV_2PI


_SAFE = (-10.0, -10.0, -0.5, -1.0)  # a point inside the domain for the masked-out elements


def tail_or(o, h, k, te, ta, weight: str, rule, fallback):
    """``tail_integral`` where ``tail_ok(h, k, t_e)`` holds, ``fallback`` elsewhere.

    Masked arithmetic (no data-dependent control flow): the masked-out elements are evaluated
    at a safe interior point, so neither their values nor their gradients can be NaN.
    """
    ok = tail_ok(o, h, k, te)
    z = 0.0 * h
    hs, ks, tes, tas = (o.where(ok, v, z + s) for v, s in zip((h, k, te, ta), _SAFE, strict=True))
    return o.where(ok, tail_integral(o, hs, ks, tes, tas, weight, rule), fallback)
