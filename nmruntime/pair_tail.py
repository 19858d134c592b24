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
from collections.abc import Callable

from nmruntime.pair_ops import sync_free

__all__ = [
    "GAUSS_MIN_ROOT",
    "SUM_MIN",
    "Y_MAX",
    "gauss_integral",
    "gauss_ok",
    "tail_integral",
    "tail_ok",
    "tail_or",
]

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
    backend's operations (``pair_ops.numpy_ops()``/``torch_ops()``); ``rule``: Gauss–Legendre
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
_GAUSS_SAFE = (-10.0, -5.0, -0.5, -1.0)  # the same for ``gauss_integral`` (needs |h| ≠ |k|)


def _on_mask(o, mask, fn, args: tuple, safe: tuple):
    """fn(*args) where ``mask`` holds (1-D inputs), zeros elsewhere. Eager CPU and NumPy: on
    the gathered elements only; ``sync_free`` tensors: masked arithmetic, the arguments
    replaced by the finite point ``safe`` outside ``mask`` (no NaN values or gradients)."""
    if sync_free(args[0]):
        z = 0.0 * args[0]
        val = fn(*(o.where(mask, a, z + v) for a, v in zip(args, safe, strict=True)))
        return o.where(mask, val, 0.0 * val)
    out = 0.0 * args[0]
    if mask.sum() == 0:
        return out
    out[mask] = fn(*(a[mask] for a in args))
    return out


def tail_or(o, h, k, te, ta, weight: str, rule, fallback: Callable):
    """∫_{t_a}^{t_e} w φ2 dt: ``tail_integral`` where ``tail_ok(h, k, t_e)`` holds, else
    ``gauss_integral`` where ``gauss_ok`` holds, ``fallback(h, k, t_e, t_a)`` (the caller's
    general quadrature, elementwise on 1-D arrays) elsewhere.

    ``weight``: "one" (w = 1), "abs" (w = −t, with t_e = 0) or "gap" (w = t_e − t).
    Each route runs on its own elements (``_on_mask``: gathered in eager mode, masked
    arithmetic at a safe interior point under ``sync_free``, so no NaN values or gradients);
    the fallback in eager mode only on the elements neither route takes (on LeNet's layers
    the joint tails reach this quadrature with one of the two routes for all but a few
    elements in 10⁴, and the fallback was 71% of its time), under ``sync_free`` on every
    element at its own arguments (each caller's domain).
    """
    ok = tail_ok(o, h, k, te)
    g_ok = gauss_ok(o, h, k, ta, te) & ~ok
    g_weight = "one" if weight == "one" else "gap"
    args = (h, k, te, ta)
    tail = _on_mask(o, ok, lambda *a: tail_integral(o, *a, weight, rule), args, _SAFE)
    gauss = _on_mask(
        o, g_ok, lambda a, b, e, s: gauss_integral(o, a, b, s, e, g_weight, rule), args, _GAUSS_SAFE
    )
    if sync_free(h):
        rest = fallback(*args)
    else:
        rest = 0.0 * h
        left = ~(ok | g_ok)
        if left.sum() != 0:
            rest[left] = fallback(*(a[left] for a in args))
    return o.where(ok, tail, o.where(g_ok, gauss, rest))


