"""Standardized ReLU pair moments without cancellation (NumPy and PyTorch, one algorithm).

For z1, z2 standard normal with correlation ρ, h, k real, define

    C(h, k, ρ) = Cov[(h + z1)⁺, (k + z2)⁺],     E(h, k, ρ) = E[(h + z1)⁺ (k + z2)⁺],

so that for x_i = μ_i + σ_i z_i, Cov[relu(x1), relu(x2)] = σ1σ2 C(μ1/σ1, μ2/σ2, ρ) and
E[relu(x1) relu(x2)] = σ1σ2 E(h, k, ρ). Derivation: ``derivations/cross_covariance.py``.
Lemma 2 with Ψ = relu·relu gives ∂C/∂ρ = Φ2(h, k; ρ) and C(h, k, 0) = 0, hence
C = ∫_0^ρ Φ2(h, k; r) dr; with Φ2(h, k; r) = Φ(h)Φ(k) + ∫_0^r φ2(t) dt (ρ ≥ 0) or
Φ2 = L + ∫_{−1}^r φ2(t) dt, L = Φ2(h, k; −1) (ρ < 0), swapping the order of integration:

    ρ ≥ 0:  C = ρ Φ(h)Φ(k) + (1/2π) ∫_0^{asin ρ} (ρ − sin θ) e^{G(θ)} dθ,
    ρ < 0:  C = −[ |ρ| L + (1/2π) ∫_{−π/2}^{0} min(|ρ|, |sin θ|) e^{G(θ)} dθ ],

    G(θ) = −(h² − 2hk sin θ + k²)/(2cos²θ)   (t = sin θ; φ2(t) dt = e^{G}/(2π) dθ).

Every term is ≥ 0 inside the brackets: nothing cancels. G is evaluated as
−(h − k)²/(2cos²θ) − hk/(1 + sin θ) for θ > 0 and −(h + k)²/(2cos²θ) + hk/(1 − sin θ) for
θ < 0 (exact rewrites that do not cancel near |θ| = π/2). When h, k > 0 the identity
relu(x) = x + relu(−x) gives C(h, k, ρ) = ρ P(−h < Z < k) + C(−h, −k, ρ) (both terms have
the sign of ρ), so large positive h, k never meet a tiny difference of large numbers.

E = m(h) m(k) + C for ρ ≥ 0 (a sum of positive terms, m(h) = E[(h + Z)⁺]); for ρ < 0,
E = E(h, k, −1) + (1 + ρ) L + (1/2π) ∫_{−π/2}^{asin ρ} (ρ − sin θ) e^{G} dθ (all ≥ 0), with
E(h, k, −1) = ∫_{−h}^{k} (h + z)(k − z) φ(z) dz (h + k > 0, else 0).

Each integral is a Gauss–Legendre rule (nodes and weights from mpmath, printed into the
generated modules by nmgen) on a sinh-mapped variable θ = p + w sinh(u), centred at the
maximum p of G on the piece with the width w = 1/(|G'(p)| + √|G''(p)| + 1/length), so peaked
tail integrands (|h|, |k| up to 38) keep their relative accuracy; the part of a piece with
cos θ < ``_COS_SPLIT`` is integrated in v = −log cos θ, which maps the flat essential
singularity e^{−c/cos²θ} at |θ| = π/2 (|ρ| → 1) to a smooth decay.

h, k are clamped to ±``_CLIP``: beyond it every Gaussian factor underflows in float64.

Routing of C (``_cov_hybrid``, each route a mask): first the direct route
(``nmruntime.pair_direct``, with the compiled passes of ``relu_moments``; ``_cov_direct``:
|h|, |k| ≤ 7, |ρ| < 0.925, C = ρΦ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt by one fixed
Gauss–Legendre rule per |ρ| group, accepted where its rounding bound allows: the bulk of the
pairs; float32 in PyTorch re-evaluates its rejects, and 0.925 ≤ |ρ| < 0.99, in float64
arithmetic; float64 on eager CPU takes 0.925 ≤ |ρ| < 0.99 too, by a 32-point rule in s,
t = 2s/(1 + s²)); on eager CPU outside autograd, the ρ < 0 tail route on what it rejects
(``pair_direct.cov_neg_tail``: C = −(|ρ|Φ2(h, k; ρ) + ∫_ρ^0 |t| φ2 dt) for h + k ≤ 0, Φ2 by Gauss–Laguerre in
u = B(1/(1 + t) − 1/(1 + ρ)): the pairs whose ρΦ(h)Φ(k) + J cancels); on the elements they
leave (``_cov_routed``): 0 where a bound puts |C| below half the
smallest subnormal (``_underflows``); ρΦ(k) (or ρΦ(h)) where one unit is on almost surely and
the neglected term is provably below eps/4 relative (``_linear_ok``); the closed form
E − m(h)m(k) where its rounding bound allows; Mehler's series (``_cov_mehler``, |h|, |k| ≤ 38.5)
where it converges and keeps its digits; the quadrature above elsewhere (on eager CPU, a few
float64 elements go through the NumPy backend: ``_cov_std_few``). The elementwise building
blocks shared with the direct route (ops namespaces, Φ, masked branches) are in
``nmruntime.pair_ops``.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np

from nmruntime.pair_direct import DirectFront, _cov_direct, cov_neg_tail
from nmruntime.pair_ops import (
    _INV_2PI,
    _SQRT1_2,
    _TINY_NORMAL,
    _TORCH_OPS,
    _ncdf,
    _on,
    _torch_ops_cached,
    numpy_ops,
    renamed,
    sync_free,
    torch_ops,
)
from nmruntime.pair_tail import tail_or

__all__ = [
    "numpy_binding",
    "relu_cov_std",
    "relu_cross_ms",
    "relu_mean_ms",
    "relu_moments_ms",
    "torch_binding",
]

_CLIP = 50.0
_COS_SPLIT = 0.25
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_HALF_PI = 0.5 * math.pi
_V_MAX = 50.0


def _gexp(o, h, k, s, c2):
    """G(θ) from sin θ = s and cos²θ = c2 > 0, in the cancellation-free forms."""
    hk = h * k
    pos = s >= 0
    d = o.where(pos, h - k, h + k)
    lin = o.where(pos, -hk, hk) / (1.0 + o.abs(s))
    return -(d * d) / (2.0 * c2) + lin


def _peak(o, h, k, a, b):
    """(p, w): the maximum of G on [a, b] (θ) and the width of the sinh map there."""
    hk = h * k
    ah, ak = o.abs(h), o.abs(k)
    big, small = o.maximum(ah, ak), o.minimum(ah, ak)
    ratio = o.where(big > 0, small / o.where(big > 0, big, 1.0), 0.0)
    sg = o.where(hk > 0, 1.0, o.where(hk < 0, -1.0, 0.0))
    ts = sg * ratio  # stationary point of G in t = sin θ: min(|h/k|, |k/h|)·sign(hk)
    ps = o.asin(ts)
    p = o.clip(ps, a, b)
    t = o.sin(p)
    c2 = o.maximum(o.cos(p) ** 2, 1e-300)
    # Completed square (M = max(|h|, |k|)): G = −M²/2 − M² g²/2, g = (sin θ − ts)/cos θ, so
    # |G'| = M²|t − ts|(1 − ts·t)/cos³θ and G'' ≈ −M²(1 + (t − ts)²/cos²θ), with
    # t − ts = 2cos((p + ps)/2) sin((p − ps)/2) exactly 0 at an interior peak. (The expanded
    # forms h² + k² − 2hkt cancel there: at h ≈ −k, ts ≈ −1 they gave a spurious width ~1e-8.)
    dt = 2.0 * o.cos(0.5 * (p + ps)) * o.sin(0.5 * (p - ps))
    m2 = big * big
    one_m_tst = c2 + t * dt  # 1 − ts·t ≥ (1 − |t|) > 0
    g1 = m2 * o.abs(dt) * one_m_tst / (c2 * o.sqrt(c2))
    g2 = m2 * (1.0 + dt * dt / c2)
    w = o.maximum(1.0 / (g1 + o.sqrt(g2) + 1.0 / o.maximum(b - a, 1e-300)), 1e-300)
    # the map is a change of variables: its parameters carry no gradient
    return o.stop(p), o.stop(w)


def _theta_piece(o, h, k, a, b, weight, rule):
    """(1/2π) ∫_a^b weight(sin θ, cos²θ) e^{G(θ)} dθ on the sinh-mapped rule (a ≤ b, |θ| < π/2)."""
    x, w = rule
    p, wd = _peak(o, h, k, a, b)
    ua = o.asinh((a - p) / wd)
    ub = o.asinh((b - p) / wd)
    half = 0.5 * (ub - ua)
    u = (0.5 * (ua + ub))[..., None] + half[..., None] * x
    th = p[..., None] + wd[..., None] * o.sinh(u)
    s = o.sin(th)
    c2 = o.maximum(o.cos(th) ** 2, 1e-300)
    f = weight(s, c2) * o.exp(_gexp(o, h[..., None], k[..., None], s, c2)) * o.cosh(u)
    return o.matvec(f, w) * (wd * half) * _INV_2PI


def _end_piece(o, h, k, va, vb, sign, weight, rule):
    """(1/2π) ∫ weight(sin θ) e^{G} dθ over cos θ = e^{−v}, v ∈ [va, vb], θ of sign ``sign``.

    Sinh-mapped in v around the maximum of G (converted from θ), width at most 1.
    """
    x, w = rule
    a = o.acos(o.exp(-va))
    b = o.acos(o.exp(-vb))
    if sign < 0:
        a, b = -b, -a
    p, wd = _peak(o, h, k, a, b)
    pa = o.abs(p)
    tan = o.sin(pa) / o.maximum(o.cos(pa), 1e-300)
    w_peak = 1.0 / (1.0 + 1.0 / o.maximum(wd * tan, 1e-300))
    # G peaks inside the piece, or at the far end when that end is not θ = ±π/2: centre there
    # (in v); otherwise the factor cos θ = e^{−v} of dθ/dv makes the integrand decay from va.
    inside = (p > a) & (p < b)
    # d(G − v)/dv at the far end (dθ/dv = cot θ, dG/dθ = −[t(h² + k²) − hk(1 + t²)]/cos³θ):
    # positive means the integrand rises towards vb, whose cos θ = e^{−vb} is then not tiny
    pe = b if sign > 0 else a
    te = o.sin(pe)
    ce2 = o.maximum(o.cos(pe) ** 2, 1e-300)
    slope = -(te * (h * h + k * k) - h * k * (1.0 + te * te)) / (ce2 * te) - 1.0
    far = (slope > 0) & (~inside)
    # In v the peak of G has the width sv = wd·tan|p| and meets the factor cos θ = e^{−v} of
    # dθ/dv: e^{−(v − v_p)²/(2sv²) − v} peaks at v_p − sv². A flat θ-peak near |θ| = π/2
    # (h ≈ −k with h + k ≠ 0: sv ~ 1e8) thus puts the mass at va, not at v_p (7.8e-7 relative).
    sv = wd * tan
    pv_peak = o.clip(-o.log(o.maximum(o.cos(pa), 1e-300)) - sv * sv, va, vb)
    pv = o.where(inside, pv_peak, o.where(far, vb, va))
    wv = o.where(inside, w_peak, o.where(far, 1.0 / (1.0 + o.abs(slope)), 1.0 + 0.0 * w_peak))
    pv, wv = o.stop(pv), o.stop(o.maximum(wv, 1e-300))
    ua = o.asinh((va - pv) / wv)
    ub = o.asinh((vb - pv) / wv)
    half = 0.5 * (ub - ua)
    u = (0.5 * (ua + ub))[..., None] + half[..., None] * x
    v = pv[..., None] + wv[..., None] * o.sinh(u)
    c = o.exp(-v)
    one_minus = -o.expm1(-v)  # 1 − cos θ
    sabs = o.sqrt(one_minus * (1.0 + c))
    s = sabs * sign
    jac = c / o.maximum(sabs, 1e-300) * o.cosh(u)  # |dθ/dv| dv/du
    f = weight(s, c * c) * o.exp(_gexp(o, h[..., None], k[..., None], s, c * c)) * jac
    return o.matvec(f, w) * (wv * half) * _INV_2PI


def _cos_asin(o, x):
    """cos(asin x) = √((1 − x)(1 + x)) for |x| ≤ 1, relatively accurate near |x| = 1 (where
    cos(o.asin(x)) is not: asin's rounding near π/2 costs eps/cos relative)."""
    return o.sqrt((1.0 - x) * (1.0 + x))


def _integral(o, h, k, lo, hi, sign, weight, rule, cos_lo=None, cos_hi=None):
    """(1/2π) ∫ over θ ∈ sign·[lo, hi] (0 ≤ lo ≤ hi ≤ π/2) of weight(sin θ) e^{G(θ)} dθ.

    ``cos_lo``, ``cos_hi``: cos lo and cos hi where the caller has them more accurately than
    cos(lo) (an end asin ρ with |ρ| near 1: ``_cos_asin``); they place the end part's limits in
    v = −log cos θ. An end at θ = ±π/2 must pass ``cos_hi`` = 0: cos(fl(π/2)) = 6e-17 put the
    cut at v = 37.3 instead of ``_V_MAX``, which at h = −k (where e^G does not vanish at π/2)
    lost 6.5e-12 relative at ρ = −(1 − 1e-10), 6.5e-10 at −(1 − 1e-14)."""
    tc = math.acos(_COS_SPLIT)
    mid_lo = o.minimum(lo, o.full_like(lo, tc))
    mid_hi = o.minimum(hi, o.full_like(hi, tc))
    if sign > 0:
        inner = _theta_piece(o, h, k, mid_lo, mid_hi, weight, rule)
    else:
        inner = _theta_piece(o, h, k, -mid_hi, -mid_lo, weight, rule)
    # end part: |θ| in [max(lo, tc), max(hi, tc)], i.e. v = −log cos |θ| ≤ _V_MAX. Beyond
    # _V_MAX the integrand (≤ weight·e^{G}·e^{−v}/2π) adds at most e^{−_V_MAX} = 2e-22 times its
    # value at the end, relative to an integral ≥ that value times cos θ_lo ≥ 1.5e-8 (|ρ| ≤
    # 1 − 2⁻⁵³): below 1.5e-14 relative even at h = −k, where e^G does not vanish at π/2.
    vmin = -math.log(_COS_SPLIT)
    e_lo = o.maximum(lo, o.full_like(lo, tc))
    e_hi = o.maximum(hi, o.full_like(hi, tc))
    # (cos_lo > cos tc where lo < tc: then −log cos_lo < vmin and va = vmin as with e_lo)
    c_lo = o.cos(e_lo) if cos_lo is None else cos_lo
    c_hi = o.cos(e_hi) if cos_hi is None else cos_hi
    va = o.maximum(-o.log(o.maximum(c_lo, 1e-300)), o.full_like(lo, vmin))
    vb = o.maximum(-o.log(o.maximum(c_hi, 1e-300)), va)
    va = o.minimum(va, o.full_like(va, _V_MAX))
    vb = o.minimum(vb, o.full_like(vb, _V_MAX))
    # G ≈ −d²/(2cos²θ) − ... (d = h − k for θ > 0, h + k for θ < 0) falls off double-
    # exponentially in v beyond v ≈ −log|d|: for small |d| ≠ 0 that cut-off sits inside the end
    # part, which one rule does not resolve (7e-5 relative at h ≈ −k, ρ < 0): split there.
    d = o.abs(h - k) if sign > 0 else o.abs(h + k)
    vc = -o.log(o.maximum(d, 1e-300))
    v1 = o.stop(o.clip(vc - 1.0, va, vb))
    v2 = o.stop(o.clip(vc + 1.0, va, vb))
    end = _end_piece(o, h, k, va, v1, float(sign), weight, rule)
    end = end + _end_piece(o, h, k, v1, v2, float(sign), weight, rule)
    # Past v_cut, where −d²e^{2v}/2 + |hk| ≤ G(v2) − 200 (|G + d²/(2cos²θ)| ≤ |hk|), the last
    # piece's integrand is below e^{−200} of its value at v2, negligible against any integral
    # the rule sees there (≥ 1e-55 of it for |ρ| ≤ 1 − 2⁻⁵³); without the cut a bump at v2 of
    # width ≪ 1 drowned in a rule spread to _V_MAX (3.6e-9 relative at h = k = −0.3, ρ = −0.99).
    c2 = o.exp(-v2)
    s2 = float(sign) * o.sqrt(-o.expm1(-v2) * (1.0 + c2))
    g2 = _gexp(o, h, k, s2, c2 * c2)
    room = o.sqrt(2.0 * (o.abs(h * k) - g2 + 200.0))
    v_cut = o.log(room) - o.log(o.maximum(d, 1e-300))
    vb = o.stop(o.clip(v_cut, v2, vb))
    end = end + _end_piece(o, h, k, v2, vb, float(sign), weight, rule)
    return inner + end


def _interval_prob(o, h, k, rule):
    """L = Φ2(h, k; −1) = max(0, Φ(h) + Φ(k) − 1) = P(−h < Z < k), relatively accurate."""
    lo, hi = -h, k
    up = 0.5 * (o.erfc(lo * _SQRT1_2) - o.erfc(hi * _SQRT1_2))  # both ≥ 0: upper tails
    dn = 0.5 * (o.erfc(-hi * _SQRT1_2) - o.erfc(-lo * _SQRT1_2))  # both ≤ 0: lower tails
    mid = 1.0 - 0.5 * o.erfc(hi * _SQRT1_2) - 0.5 * o.erfc(-lo * _SQRT1_2)
    wide = o.where(lo >= 0, up, o.where(hi <= 0, dn, mid))
    # short intervals (length < 1): Gauss–Legendre on φ, sinh-mapped at the point nearest 0
    x, w = rule
    short = (hi - lo < 1.0) & (hi > lo)
    a = o.where(short, lo, 0.0 * lo)
    b = o.where(short, hi, 0.0 * lo + 1.0)
    c = o.stop(o.clip(0.0 * a, a, b))
    wd = 1.0 / (o.abs(c) + 1.0)
    ua = o.asinh((a - c) / wd)
    ub = o.asinh((b - c) / wd)
    half = 0.5 * (ub - ua)
    u = (0.5 * (ua + ub))[..., None] + half[..., None] * x
    z = c[..., None] + wd[..., None] * o.sinh(u)
    f = o.exp(-0.5 * z * z) * o.cosh(u)
    narrow = o.matvec(f, w) * (wd * half) * _INV_SQRT_2PI
    return o.where(hi <= lo, 0.0 * lo, o.where(short, narrow, wide))


def _clamped(o, h, k, r):
    big = o.full_like(h, _CLIP)
    return o.clip(h, -big, big), o.clip(k, -big, big), o.clip(r, -1.0 + 0.0 * r, 1.0 + 0.0 * r)


def _cov_pos(o, h, k, r, rule):
    """ρ ≥ 0: ρΦ(h)Φ(k) + (1/2π) ∫_0^{asin ρ} (ρ − sin θ) e^G dθ."""

    def theta(h, k, r, _):
        # ρ − sin θ = (1 − sin θ) − (1 − ρ) = cos²θ/(1 + sin θ) − (1 − ρ): exact near ρ = 1
        omr = (1.0 - r)[..., None]
        gap = lambda s, c2: c2 / (1.0 + s) - omr  # noqa: E731
        return _integral(o, h, k, 0.0 * h, o.asin(r), +1, gap, rule, cos_hi=_cos_asin(o, r))

    j = tail_or(o, h, k, r, 0.0 * h, "gap", rule, theta)  # interior peaks: gauss_integral
    return r * _ncdf(o, h) * _ncdf(o, k) + j


def _cov_neg(o, h, k, r, rule):
    """ρ < 0: −[|ρ| Φ2(h, k; ρ) + (1/2π)∫_{asin ρ}^0 |sin θ| e^G], with Φ2 = L +
    (1/2π)∫_{−π/2}^{asin ρ} e^G (positive terms) for every h, k. (Until the end part was split
    at cos θ = |h + k| and cut at ``_V_MAX``, the backend's Φ2 was used where h + k ≥ −4; in
    NumPy that Φ2 (Owen's T) is accurate only absolutely: 1.2e-11 relative on the covariance at
    (h, k, ρ) = (5.62, −6.88, −0.087), up to 1.5e-6 on seeded draws; the quadrature reaches
    3.6e-15 there.)"""
    zero = 0.0 * h

    def theta_a(h, k, r, _):  # over |θ| ∈ [|asin ρ|, π/2]
        ar, z = o.abs(r), 0.0 * h
        one = lambda s, c2: 1.0 + 0.0 * s  # noqa: E731
        return _integral(o, h, k, o.asin(ar), z + _HALF_PI, -1, one, rule, _cos_asin(o, ar), z)

    def theta_b(h, k, _, r):  # over |θ| ∈ [0, |asin ρ|]
        ar = o.abs(r)
        weight = lambda s, c2: o.abs(s)  # noqa: E731
        return _integral(o, h, k, 0.0 * h, o.asin(ar), -1, weight, rule, cos_hi=_cos_asin(o, ar))

    # joint tail (hk > 0): the exact inversion of G (nmruntime/pair_tail.py) keeps 1e-13
    j_a = tail_or(o, h, k, r, zero - 1.0, "one", rule, theta_a)
    j_b = tail_or(o, h, k, zero, r, "abs", rule, theta_b)
    p2 = _interval_prob(o, h, k, rule) + j_a
    return -(o.abs(r) * p2 + j_b)


def _cov_core(o, h, k, r, rule):
    """C(h, k, ρ) without the reflection (any h, k; |ρ| ≤ 1), 1-D inputs: the positive-term
    quadrature for every h, k (no backend Φ2, see ``_cov_neg``)."""
    pos = r >= 0
    return _on(pos, lambda *a: _cov_pos(o, *a, rule), h, k, r, safe=(0.0, 0.0, 0.5)) + _on(
        ~pos, lambda *a: _cov_neg(o, *a, rule), h, k, r, safe=(0.0, 0.0, -0.5)
    )


def _flat(fn):
    """Evaluate ``fn`` on flattened broadcast inputs and restore the shape."""

    def wrapped(o, *args, **kwargs):
        *arrays, rule = args
        shape = arrays[0].shape
        out = fn(o, *(v.reshape(-1) for v in arrays), rule, **kwargs)
        return out.reshape(shape)

    wrapped.__doc__ = fn.__doc__
    wrapped.__name__ = fn.__name__
    return wrapped


#: The closed form E − m(h)m(k) is used where its rounding error bound eps·(sum of the
#: magnitudes of its terms) is below _FAST_RATIO·eps·|C| (float64: 5.7e-14·|C|, float32:
#: 3.8e-6·|C|, inside the relative bars 1e-12 and 1e-5 of nmgen verify); the quadrature
#: elsewhere. Measured on p = 512 (μ ~ N(0, 1), Σ = WWᵀ/4 + 0.05 I, 1 thread): float64 ratio
#: 256 vs 32 is 10× faster with 4.9e-14 max relative change; float32 ratio 32 vs 8 is 1.4×
#: faster, 2.1e-6 max relative difference from float64.
_FAST_RATIO = {8: 256.0, 4: 32.0}


def _cov_closed(o, h, k, r, bvn):
    """(C from the Rosenbaum closed form, bound on the sum of its terms' magnitudes)."""
    if not isinstance(h, np.ndarray):
        from nmruntime.torch_support import compiled

        if compiled(h, "probe", _closed_low) is not None:
            return _cov_closed_grouped(o, h, k, r, bvn)
    return _closed_terms(o, h, k, r, bvn(h, k, r))


#: |ρ| groups of the Genz Φ2 scheme (nmruntime.bvn_torch): the 6-, 12- and 20-point rules
#: below these bounds; the high-|ρ| scheme above the last.
_GENZ_BOUNDS = ((0.0, 0.3, 6), (0.3, 0.75, 12), (0.75, 0.925, 20))


def _cov_closed_grouped(o, h, k, r, bvn):
    """``_cov_closed`` with ``compiled_bulk`` on: per |ρ| group of the Genz scheme, Φ2 (the
    same Gauss–Legendre rule and formula as ``nmruntime.bvn_torch``) and the closed form in
    one compiled pass (``_closed_low``); |ρ| ≥ 0.925 through ``bvn`` and ``_closed_terms``."""
    import torch

    from nmruntime.bvn_torch import default_rules
    from nmruntime.torch_support import compiled

    _torch_ops_cached()
    rules = default_rules()
    ar = r.abs()
    c, bound = torch.empty_like(h), torch.empty_like(h)
    rest = torch.ones_like(h, dtype=torch.bool)
    for lo, hi, n in _GENZ_BOUNDS:
        sel = ((ar >= lo) & (ar < hi)).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        rest[sel] = False
        x, w = (tuple(float(t) for t in v) for v in rules[n])
        low = lambda a, b, c, x=x, w=w: _closed_low(a, b, c, x, w)  # noqa: E731
        run = compiled(h, f"closed{n}", low) or low  # eager where compiling failed in this call
        c[sel], bound[sel] = run(h[sel], k[sel], r[sel])
    sel = rest.nonzero().squeeze(1)
    if sel.numel():
        hs, ks, rs = h[sel], k[sel], r[sel]
        c[sel], bound[sel] = _closed_terms(o, hs, ks, rs, bvn(hs, ks, rs))
    return c, bound


def _closed_low(h, k, r, x, w):
    """(C, bound) of ``_closed_terms`` with Φ2 by the low-|ρ| scheme of ``nmruntime.bvn_torch``
    (|ρ| < 0.925, one rule (x, w) of n nodes; h, k finite, moderate): Φ(h)Φ(k) + asin ρ/(4π)
    Σ w_i e^{(hk s_i − (h² + k²)/2)/(1 − s_i²)}, s_i = sin(asin ρ (1 + x_i)/2), clipped to the
    Fréchet bounds as there. Shapes: h, k, r (m,); x, w: n Python floats (unrolled)."""
    import torch

    o = _TORCH_OPS[0]
    ph, pk = _ncdf(o, h), _ncdf(o, k)
    upper = torch.minimum(ph, pk)
    lower = (upper - _ncdf(o, -torch.maximum(h, k))).clamp_min(0.0)
    hk = h * k
    hs = (h * h + k * k) * 0.5
    asr = torch.asin(r)
    cut = -700.0 if h.dtype == torch.float64 else -87.0
    acc = 0.0 * h
    for xi, wi in zip(x, w, strict=True):  # Python floats: unrolled, elementwise (vectorised)
        sn = torch.sin(asr * (0.5 * (1.0 + xi)))
        e = (sn * hk - hs) / (1.0 - sn * sn)
        acc = acc + wi * torch.where(e < cut, 0.0, torch.exp(e))
    p2 = ph * pk + asr * acc * (0.5 * _INV_2PI)
    p2 = torch.minimum(torch.maximum(p2, lower), upper)
    return _closed_terms(o, h, k, r, p2)


def _fused(o, name: str, fn, *args, by_numpy: bool = False):
    """``fn(o, *args)``; with ``nmruntime.torch_support.compiled_bulk`` on (eager CPU tensors
    outside autograd) through one ``torch.compile`` of it (one fused pass over memory).

    ``by_numpy``: fn is o-free arithmetic of correctly rounded operations only (additions,
    products, 1/x: the same values bit for bit in NumPy and torch) returning a tuple; on eager
    CPU tensors outside autograd it then runs by NumPy on views of them, at NumPy's
    per-operation cost instead of torch's (``_cf``'s 378 operations on p = 1024's 49 tail
    elements: 0.155 vs 0.919 ms at 1 thread, medians of 50)."""
    if isinstance(args[0], (np.ndarray, np.generic)):
        return fn(o, *args)
    from nmruntime.torch_support import compiled_graph

    run = compiled_graph(args[0], name, lambda *a: fn(o, *a))
    if run is not None:
        return run(*args)
    if by_numpy and not sync_free(args[0]) and not any(a.requires_grad for a in args):
        import torch

        arrays = [a.numpy() for a in args]
        few = 0 < arrays[0].size <= _BY_SCALARS and arrays[0].dtype == np.float64
        if few and all(a.shape == arrays[0].shape for a in arrays):
            # Python floats are IEEE doubles, each operation correctly rounded as NumPy's:
            # the same values bit for bit, element by element at Python's per-operation cost
            cols = [
                fn(None, *v) for v in zip(*(a.reshape(-1).tolist() for a in arrays), strict=True)
            ]
            shape = args[0].shape
            return tuple(
                torch.tensor(list(col), dtype=torch.float64).reshape(shape)
                for col in zip(*cols, strict=True)
            )
        return tuple(torch.from_numpy(v) for v in fn(None, *arrays))
    return fn(o, *args)


#: ``_fused(..., by_numpy=True)`` on at most this many float64 elements runs element by
#: element on Python floats: ``_cf`` took 30 / 45 / 86 µs that way on 1 / 2 / 8 elements against
#: ~165 µs by NumPy (its 378 operations' fixed cost) at any of these sizes (1 thread, scratch
#: ``/tmp/s31/cf.py``; the per-variable moments at p = 64 had 2 tail elements).
_BY_SCALARS = 8


def _closed_terms(o, h, k, r, p2):
    """``_cov_closed`` given Φ2(h, k; ρ) = ``p2``."""
    s = o.sqrt((1.0 - r) * (1.0 + r))
    ph = o.exp(-0.5 * h * h) * _INV_SQRT_2PI
    pk = o.exp(-0.5 * k * k) * _INV_SQRT_2PI
    a_h = (k - r * h) / s
    a_k = (h - r * k) / s
    t1 = (h * k + r) * p2
    t2 = h * pk * _ncdf(o, a_k)
    t3 = k * ph * _ncdf(o, a_h)
    t4 = s * ph * o.exp(-0.5 * a_h * a_h) * _INV_SQRT_2PI
    mh = h * _ncdf(o, h) + ph
    mk = k * _ncdf(o, k) + pk
    mm = mh * mk
    c = t1 + t2 + t3 + t4 - mm
    # Φ2 itself is accurate to a few eps absolutely (not relatively): its term contributes
    # |hk + ρ|·(a few eps)
    bound = (
        o.abs(t1) + o.abs(t2) + o.abs(t3) + t4 + mm + o.abs(h * _ncdf(o, h)) * mk
    ) + 4.0 * o.abs(h * k + r)
    return c, bound


#: Mehler series: terms evaluated, and the |ρ|, |h|, |k| and |ρ|(h² + k²) where it is tried.
#: The term counts (33, 81, 401) are 1 + multiples of the last of ``_MEHLER_BLOCKS``, so the
#: compiled bulk runs them in whole blocks (a remainder would run eagerly, step by step).
_MEHLER_TERMS = 81
#: Terms of the first, short pass on eager CPU (see ``_cov_general``).
_MEHLER_SHORT = 33
_MEHLER_RHO = 0.8
_MEHLER_HK = 38.5
#: |ρ|(h² + k²) ≤ _MEHLER_SPREAD keeps every scaled term below e^{60}·(a few): finite in float32
#: (the sum needs ≈ e·|ρhk| ≤ 80 terms anyway, |ρhk| ≤ |ρ|(h² + k²)/2).
_MEHLER_SPREAD = 120.0


#: The long pass (eager CPU only, on the elements the 81-term series and the closed form
#: leave): more terms and a wider |ρ| (Mehler's series converges for every |ρ| < 1), accepted
#: only where, besides the tests above, Cramér's bound puts the whole neglected tail below
#: eps·|C| (``_cramer_tail_ok``). On `nm bench floor`'s p = 1024 problem it takes 9,269 of the
#: 9,439 pairs that reached the quadrature (whose cost was 17 µs per pair, 1 thread).
_MEHLER_LONG_TERMS = 401
_MEHLER_LONG_RHO = 0.95
#: Cramér's inequality: |He_n(x)| e^{−x²/4} ≤ K √(n!) for every real x and n ≥ 0
#: (Abramowitz & Stegun 22.14.17, K < 1.086435 for the physicists' H_n, with He_n(x) =
#: 2^{−n/2} H_n(x/√2)).
_CRAMER_K = 1.086435


def _cramer_tail_ok(o, h, k, r, c, terms, eps):
    """Mask where Mehler's tail after ``terms`` terms is provably below eps·|C|.

    |u_m(x)| ≤ K e^{x²/4} (Cramér), so Σ_{m ≥ T} |ρ|^{m+2} |u_m(h) u_m(k)|/((m + 1)(m + 2))
    ≤ K² e^{(h² + k²)/4} |ρ|^{T+2}/((T + 1)(T + 2)(1 − |ρ|)), and with the factor φ(h)φ(k)
    the neglected part of C is at most K²/(2π) e^{−(h² + k²)/4} |ρ|^{T+2}/((T + 1)(T + 2)(1 − |ρ|)).
    Tested in logs (|C| below the smallest normal counts as that number).
    """
    ar = o.minimum(o.abs(r), 1.0 - 1e-3)
    hh = h * h + k * k
    log_tail = (
        2.0 * math.log(_CRAMER_K)
        - math.log(2.0 * math.pi)
        - 0.25 * hh
        + (terms + 2.0) * o.log(o.maximum(ar, 1e-300))
        - math.log((terms + 1.0) * (terms + 2.0))
        - o.log(1.0 - ar)
    )
    tiny = _TINY_NORMAL[eps < 1e-10]
    return log_tail < o.log(eps * o.maximum(o.abs(c), tiny + 0.0 * c))


def _cov_mehler(o, h, k, r, eps_ratio, eps, terms=_MEHLER_TERMS, rho_max=_MEHLER_RHO):
    """(C by Mehler's expansion, accepted) for |ρ| ≤ ``rho_max`` (no transcendental in the loop).

    Cov[f(Z1), g(Z2)] = Σ_{n≥1} ρⁿ/n! E[f⁽ⁿ⁾(Z)] E[g⁽ⁿ⁾(Z)] with f = relu(h + ·):
    E f' = Φ(h), E f⁽ⁿ⁾ = (−1)ⁿ He_{n−2}(h) φ(h) (n ≥ 2), so
    C = ρΦ(h)Φ(k) + φ(h)φ(k) Σ_{m≥0} ρ^{m+2} u_m(h) u_m(k)/((m + 1)(m + 2)),
    u_m = He_m/√(m!) (u_{m+1} = (x u_m − √m u_{m−1})/√(m + 1)). The loop carries the scaled
    v_m(h) = a^m u_m(h), v_m(k) = (sa)^m u_m(k) (a = √|ρ|, s = sign ρ; |v_m| ≤ e^{|ρ|x²/2}), and
    φ(h)φ(k) is applied as e^{−(h² + k²)/2 + S}·e^{−S}, S = |ρ|(h² + k²)/2, so deep |h|, |k|
    (to 38.5) neither overflow the terms nor underflow φ(h)φ(k) before the product. Accepted
    where the rounding bound eps·(|ρΦΦ| + φφ Σ|terms|) is below eps_ratio·eps·|C| and the last
    two terms are below eps·|C| (the terms decay once m exceeds |ρhk| and, for the oscillating
    u_m, h²/4 and k²/4; checked against mpmath in tests/test_pair_mehler.py and
    tests/test_pair_routes.py). Below the smallest normal number |C| counts as that number:
    there the result is accurate to a few subnormal ulps, and its sign is right.
    """
    h, k, r, ar, hh, lin, dom, ah, sak = _mehler_prelude(o, h, k, r, rho_max)
    total, mag, t, t_prev = _mehler_sums(o, ah, sak, ar, terms)
    return _mehler_finish(o, r, ar, hh, lin, dom, (total, mag, t, t_prev), eps_ratio, eps)


def _mehler_prelude(o, h, k, r, rho_max: float):
    """Mehler's domain and loop inputs: (h, k, r masked to 0 outside the domain, |ρ|,
    h² + k², ρΦ(h)Φ(k), domain, a·h, s·a·k) with a = √|ρ|, s = sign ρ."""
    ar = o.abs(r)
    hh = h * h + k * k
    dom = (
        (ar <= rho_max)
        & (o.abs(h) <= _MEHLER_HK)
        & (o.abs(k) <= _MEHLER_HK)
        & (ar * hh <= _MEHLER_SPREAD)
    )
    # finite elsewhere (each masked from itself, so no gradient crosses between them)
    h, k, r = o.where(dom, h, 0.0 * h), o.where(dom, k, 0.0 * k), o.where(dom, r, 0.0 * r)
    ar = o.abs(r)
    hh = h * h + k * k
    lin = r * _ncdf(o, h) * _ncdf(o, k)
    a = o.sqrt(o.maximum(ar, 1e-300))  # > 0: a finite derivative at ρ = 0
    ah = a * h
    sak = o.where(r < 0, -a, a) * k
    return h, k, r, ar, hh, lin, dom, ah, sak


def _mehler_finish(o, r, ar, hh, lin, dom, sums, eps_ratio, eps):
    """(C, accepted) of ``_cov_mehler`` from the loop's (Σ terms, Σ |terms|, last term, the
    one before) = ``sums`` and the masked r, |ρ|, h² + k², ρΦ(h)Φ(k), domain there."""
    total, mag, t, t_prev = sums
    s = 0.5 * ar * hh
    scale = o.exp(-s)
    pp = (r * r) * o.exp(s - 0.5 * hh) * _INV_2PI
    c = lin + pp * (total * scale)
    ac = o.abs(c)
    bound = o.abs(lin) + pp * (mag * scale)
    tail = pp * ((o.abs(t) + o.abs(t_prev)) * scale)
    # below the normal range (|C| < tiny) only absolute accuracy exists: a few subnormal ulps
    # (tiny·eps each) from the last products; accepted where that error is still below
    # eps_ratio·eps·tiny and below |C| (so the sign is right)
    tiny = _TINY_NORMAL[eps < 1e-10]
    err = eps * bound + 4.0 * tiny * eps
    floor = o.maximum(ac, tiny + 0.0 * ac)
    ok = dom & (err < eps_ratio * eps * floor) & (tail < eps * floor) & (err < ac)
    return c, ok


def _cov_mehler_cascade(o, h, k, r, eps_ratio, eps):
    """(C, accepted) of Mehler's passes on eager CPU tensors outside autograd, in one loop:
    the short pass (``_MEHLER_SHORT`` terms), the full one (``_MEHLER_TERMS``) and, where
    ``_MEHLER_LONG_TERMS`` exceeds it, the long one (Cramér's tail bound as well) are the
    same recurrence stopped at three checkpoints. Each element takes the value and the
    acceptance test of the first pass that accepts it, exactly as when the passes run one
    after another on the elements the previous one left (``_cov_general``); here the loop
    is not restarted from m = 0 for each pass, and the accepted elements leave it at each
    checkpoint (515 steps become 401, on fewer elements: the passes' cost is mostly
    per-operation overhead on the few thousand pairs the direct route leaves)."""
    import torch

    points = [(_MEHLER_SHORT, _MEHLER_RHO), (_MEHLER_TERMS, _MEHLER_RHO)]
    if _MEHLER_LONG_TERMS > _MEHLER_TERMS:
        points.append((_MEHLER_LONG_TERMS, _MEHLER_LONG_RHO))
    rho_max = max(v for _, v in points)
    h, k, r, ar, hh, lin, dom, ah, sak = _mehler_prelude(o, h, k, r, rho_max)
    t = 0.5 + 0.0 * ah
    state = (1.0 + 0.0 * ah, ah, 1.0 + 0.0 * sak, sak, t, t, t, t)
    per = (h, k, r, ar, hh, lin, dom, ah, sak)  # per-element inputs, compacted with the state
    c_out = torch.zeros_like(h)
    ok_out = torch.zeros_like(h, dtype=torch.bool)
    left = torch.arange(h.shape[0], device=h.device)
    m = 1
    for terms, rho in points:
        hs, ks, rs, ars, hhs, lins, doms, ahs, saks = per
        state = _mehler_run(ahs, saks, ars, state, m, terms)
        m = terms
        c, ok = _mehler_finish(o, rs, ars, hhs, lins, doms, state[4:], eps_ratio, eps)
        ok = ok & (ars <= rho)
        if terms == _MEHLER_LONG_TERMS and terms > _MEHLER_TERMS:
            ok = ok & _cramer_tail_ok(o, hs, ks, rs, c, terms, eps)
        got = ok.nonzero().squeeze(1)
        if got.numel():
            dst = left.index_select(0, got)
            c_out.index_copy_(0, dst, c.index_select(0, got))
            ok_out.index_fill_(0, dst, True)
        keep = (~ok).nonzero().squeeze(1)
        if keep.numel() == 0:
            break
        if keep.numel() < ok.numel():
            left = left.index_select(0, keep)
            per = tuple(v.index_select(0, keep) for v in per)
            state = tuple(v.index_select(0, keep) for v in state)
    return c_out, ok_out


def _mehler_run(ah, sak, ar, state, m: int, terms: int):
    """Mehler's loop (``_mehler_sums``' state) advanced from step ``m`` to ``terms``: in the
    compiled blocks where ``compiled_bulk`` is on, the rest stacked (eager CPU, no autograd)."""
    state, m = _mehler_blocks(ah, sak, ar, state, m, terms)
    return _mehler_steps_stacked(ah, sak, ar, state, _mehler_coef(m, terms - m))


def _mehler_blocks(ah, sak, ar, state, m: int, terms: int):
    """(state, m) after the whole compiled blocks of Mehler's steps from step ``m`` towards
    ``terms`` where ``compiled_bulk`` is on (the largest of ``_MEHLER_BLOCKS`` that fits,
    repeatedly); else (state, m) unchanged."""
    for size in _MEHLER_BLOCKS:
        block = _compiled_block(ah, size)
        if block is None:
            break
        while terms - m >= size:
            state = block(ah, sak, ar, *state, _mehler_coef_tensor(m, size, ah.dtype))
            m += size
    return state, m


_MEHLER_COEF: dict = {}


def _mehler_coef_tensor(m0: int, count: int, dtype):
    """``_mehler_coef(m0, count)`` as a ``count x 3`` CPU tensor of ``dtype`` (cached)."""
    key = (m0, count, dtype)
    if key not in _MEHLER_COEF:
        import torch

        _MEHLER_COEF[key] = torch.tensor(_mehler_coef(m0, count), dtype=dtype)
    return _MEHLER_COEF[key]


def _mehler_coef(m0: int, count: int) -> list[tuple[float, float, float]]:
    """(1/((m + 1)(m + 2)), 1/√(m + 1), √m/√(m + 1)) for m = m0, …, m0 + count − 1."""
    out = []
    for m in range(m0, m0 + count):
        c1 = 1.0 / math.sqrt(m + 1)
        out.append((1.0 / ((m + 1) * (m + 2)), c1, math.sqrt(m) * c1))
    return out


def _mehler_steps(ah, sak, ar, vh0, vh1, vk0, vk1, total, mag, t, t_prev, coef):
    """``len(coef)`` steps of Mehler's loop (see ``_cov_mehler``): adds the terms
    v_m(h) v_m(k)/((m + 1)(m + 2)) and advances the three-term recurrences. ``coef``: rows of
    ``_mehler_coef`` (floats, or a ``count x 3`` tensor for the compiled block)."""
    for row in range(len(coef)):
        q, c1, c0 = coef[row][0], coef[row][1], coef[row][2]
        t_prev = t
        t = vh1 * vk1 * q
        total = total + t
        mag = mag + abs(t)  # builtin abs: NumPy arrays and tensors alike
        vh0, vh1 = vh1, ah * vh1 * c1 - ar * vh0 * c0
        vk0, vk1 = vk1, sak * vk1 * c1 - ar * vk0 * c0
    return vh0, vh1, vk0, vk1, total, mag, t, t_prev


#: Steps per call of the compiled Mehler blocks (``_mehler_sums`` with ``compiled_bulk``),
#: largest first. A compiled call costs ~40-85 µs of dynamo and wrapper overhead on the few
#: thousand pairs the direct route leaves, more than its arithmetic: 8-step blocks made 50
#: calls per p = 1024 call, 16-step blocks make 25 (the cascade 4.9 → 3.5 ms). (80, 16) made
#: 9 (3.2 ms, within the noise) but its 80-step block took 65 s to compile cold (16: 19 s).
_MEHLER_BLOCKS = (16,)


def _mehler_sums(o, ah, sak, ar, terms: int):
    """(Σ terms, Σ |terms|, last term, the one before) of Mehler's scaled series.

    Eager: one elementwise pass per operation and step. With
    ``nmruntime.torch_support.compiled_bulk`` on (eager CPU tensors without autograd), the
    steps run in compiled blocks of ``_MEHLER_BLOCKS`` (one fused pass over memory each; the
    step's constants enter as a tensor, so one compiled block serves every m).
    """
    t = 0.5 + 0.0 * ah
    state = (1.0 + 0.0 * ah, ah, 1.0 + 0.0 * sak, sak, t, t, t, t)
    state, m = _mehler_blocks(ah, sak, ar, state, 1, terms)
    coef = _mehler_coef(m, terms - m)
    if isinstance(ah, np.ndarray) or sync_free(ah) or ah.requires_grad or sak.requires_grad:
        state = _mehler_steps(ah, sak, ar, *state, coef)
    else:
        state = _mehler_steps_stacked(ah, sak, ar, state, coef)
    return state[4], state[5], state[6], state[7]


def _mehler_steps_stacked(ah, sak, ar, state, coef):
    """``_mehler_steps`` on eager CPU tensors outside autograd, bit for bit: the h and k
    recurrences stacked as one 2 x n tensor and updated in place (10 tensor operations per
    step instead of 15: the long pass's 400 steps are dominated by per-operation overhead)."""
    import torch

    vh0, vh1, vk0, vk1, total, mag, t, t_prev = state
    a, v0, v1 = torch.stack([ah, sak]), torch.stack([vh0, vk0]), torch.stack([vh1, vk1])
    total, mag = total.clone(), mag.clone()
    for q, c1, c0 in coef:
        t_prev = t
        t = v1.prod(0).mul_(q)  # v1[0]·v1[1] (one rounding, as there) in one operation
        total.add_(t)
        mag.add_(t.abs())
        # a·v1·c1 − ar·v0·c0, in the order of ``_mehler_steps``: ((a·v1)·c1) − ((ar·v0)·c0)
        v0, v1 = v1, torch.mul(a, v1).mul_(c1).sub_(torch.mul(v0, ar).mul_(c0))
    return v0[0], v1[0], v0[1], v1[1], total, mag, t, t_prev


def _compiled_block(x, size: int):
    """The compiled Mehler block of ``size`` steps for ``x``'s kind, or None (NumPy,
    autograd, sync-free, off). A code object of its own per size (dynamo keys its cache on
    the code object; the step count is specialised)."""
    if isinstance(x, np.ndarray):
        return None
    from nmruntime.torch_support import compiled

    return compiled(x, f"mehler{size}", _MEHLER_STEPS_NAMED[size])


#: ``_mehler_steps`` per block size, each under a code object of its own.
_MEHLER_STEPS_NAMED = {n: renamed(_mehler_steps, f"mehler_{n}") for n in _MEHLER_BLOCKS}


#: log of half the dtype's smallest subnormal (float64: 2⁻¹⁰⁷⁵, float32: 2⁻¹⁵⁰), less a margin
#: of 1 for the rounding of the bound itself; keyed by "float64 or not" through eps.
_LOG_HALF_SUBNORMAL = {True: -1075.0 * math.log(2.0) - 1.0, False: -150.0 * math.log(2.0) - 1.0}


def _underflows(o, h, k, r, eps):
    """Mask where |C(h, k, ρ)| is below half the smallest subnormal, so C rounds to 0.

    C = ∫_0^ρ Φ2(h, k; t) dt with 0 ≤ Φ2 increasing in t, so |C| ≤ |ρ| Φ2(h, k; t*),
    t* = max(ρ, 0), and Φ2(h, k; t*) ≤ Φ(−d) ≤ φ(d)/d ≤ φ(d) (d ≥ 1), d the Mahalanobis
    distance (correlation t*) from 0 to the orthant {z1 ≤ h, z2 ≤ k}: it lies in the half-space
    tangent to the Mahalanobis ball at the orthant's nearest point. For h, k < 0 that point is
    the corner, d² = (h² − 2t*hk + k²)/(1 − t*²), where |h| ≥ t*|k| and |k| ≥ t*|h|, else on a
    face, d = max(|h|, |k|); if one of h, k is ≥ 0, d = max(−h, −k, 0). The test
    log(ρ²/d²)/2 − d²/2 − log √(2π) < log(half subnormal) − 1 takes one log (no square root).
    """
    ts = o.maximum(r, 0.0 * r)
    hn, kn = o.maximum(-h, 0.0 * h), o.maximum(-k, 0.0 * k)
    face = o.maximum(hn, kn)
    om = o.maximum((1.0 - ts) * (1.0 + ts), 1e-300)
    # h² − 2t*hk + k² = (h − k)² + 2(1 − t*)hk: terms ≥ 0 where the corner is used (hk > 0),
    # so no cancellation as t* → 1
    corner = ((h - k) ** 2 + 2.0 * (1.0 - ts) * (h * k)) / om
    use_corner = (h < 0) & (k < 0) & (hn >= ts * kn) & (kn >= ts * hn)
    d2 = o.maximum(o.where(use_corner, corner, face * face), 1.0 + 0.0 * h)
    log_bound = 0.5 * (o.log(o.maximum(r * r, 1e-300) / d2) - d2 - math.log(2.0 * math.pi))
    return (d2 > 1.0) & (log_bound < _LOG_HALF_SUBNORMAL[eps < 1e-10])


def _linear_ok(o, h, k, r, eps):
    """Mask where C(h, k, ρ) = ρΦ(k)(1 + δ), |δ| ≤ eps/4 (unit 1 is on almost surely).

    relu(x) = x + relu(−x) gives C(h, k, ρ) = ρΦ(k) + C(−h, k, −ρ) (Stein: Cov[Z1, (k + Z2)⁺]
    = ρΦ(k)). The correction is ∫_0^{−ρ} Φ2(−h, k; t) dt with Φ2 increasing in t, so
    |C(−h, k, −ρ)| ≤ |ρ| Φ2(−h, k; r*), r* = max(−ρ, 0), and |δ| ≤ Φ2(−h, k; r*)/Φ(k) ≤ e^{−E/2}:

    * k ≥ 0: Φ2 ≤ Φ(−h) ≤ e^{−h²/2}/2 and Φ(k) ≥ 1/2, so E = h².
    * k < 0, h ≥ r*|k|: the orthant {z1 ≤ −h, z2 ≤ k} lies in the half-space tangent to the
      Mahalanobis ball at its nearest point, at distance d, so Φ2 ≤ Φ(−d); and
      Φ(−d)/Φ(−|k|) ≤ e^{−(d² − k²)/2} for d ≥ |k| (log Φ(−x) has slope −φ(x)/Φ(−x) ≤ −x).
      The nearest point is the corner, d² = k² + (h − r*|k|)²/(1 − r*²), where |k| ≥ r*h;
      otherwise the face z1 = −h, d = h, E = h² − k².
    * k < 0, h < r*|k|: given the rare z2 > −k the other unit is off: no bound (E = 0).

    Routed where E ≥ 2 log(4/eps) (float64: 74.9, h ≥ 8.65 at least).
    """
    rs = o.maximum(-r, 0.0 * r)
    ak = o.abs(k)
    om = o.maximum((1.0 - rs) * (1.0 + rs), 1e-300)
    x = (h - rs * ak) ** 2 / om
    e = o.where(k >= 0, h * h, o.where(ak >= rs * h, x, h * h - k * k))
    return (h >= 0) & ((k >= 0) | (h >= rs * ak)) & (e >= 2.0 * math.log(4.0 / eps))


def _cheap_masks(o, h, k, r, eps):
    """(``_underflows``, ``_linear_ok`` for unit 1, for unit 2)."""
    return _underflows(o, h, k, r, eps), _linear_ok(o, h, k, r, eps), _linear_ok(o, k, h, r, eps)


def _cov_hybrid(o, h, k, r, rule, bvn, eps_ratio, eps=2.0**-52, cdf=None):
    """C: the direct route (``_cov_direct``) where it applies, the routes of ``_cov_routed``
    on the elements it leaves (masked: on every element when ``sync_free``)."""
    c, ok = _cov_direct(o, h, k, r, eps, cdf)
    if not isinstance(h, np.ndarray) and not sync_free(h):
        if not (h.requires_grad or k.requires_grad or r.requires_grad):
            # eager CPU outside autograd: one index of the leftover pairs (not a boolean mask
            # per argument), their values written into C in place (not a ``where`` pass)
            idx = (~ok).nonzero().squeeze(1)
            if idx.numel() == 0:
                return c
            hs, ks, rs = (v.index_select(0, idx) for v in (h, k, r))
            c_neg, ok_neg = cov_neg_tail(hs, ks, rs, eps)  # cancelling ρ < 0 pairs
            c.index_copy_(0, idx, c_neg)
            idx, hs, ks, rs = (v[~ok_neg] for v in (idx, hs, ks, rs))
            if idx.numel() == 0:
                return c
            rest = _cov_routed(o, *_clamped(o, hs, ks, rs), rule, bvn, eps_ratio, eps)
            return c.index_copy_(0, idx, rest)
        if bool(ok.all()):
            return c
    rest = _on(
        ~ok,
        lambda *a: _cov_routed(o, *_clamped(o, *a), rule, bvn, eps_ratio, eps),
        h,
        k,
        r,
        safe=(0.0, 0.0, 0.5),
    )
    return o.where(ok, c, rest)


def _cov_routed(o, h, k, r, rule, bvn, eps_ratio, eps=2.0**-52):
    """C: 0 where it underflows, ρΦ(k) (or ρΦ(h)) where one unit is on almost surely
    (``_linear_ok``: the neglected term is below eps/4 relative), else the closed form where it
    provably keeps its digits, else Mehler's series where it converges and keeps its digits
    (|ρ| ≤ 0.8), the positive-term quadrature elsewhere (no Φ2)."""
    under, lin_h, lin_k = _fused(o, f"cheap{eps}", lambda o, *a: _cheap_masks(o, *a, eps), h, k, r)
    cheap = under | lin_h | lin_k
    # ρΦ(k) where unit 1 is on, ρΦ(h) where unit 2 is (eager CPU: only on those elements)
    other = o.where(lin_h, k, h)
    lin = cheap & ~under
    v_cheap = _on(lin, lambda s, rr: rr * _ncdf(o, s), other, r, safe=(0.0, 0.5))
    general = ~cheap
    if not sync_free(h) and bool(general.all()):  # eager: no gather/scatter of every element
        return _cov_general(o, h, k, r, rule, bvn, eps_ratio, eps)
    rest = _on(
        general,
        lambda *a: _cov_general(o, *a, rule, bvn, eps_ratio, eps),
        h,
        k,
        r,
        safe=(0.0, 0.0, 0.5),
    )
    return o.where(cheap, v_cheap, rest)


#: Elements per closed-form evaluation on eager CPU: its ~40 elementwise passes stay in
#: cache, while the routes after it (Mehler's series, the quadrature: many short passes, each
#: with a fixed per-call cost) run once on all the elements the closed form leaves.
_BULK_SLICE = 1 << 16


def _sliced(size: int, fn, o, *args):
    """``fn(o, *args)`` (a tuple of 1-D arrays) in slices of ``size`` elements (0: at once)."""
    n = args[0].shape[0]
    if size <= 0 or n <= size:
        return fn(o, *args[:3], *args[3:])
    parts = [fn(o, *(v[a : a + size] for v in args[:3]), *args[3:]) for a in range(0, n, size)]
    cat = np.concatenate if isinstance(args[0], np.ndarray) else _torch_cat
    return tuple(cat([part[i] for part in parts]) for i in range(len(parts[0])))


def _torch_cat(vs):
    import torch

    return torch.cat(vs)


def _cov_general(o, h, k, r, rule, bvn, eps_ratio, eps):
    """C by the closed form, Mehler's series or the quadrature (see ``_cov_hybrid``)."""
    moderate = (o.abs(r) <= 0.99) & (h > -6.0) & (k > -6.0) & (h < 8.0) & (k < 8.0)
    z = 0.0 * h
    eager = not isinstance(h, np.ndarray) and not sync_free(h)
    grad = eager and (h.requires_grad or k.requires_grad or r.requires_grad)
    if not sync_free(h) and bool(moderate.all()):  # eager: skip three passes
        c, bound = _sliced(_BULK_SLICE, _cov_closed, o, h, k, r, bvn)
    elif eager and not grad:
        # eager CPU outside autograd: the closed form on the moderate elements only (on
        # LeNet's layers under 10% of the pairs that reach here: the joint tails), C = 0 and
        # an infinite bound elsewhere (not accepted)
        idx = moderate.nonzero().squeeze(1)
        c, bound = z.clone(), z + math.inf
        if idx.numel():
            cm, bm = _sliced(
                _BULK_SLICE, _cov_closed, o, *(v.index_select(0, idx) for v in (h, k, r)), bvn
            )
            c.index_copy_(0, idx, cm)
            bound.index_copy_(0, idx, bm)
    else:
        hm, km, rm = o.where(moderate, h, z), o.where(moderate, k, z), o.where(moderate, r, z)
        c, bound = _sliced(0 if sync_free(h) else _BULK_SLICE, _cov_closed, o, hm, km, rm, bvn)
    ok = moderate & (bound < eps_ratio * o.abs(c))

    def series_or_quadrature(h, k, r, terms=_MEHLER_TERMS):
        if terms > _MEHLER_TERMS:  # the long pass: Cramér's tail bound as well
            cm, good = _cov_mehler(o, h, k, r, eps_ratio, eps, terms, _MEHLER_LONG_RHO)
            good = good & _cramer_tail_ok(o, h, k, r, cm, terms, eps)
        else:
            cm, good = _cov_mehler(o, h, k, r, eps_ratio, eps, terms)
        if terms < _MEHLER_TERMS:  # the elements not yet converged: the full series next
            rest = _on(~good, series_or_quadrature, h, k, r, safe=(0.0, 0.0, 0.5))
        elif terms == _MEHLER_TERMS < _MEHLER_LONG_TERMS and not sync_free(h):  # eager: long pass
            rest = _on(
                ~good,
                lambda *a: series_or_quadrature(*a, _MEHLER_LONG_TERMS),
                h,
                k,
                r,
                safe=(0.0, 0.0, 0.5),
            )
        else:
            rest = _on(~good, lambda *a: _cov_std(o, *a, rule), h, k, r, safe=(0, 0, 0.5))
        return o.where(good, cm, 0.0 * h) + rest

    # eager CPU: the short series first, accepted on the same tests (it takes 75% (float64)
    # to 99% (float32) of the elements the full series accepts on `nm bench floor`'s problem
    # and on LeNet's layers); masked (sync-free) code runs the full series once. Outside
    # autograd the three eager passes run as one loop (``_cov_mehler_cascade``).
    if eager and not grad:
        idx = (~ok).nonzero().squeeze(1)
        if idx.numel() == 0:
            return c
        hs, ks, rs = (v.index_select(0, idx) for v in (h, k, r))
        cm, good = _cov_mehler_cascade(o, hs, ks, rs, eps_ratio, eps)
        bad = (~good).nonzero().squeeze(1)
        if bad.numel():
            hq, kq, rq = (v.index_select(0, bad) for v in (hs, ks, rs))
            cm.index_copy_(0, bad, _cov_std_few(o, hq, kq, rq, rule))
        return c.index_copy_(0, idx, cm)
    first = _MEHLER_TERMS if sync_free(h) else _MEHLER_SHORT
    slow = _on(~ok, lambda *a: series_or_quadrature(*a, first), h, k, r, safe=(0.0, 0.0, 0.5))
    return o.where(ok, c, z) + slow


@_flat
def relu_cov_std(
    o: SimpleNamespace, h, k, r, rule, bvn=None, eps_ratio=0.0, eps=2.0**-52, cdf=None
):
    """C(h, k, ρ) = Cov[(h + Z1)⁺, (k + Z2)⁺], corr(Z1, Z2) = ρ ∈ [−1, 1]; h, k not NaN.

    ``o``: ``numpy_ops()`` or ``torch_ops()``; ``rule``: (nodes, weights) of one Gauss–Legendre
    rule on [−1, 1] as arrays of the inputs' dtype. h, k, r: arrays of one broadcast shape;
    the result has that shape. With ``bvn`` (the backend's Φ2) the closed form is used where
    its rounding error is below ``eps_ratio``·|C| (``_cov_hybrid``), the quadrature elsewhere.
    ``cdf``: optional (Φ(h), Φ(k)), flattened like h, k, for the direct route (``_cov_direct``).
    """
    if bvn is None:
        return _cov_std(o, h, k, r, rule)
    return _cov_hybrid(o, h, k, r, rule, bvn, eps_ratio, eps, cdf)  # clamps where it routes on


#: Φ2 below this is recomputed as a sum of positive terms (``phi2_std``): the backends'
#: Φ2 (Owen's T / Gauss–Legendre) is accurate to ~1e-16 absolute, i.e. 1e-14 relative above it.
PHI2_REFINE_BELOW = 1e-2


def _phi2_terms(o, h, k, r, rule):
    """Φ2(h, k; ρ) as a sum of positive terms (∂Φ2/∂ρ = φ2 ≥ 0), 1-D inputs, |ρ| ≤ 1:
    ρ ≥ 0: Φ(h)Φ(k) + (1/2π)∫_0^{asin ρ} e^G dθ; ρ < 0: Φ2(h, k; −1) + (1/2π)∫_{−π/2}^{asin ρ}
    e^G dθ (the θ-integrals and joint-tail routes of the covariance, with weight 1)."""

    one = lambda s, c2: 1.0 + 0.0 * s  # noqa: E731

    def theta_up(h, k, r, _):
        return _integral(o, h, k, 0.0 * h, o.asin(r), +1, one, rule, cos_hi=_cos_asin(o, r))

    def theta_low(h, k, r, _):
        ar, z = o.abs(r), 0.0 * h
        return _integral(o, h, k, o.asin(ar), z + _HALF_PI, -1, one, rule, _cos_asin(o, ar), z)

    def upper(h, k, r):
        j = tail_or(o, h, k, r, 0.0 * h, "one", rule, theta_up)
        return _ncdf(o, h) * _ncdf(o, k) + j

    def lower(h, k, r):
        j = tail_or(o, h, k, r, 0.0 * h - 1.0, "one", rule, theta_low)
        return _interval_prob(o, h, k, rule) + j

    pos = r >= 0
    return _on(pos, upper, h, k, r, safe=(0.0, 0.0, 0.5)) + _on(
        ~pos, lower, h, k, r, safe=(0.0, 0.0, -0.5)
    )


@_flat
def phi2_std(o: SimpleNamespace, h, k, r, rule, bvn=None):
    """Φ2(h, k; ρ), relatively accurate: ``bvn`` (the backend's fast Φ2) where its value is at
    least ``PHI2_REFINE_BELOW``, the positive-term form ``_phi2_terms`` below it (finite h, k,
    |ρ| < 1; ρ = ±1 are exact interval probabilities in ``bvn``). Shapes as ``relu_cov_std``."""
    v = bvn(h, k, r)
    small = (v < PHI2_REFINE_BELOW) & (o.abs(h) < _CLIP) & (o.abs(k) < _CLIP) & (o.abs(r) < 1.0)
    hc, kc, rc = _clamped(o, o.stop(h), o.stop(k), o.stop(r))
    refined = _on(small, lambda *a: _phi2_terms(o, *a, rule), hc, kc, rc, safe=(0.0, 0.0, 0.5))
    # the refined value with ``bvn``'s gradient: v − stop(v) is exactly 0 in value
    return o.where(small, refined + (v - o.stop(v)), v)


#: Up to this many elements, eager CPU tensors take the quadrature through the NumPy backend
#: (``_cov_std_few``): its ~5,700 tensor operations cost per-call overhead, less in NumPy,
#: whose scalar exp is slower per element (measured on `nm bench floor`'s 190 float64
#: quadrature pairs: 9.8 ms vs 3.5 ms; the values agree to 3.2 eps; float32 relu_moments
#: 50.4 → 44.2 ms, its 210 quadrature pairs now the float64 values rounded).
_QUAD_NUMPY_MAX = 4096


def _cov_std_few(o, h, k, r, rule):
    """``_cov_std`` on 1-D eager CPU tensors outside autograd: through ``numpy_ops()`` (the
    same algorithm, in float64; float32 inputs get the float64 value rounded) where there are
    at most ``_QUAD_NUMPY_MAX`` elements, else through ``o``."""
    import torch

    if h.device.type != "cpu" or h.shape[0] > _QUAD_NUMPY_MAX:
        return _cov_std(o, h, k, r, rule)
    from nmgen.generated.gauss_legendre import RULES

    rule64 = tuple(np.asarray(v, dtype=np.float64) for v in RULES[int(rule[0].shape[0])])
    with np.errstate(all="ignore"):
        args = (v.detach().double().numpy() for v in (h, k, r))
        out = _cov_std(numpy_ops(), *args, rule64)
    return torch.from_numpy(np.asarray(out, dtype=np.float64)).to(h.dtype)


def _cov_std(o, h, k, r, rule):
    h, k, r = _clamped(o, h, k, r)
    both = (h > 0) & (k > 0)
    hh = o.where(both, -h, h)
    kk = o.where(both, -k, k)
    core = _cov_core(o, hh, kk, r, rule)
    # P(−h < Z < k) for h, k > 0: (erf(h/√2) + erf(k/√2))/2, no cancellation
    p_mid = 0.5 * (o.erf(h * _SQRT1_2) + o.erf(k * _SQRT1_2))
    return o.where(both, r * p_mid + core, core)


_CF_DEPTH = 128
_TAIL = -2.0


def _cf(o, x):
    """(F1, D2) of Laplace's continued fraction for the Mills ratio R(x) = Φ(−x)/φ(x), x ≥ 2:
    1/R = x + 1/(x + 2/(x + 3/…)); D2 = x + 3/(x + 4/…), F1 = 1/(x + 2/D2) = 1/R − x.
    128 levels: relative error < 1e-16 for x ≥ 2 (checked against mpmath in the tests).
    j/d is written (1/d)·j, as torch evaluates a number over a tensor: NumPy (``_fused``'s
    ``by_numpy``) then gives the same values bit for bit."""
    d = x
    for j in range(_CF_DEPTH, 2, -1):
        d = x + (1.0 / d) * j
    return 1.0 / (x + (1.0 / d) * 2.0), d


def _split_const(v) -> float:
    """Veltkamp's splitting constant 2^⌈p/2⌉ + 1 for ``v``'s floating-point precision p."""
    if isinstance(v, (np.ndarray, np.floating)):  # a tuple: torch.compile rejects X | Y
        eps = float(np.finfo(v.dtype).eps)
    else:
        import torch

        eps = torch.finfo(v.dtype).eps
    return 4097.0 if eps > 1e-10 else 134217729.0


def _two_prod(a, b, c: float):
    """(p, e) with p = fl(a·b) and p + e = a·b exactly (Dekker; c = ``_split_const``;
    |a|·c and |b|·c must be finite)."""
    p = a * b
    ta, tb = c * a, c * b
    ah, bh = ta - (ta - a), tb - (tb - b)
    al, bl = a - ah, b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def _tail_exponent_fix(o, x, mu, s):
    """(x² rounded, c) with e^{−h²/2} = e^{−fl(x²)/2}(1 + c) to a few eps for the exact
    h = μ/σ (x = −fl(μ/σ) ∈ [2, 64]): c = −(x² − fl(x²))/2 + x·δ, δ = μ/σ − fl(μ/σ) from the
    exact residual μ − fl(μ/σ)·σ. The Gaussian factor's condition number is h², so without
    it the rounding of μ/σ and of x² alone costs up to 1.6e-13 (float64) / 1e-4 (float32)
    relative at h = −38 / −13. Where σ is outside [1e-200, 1e200] (float32: [1e-20, 1e20])
    only the x² part is applied."""
    c = _split_const(x)
    wide = 1e200 if c > 5000.0 else 1e20
    xs = o.clip(x, 2.0, 64.0)
    p2, e2 = _two_prod(xs, xs, c)
    ok = (s > 1.0 / wide) & (s < wide)
    ss = o.where(ok, s, 1.0 + 0.0 * s)
    ms = o.where(ok, mu, -2.0 + 0.0 * mu)
    hq = -xs
    pp, ep = _two_prod(hq, ss, c)
    delta = o.where(ok, ((ms - pp) - ep) / ss, 0.0 * s)
    # guard: δ is a rounding residual (|δ| ≤ eps·x); elsewhere (x clipped) it is meaningless
    delta = o.where(o.abs(delta) <= 1e-3 * xs, delta, 0.0 * delta)
    return p2, -0.5 * e2 + xs * delta


def _tail_moments(o, x, mu, s):
    """(m(−x), s(−x))/φ(x)·… for x ≥ 2, all positive: m(−x) = E[(Z − x)⁺] = φ(x) R F1 and
    s(−x) = E[((Z − x)⁺)²] = φ(x)(R − x R F1) = φ(x) 2 R F1 / D2 (nothing cancels).
    x = −μ/σ; φ(x) is evaluated at the exact μ/σ (``_tail_exponent_fix``)."""
    # the compiled bulk: the 128 levels (~380 elementwise operations) in one pass; eager CPU:
    # by NumPy (``by_numpy``); additions, products and 1/x only, so the same values bit for bit
    f1, d2 = _fused(o, "continued_fraction", _cf, x, by_numpy=True)
    p2, fix = _tail_exponent_fix(o, x, mu, s)
    pdf = o.exp(-0.5 * p2) * (1.0 + fix) * _INV_SQRT_2PI
    mills = math.sqrt(0.5 * math.pi) * o.erfcx(x * _SQRT1_2)
    m = pdf * mills * f1
    return m, 2.0 * m / d2


def _tail_where(o, tail, h, mu, s):
    """``_tail_moments`` at x = −h where ``tail`` holds (h < −2); elsewhere values to be
    discarded. Torch tensors: ``mu``, ``s`` broadcast to h's shape, and on eager CPU only the
    tail's elements evaluated (``_on``), none where there are none: the continued fraction is
    378 elementwise operations whatever the size, about 0.9 ms of per-operation overhead per
    eager call at p = 64 as at p = 1024 (each element's values are the same either way).
    NumPy (arrays or scalars): every element, at x = 2 outside the tail."""
    if isinstance(h, (np.ndarray, np.generic)):
        return _tail_moments(o, o.where(tail, -h, 0.0 * h + 2.0), mu, s)
    zero = 0.0 * h
    return _on(
        tail,
        lambda *a: _tail_moments(o, *a),
        -h,
        mu + zero,
        s + zero,
        safe=(2.0, -2.0, 1.0),
        outputs=2,
    )


def relu_mean_ms(o: SimpleNamespace, mu, s):
    """E[relu(μ + σZ)] = σ m(μ/σ) for σ > 0: μΦ(h) + σφ(h) for h ≥ −2 (loses < 3 bits), the
    continued-fraction tail form below (relatively exact to underflow), finite for huge h."""
    h = mu / s
    tail = h < _TAIL
    hs = o.where(tail, 0.0 * h, h)
    ms = o.where(tail, 0.0 * mu, mu)
    v_mid = ms * _ncdf(o, hs) + s * o.exp(-0.5 * hs * hs) * _INV_SQRT_2PI
    return o.where(tail, s * _tail_where(o, tail, h, mu, s)[0], v_mid)


def relu_moments_ms(o: SimpleNamespace, mu, s):
    """(mean, second moment, variance) of relu(μ + σZ), σ > 0, each relatively accurate.

    h = μ/σ ≥ −2: mean μΦ(h) + σφ(h); second moment (μ² + σ²)Φ(h) + μσφ(h) (both terms ≥ 0
    for h ≥ 0, < 5 bits lost on [−2, 0]); variance σ²(Φ(h) − m(h)m(−h)) (Lemma 1's form: no
    cancellation for h ≫ 0). h < −2: the continued-fraction forms and variance s − m², where
    m² < 0.02 s.
    """
    h = mu / s
    tail = h < _TAIL
    m_t, s_t = _tail_where(o, tail, h, mu, s)
    hs = o.where(tail, 0.0 * h, h)
    ms = o.where(tail, 0.0 * mu, mu)
    cdf = _ncdf(o, hs)
    pdf = o.exp(-0.5 * hs * hs) * _INV_SQRT_2PI
    mean_mid = ms * cdf + s * pdf
    second_mid = (ms * ms + s * s) * cdf + ms * (s * pdf)
    # m(h)·m(−h) with m(−h) = m(h) − h (Φ(−h) = 1 − Φ(h)): σ m(−h) = σ m(h) − μ, both ≥ 0
    var_mid = s * s * cdf - mean_mid * o.maximum(mean_mid - ms, 0.0 * ms)
    mean_t = s * m_t
    second_t = (s * s) * s_t
    var_t = second_t - mean_t * mean_t
    return (
        o.where(tail, mean_t, mean_mid),
        o.where(tail, second_t, second_mid),
        o.maximum(o.where(tail, var_t, var_mid), 0.0 * s),
    )


def _cross_neg(o, h, k, hc, kc, r, rule):
    """E(h, k, ρ) for ρ < 0 from the ρ = −1 side (all terms ≥ 0); hc, kc: h, k clamped."""
    ar = o.abs(r)
    lval = _interval_prob(o, hc, kc, rule)

    def theta(hc, kc, r, _):
        # ∫_{−π/2}^{asin ρ} (ρ − sin θ) e^G = ∫ over |θ| ∈ [|asin ρ|, π/2] of (|sin θ| − |ρ|)
        # e^G; |sin θ| − |ρ| = (1 − |ρ|) − cos²θ/(1 + |sin θ|): exact near |ρ| = 1
        ar = o.abs(r)
        omr = (1.0 - ar)[..., None]
        gap = lambda s, c2: omr - c2 / (1.0 + o.abs(s))  # noqa: E731
        lo, hi, c_lo = o.asin(ar), 0.0 * hc + _HALF_PI, _cos_asin(o, ar)
        return _integral(o, hc, kc, lo, hi, -1, gap, rule, cos_lo=c_lo, cos_hi=0.0 * ar)

    j = tail_or(o, hc, kc, r, 0.0 * r - 1.0, "gap", rule, theta)
    return _cross_minus_one(o, h, k, rule, lval) + (1.0 - ar) * lval + j


def _cross_minus_one(o, h, k, rule, lval):
    """E(h, k, −1) = ∫_{−h}^{k} (h + z)(k − z) φ(z) dz for h + k > 0, else 0; ``lval`` is
    L = P(−h < Z < k) (``_interval_prob``).

    Where it does not cancel, the closed form (hk − 1) L + h φ(k) + k φ(h) (from ∫ z φ = −φ,
    ∫ z² φ = Φ − z φ): used where its terms' absolute sum (|hk| + 1) L + |h| φ(k) + |k| φ(h)
    is at most twice the value, so it is good to a few ulps. That covers the wide intervals
    with the peak of φ inside and one of h, k large, where the mapped rule below leaves
    ≈ 2e-14 (h = 37, k = 0.9). Elsewhere (h, k of unlike sign and a short interval: the value
    cancels) the quadrature: the interval is cut at distance d = 90/(√(c² + 90) + |c|) beyond
    its point c nearest 0 (where φ(z)/φ(c) = e^{−c·d − d²/2} = e^{−45}: a far-tail interval is
    not wasted on the rule) and sinh-mapped around c with width 1/(|c| + 1).
    """
    x, w = rule
    ok = h + k > 0
    a0 = o.where(ok, -h, 0.0 * h)
    b0 = o.where(ok, k, 0.0 * h + 1.0)
    c = o.stop(o.clip(0.0 * a0, a0, b0))
    cut = 90.0 / (o.sqrt(c * c + 90.0) + o.abs(c))
    a = o.maximum(a0, c - cut)
    b = o.minimum(b0, c + cut)
    hh = o.where(ok, h, 0.0 * h)
    kk = o.where(ok, k, 0.0 * h)
    wd = 1.0 / (o.abs(c) + 1.0)
    ua = o.asinh((a - c) / wd)
    ub = o.asinh((b - c) / wd)
    half = 0.5 * (ub - ua)
    u = (0.5 * (ua + ub))[..., None] + half[..., None] * x
    dz = wd[..., None] * o.sinh(u)
    z = c[..., None] + dz
    # (h + z)(k − z) from the centre c ∈ [−h, k]: (c + h) + dz and (k − c) − dz, so that a
    # narrow interval (h + k ~ 1e-16, value ∝ (h + k)³) does not round z against ∓h, k
    f = ((c + hh)[..., None] + dz) * ((kk - c)[..., None] - dz) * o.exp(-0.5 * z * z) * o.cosh(u)
    val = o.matvec(f, w) * (wd * half) * _INV_SQRT_2PI
    pdf_h = o.exp(-0.5 * hh * hh) * _INV_SQRT_2PI
    pdf_k = o.exp(-0.5 * kk * kk) * _INV_SQRT_2PI
    closed = (hh * kk - 1.0) * lval + hh * pdf_k + kk * pdf_h
    terms = (o.abs(hh * kk) + 1.0) * lval + o.abs(hh) * pdf_k + o.abs(kk) * pdf_h
    val = o.where(o.stop(terms <= 2.0 * closed), closed, val)
    return o.where(ok, o.maximum(val, 0.0 * val), 0.0 * h)


@_flat
def relu_cross_ms(o: SimpleNamespace, mu1, mu2, s1, s2, r, rule):
    """E[relu(x1) relu(x2)] (≥ 0, relatively accurate) for σ1, σ2 > 0, ρ ∈ [−1, 1].

    ρ ≥ 0, or both h, k ≥ 1: E[relu x1]·E[relu x2] + σ1σ2 C (for ρ < 0 with h, k ≥ 1 the
    difference loses at most a factor 2.5); otherwise σ1σ2 E(h, k, ρ) from the ρ = −1 side.
    Inputs: arrays of one broadcast shape; the result has that shape.
    """
    h, k = mu1 / s1, mu2 / s2
    hc, kc, rc = _clamped(o, h, k, r)
    up = (rc >= 0) | ((hc >= 1.0) & (kc >= 1.0))

    def upper(m1, m2, a, b, hh, kk, rr):
        prod = relu_mean_ms(o, m1, a) * relu_mean_ms(o, m2, b)
        return prod + (a * b) * _cov_std(o, hh, kk, rr, rule)

    def lower(hr, kr, a, b, hh, kk, rr):
        return (a * b) * _cross_neg(o, hr, kr, hh, kk, rr, rule)

    v = _on(up, upper, mu1, mu2, s1, s2, hc, kc, rc, safe=(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5))
    v = v + _on(~up, lower, h, k, s1, s2, hc, kc, rc, safe=(0.0, 0.0, 1.0, 1.0, 0.0, 0.0, -0.5))
    return o.maximum(v, 0.0 * v)


def numpy_binding(rule, bvn) -> tuple:
    """(moments, cov, cross, Φ2) callables for the generated NumPy module; moments returns
    (mean, second moment, variance).

    ``bvn`` is the backend's fast Φ2; the returned Φ2 is ``phi2_std`` (relatively accurate).

    Each takes broadcast float arrays (σ > 0 where it applies), computes in float64 and
    returns the inputs' dtype. ``rule``: (nodes, weights) of the Gauss–Legendre rule.
    """
    o = numpy_ops()
    eps_ratio = _FAST_RATIO[8]
    x = np.asarray(rule[0], dtype=np.float64)
    w = np.asarray(rule[1], dtype=np.float64)

    def call(fn):
        def run(*args):
            dt = np.result_type(*args)
            a64 = [np.asarray(v, dtype=np.float64).copy() for v in np.broadcast_arrays(*args)]
            with np.errstate(all="ignore"):
                if fn is relu_cov_std:
                    out = fn(o, *a64, (x, w), bvn=bvn, eps_ratio=eps_ratio)
                elif fn is phi2_std:
                    out = fn(o, *a64, (x, w), bvn=bvn)
                elif fn is relu_cross_ms:
                    out = fn(o, *a64, (x, w))
                else:
                    out = fn(o, *a64)
            if isinstance(out, tuple):
                return tuple(np.asarray(v, dtype=dt) for v in out)
            return np.asarray(out, dtype=dt)

        return run

    return (
        call(relu_moments_ms),
        call(relu_cov_std),
        call(relu_cross_ms),
        call(phi2_std),
    )


def torch_binding(rule, bvn) -> tuple:
    """(moments, cov, cross, Φ2) callables for the generated PyTorch module; moments returns
    (mean, second moment, variance) (``relu_moments_ms``).

    ``bvn`` is the backend's fast Φ2 (with its autograd); the returned Φ2 is ``phi2_std``:
    relatively accurate values, ``bvn``'s gradients.

    Computed in the inputs' dtype on their device. The quadrature runs on a detached ρ; the
    ρ-gradient is attached exactly as ∂C/∂ρ = Φ2(h, k; ρ) (Lemma 2; ``bvn`` is the generated
    Φ2) and ∂E/∂ρ = σ1σ2 Φ2, so it lies in [0, 1] (resp. [0, σ1σ2]) even at |ρ| = 1.
    """
    import torch

    o = torch_ops()
    cache: dict = {}

    def rule_for(t):
        key = (t.dtype, t.device)
        if key not in cache:
            cache[key] = tuple(torch.as_tensor(v, dtype=t.dtype, device=t.device) for v in rule)
        return cache[key]

    def moments(mu, sigma):
        return relu_moments_ms(o, mu, sigma)

    def cov(h, k, rho, *, cdf=None):
        """C(h, k, ρ); ``cdf``: optional (Φ(h), Φ(k)) of h's shape, dtype and device (e.g.
        computed once per variable and gathered per pair; the same values as computed here,
        so the result is bit for bit the same, without two erfc passes per pair), or a
        ``DirectFront`` (the compiled bulk's pair front: the direct route's key and ρΦΦ)."""
        r0 = rho.detach()
        ratio = _FAST_RATIO[h.element_size()]
        eps = torch.finfo(h.dtype).eps
        flat = None if cdf is None else tuple(v.reshape(-1) for v in cdf)
        if isinstance(cdf, DirectFront):
            flat = DirectFront(*flat)
        rule = rule_for(h)
        out = relu_cov_std(o, h, k, r0, rule, bvn=bvn, eps_ratio=ratio, eps=eps, cdf=flat)
        if rho.requires_grad:
            out = out + (rho - r0) * bvn(h.detach(), k.detach(), r0)
        return out

    def cross(mu1, mu2, s1, s2, rho):
        r0 = rho.detach()
        out = relu_cross_ms(o, mu1, mu2, s1, s2, r0, rule_for(mu1))
        if rho.requires_grad:
            g = bvn((mu1 / s1).detach(), (mu2 / s2).detach(), r0)
            out = out + (rho - r0) * ((s1 * s2).detach() * g)
        return out

    def phi2(h, k, rho):
        return phi2_std(o, h, k, rho, rule_for(h), bvn=bvn)

    return moments, cov, cross, phi2