# --- the whole t-range by the Gaussian substitution (interior peaks; issue #10) -------------
#
# With M = max(|h|, |k|), m = min(|h|, |k|), ts = sign(hk)·m/M and Δ = M² − m² = (M − m)(M + m):
#
#     q(t) = M²(1 − t²) + M²(t − ts)²,  so  G(t) = −M²/2 − u²/2,  u = M(t − ts)/√(1 − t²),
#
# u increasing from −∞ (t = −1) to +∞ (t = 1). With t = tanh w, ts = tanh a (|ts| < 1) and
# u = √Δ·x, x = sinh(w − a):
#
#     φ2(h, k; t) dt = e^{−M²/2}/(2π√Δ) · e^{−u²/2} / (cosh w · √(1 + x²)) du,
#     cosh w = (√(1 + x²) + ts·x)/√(1 − ts²) = (1 + (u/M)²)/((√(1 + x²) − ts·x)·√(1 − ts²)),
#     t − ts = u/(M cosh w),
#     t0 − t = sinh(w0 − w)/(cosh w0 cosh w),  sinh(w0 − w) = x0√(1 + x²) − x√(1 + x0²)
#            = (x0 − x)(x0 + x)/(x0√(1 + x²) + x√(1 + x0²))  (x0·x ≥ 0).
#
# Every factor is a sum or product of terms of one sign (the form of cosh w is chosen by the
# sign of ts·x); derivation and SymPy checks in derivations/pair_tail.py. The integral over
# [t_a, t_b] is split at u0 = clip(0, u_a, u_b), the maximum of e^{−u²/2} on the interval (the
# interior peak t = ts, or the end nearest it), into a left and a right piece, each one
# Gauss–Legendre rule in z with u = u0 ∓ λ sinh z, λ = min(√Δ, 1/(1 + |u0|)): the nearest
# singularities of the integrand are the branch points u = ±i√Δ of √(1 + x²), and e^{−u²/2}
# decays from u0 on the scale 1/(1 + |u0|). The y = (u² − u0²)/2 range is cut at ``Y_MAX``.

#: The Gaussian route is used where √Δ = √(M² − m²) ≥ GAUSS_MIN_ROOT (the branch points ±i√Δ
#: stay away from the real axis relative to the Gaussian's width).
GAUSS_MIN_ROOT = 0.25
_U_CAP = 1e3  # |u| beyond this: e^{−u²/2} underflows; stands for ±∞ (t = ±1)


def gauss_ok(o, h, k, ta, tb):
    """Mask where ``gauss_integral`` is used: √(M² − m²) ≥ ``GAUSS_MIN_ROOT``, −1 ≤ t_a ≤ t_b ≤ 1."""
    ah, ak = o.abs(h), o.abs(k)
    big, small = o.maximum(ah, ak), o.minimum(ah, ak)
    root2 = (big - small) * (big + small)
    return (root2 >= GAUSS_MIN_ROOT**2) & (ta >= -1.0) & (ta <= tb) & (tb <= 1.0)


def _t_minus_ts(o, t, ts, gap_s):
    """t − ts without cancelling near t, ts = ±1: (1 + t) − (1 + ts) or (1 − ts) − (1 − t),
    with 1 ∓ ts = ``gap_s`` = (M − m)/M exact (ts = ∓m/M), where |ts| > 1/2 and t is on the
    same side; t − ts elsewhere."""
    near_minus = (ts < -0.5) & (t < -0.5)
    near_plus = (ts > 0.5) & (t > 0.5)
    return o.where(near_minus, (1.0 + t) - gap_s, o.where(near_plus, gap_s - (1.0 - t), t - ts))


def _u_of_t(o, big, ts, gap_s, t):
    """u = M(t − ts)/√(1 − t²), ±``_U_CAP`` at t = ±1 (clipped there)."""
    om = (1.0 - t) * (1.0 + t)
    safe = o.where(om > 0, om, 1.0 + 0.0 * om)
    u = big * _t_minus_ts(o, t, ts, gap_s) / o.sqrt(safe)
    u = o.where(om > 0, u, o.where(t > 0, 0.0 * t + _U_CAP, 0.0 * t - _U_CAP))
    return o.clip(u, -_U_CAP, _U_CAP)


def _cosh_w(o, u, x, big, ts, om_s, ax):
    """cosh w at u = √Δ·x (``ax`` = √(1 + x²), ``om_s`` = 1 − ts²), in its one-sign form."""
    same = ts * x >= 0
    direct = (ax + o.abs(ts * x)) / o.sqrt(om_s)
    other = (1.0 + (u / big) ** 2) / ((ax + o.abs(ts * x)) * o.sqrt(om_s))
    return o.where(same, direct, other)


def _sinh_diff(o, x0, x, dx, a0, ax):
    """sinh(asinh x0 − asinh x) for x ≤ x0, given dx = x0 − x ≥ 0 computed exactly."""
    same = x0 * x >= 0
    den = x0 * ax + x * a0
    den = o.where(o.abs(den) > 0, den, 1.0 + 0.0 * den)
    return o.where(same, dx * (x0 + x) / den, x0 * ax - x * a0)


def _gauss_piece(o, u0, span, sign, big, ts, om_s, root, weight, t_info, rule):
    """∫ over u from u0 to u0 + sign·span of W(t) e^{−(u² − u0²)/2}/(cosh w √(1 + x²)) du."""
    xr, wr = rule
    au0 = o.abs(u0)
    lam = o.stop(o.minimum(root, 1.0 / (1.0 + au0)))
    cut = 2.0 * Y_MAX / (o.sqrt(u0 * u0 + 2.0 * Y_MAX) + au0)  # y = Y_MAX
    dmax = o.minimum(span, cut)
    zmax = o.asinh(dmax / lam)
    half = 0.5 * zmax
    z = half[..., None] * (xr + 1.0)
    d = lam[..., None] * o.sinh(z)
    u = u0[..., None] + sign * d
    x = u / root[..., None]
    ax = o.sqrt(1.0 + x * x)
    cw = _cosh_w(o, u, x, big[..., None], ts[..., None], om_s[..., None], ax)
    y = 0.5 * d * (2.0 * au0[..., None] + d)
    if weight == "one":
        wt = 1.0 + 0.0 * u
    else:  # "gap": t_b − t
        tb_minus_ts, x0, a0, cw0, left_const = t_info
        if sign > 0:
            wt = tb_minus_ts[..., None] - u / (big[..., None] * cw)
        else:
            sd = _sinh_diff(o, x0[..., None], x, d / root[..., None], a0[..., None], ax)
            wt = left_const[..., None] + sd / (cw0[..., None] * cw)
    f = wt * o.exp(-y) / (cw * ax) * (lam[..., None] * o.cosh(z))
    return o.matvec(f, wr) * half


def gauss_integral(o, h, k, ta, tb, weight: str, rule):
    """∫_{t_a}^{t_b} w(t) φ2(h, k; t) dt where ``gauss_ok`` holds (1-D arrays, any signs of h, k).

    ``weight``: "one" (w = 1) or "gap" (w = t_b − t ≥ 0). ``o``: the backend's operations;
    ``rule``: Gauss–Legendre (nodes, weights) on [−1, 1]. Two pieces of one rule each, split at
    the maximum of φ2 on the interval. Result ≥ 0, relatively accurate down to underflow;
    finite garbage outside ``gauss_ok`` (callers select with a mask, see ``tail_or``).
    """
    if weight not in ("one", "gap"):
        raise ValueError(f"gauss_integral: weight={weight!r} is not 'one' or 'gap'")
    ah, ak = o.abs(h), o.abs(k)
    big, small = o.maximum(ah, ak), o.minimum(ah, ak)
    big = o.maximum(big, 1e-300)
    hk = h * k
    sg = o.where(hk > 0, 1.0 + 0.0 * hk, o.where(hk < 0, -1.0 + 0.0 * hk, 0.0 * hk))
    ts = sg * small / big
    diff = big - small
    om_s = o.maximum(diff * (big + small) / (big * big), 1e-300)  # 1 − ts²
    root = o.maximum(o.sqrt(diff * (big + small)), 1e-300)  # √Δ
    gap_s = diff / big  # 1 − |ts|
    ua = _u_of_t(o, big, ts, gap_s, ta)
    ub = _u_of_t(o, big, ts, gap_s, tb)
    u0 = o.clip(0.0 * ua, ua, ub)
    t_info = None
    if weight == "gap":
        x0 = u0 / root
        a0 = o.sqrt(1.0 + x0 * x0)
        cw0 = _cosh_w(o, u0, x0, big, ts, om_s, a0)
        tb_minus_ts = _t_minus_ts(o, tb, ts, gap_s)
        # left piece: t_b − t = (t_b − t0) + (t0 − t), t0 = ts (interior peak) or t_b (u0 = u_b)
        left_const = o.where(u0 < ub, tb_minus_ts, 0.0 * tb)
        t_info = (tb_minus_ts, x0, a0, cw0, left_const)
    left = _gauss_piece(o, u0, u0 - ua, -1.0, big, ts, om_s, root, weight, t_info, rule)
    right = _gauss_piece(o, u0, ub - u0, 1.0, big, ts, om_s, root, weight, t_info, rule)
    return (left + right) * o.exp(-0.5 * (big * big + u0 * u0)) * (_INV_2PI / root)
