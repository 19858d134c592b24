"""The direct route of the standardized ReLU pair covariance C(h, k, ρ) (see
``nmruntime.relu_pair``) and the ρ < 0 tail route: the bulk of the pairs.

C = ρΦ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt by one fixed Gauss–Legendre rule per |ρ| group
(|h|, |k| ≤ 7, |ρ| < 0.925; float32's rejects and 0.925 ≤ |ρ| < 0.99 in float64
arithmetic, that group on eager CPU by the rule in s of t = 2s/(1 + s²),
``_direct_s_integral``), accepted where its rounding bound allows
(``_cov_direct``; on eager CPU neighbouring groups with few pairs share the larger rule,
``_direct_bands``); the compiled passes of ``relu_moments(..., compiled=True)`` over the
pairs in their own order (``direct_passes``); and ``cov_neg_tail``: C = −(|ρ|Φ2(h, k; ρ) +
∫_ρ^0 |t| φ2 dt) for h + k ≤ 0, Φ2 by Gauss–Laguerre, the pairs whose ρΦ(h)Φ(k) + J
cancels."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from nmruntime.pair_ops import (
    _INV_2PI,
    _TINY_NORMAL,
    _TORCH_OPS,
    _ncdf,
    _torch_ops_cached,
    renamed,
    sync_free,
)

#: The direct route (``_cov_direct``): groups (upper bound of |ρ|, rule size in float64, in
#: float32), for |h|, |k| ≤ ``_DIRECT_HK``. Each size is the smallest whose quadrature error
#: stays below the rounding of the sum, found on a 97 × 97 grid of (h, k) over [−6, 6]² at 12
#: values of ρ per group (both signs, the group's upper end included; the elements the rounding
#: test accepts) against a 96-point rule of the same integral: float64 ≤ 50 eps relative to C
#: (the rounding floor there is 14–68 eps; one size less reached 119 to 6,117 eps, mostly at
#: h = k = −6), float32 ≤ 0.01 float32 eps. Held-out checks against mpmath:
#: tests/test_pair_direct.py.
_DIRECT_GROUPS = (
    (0.15, 8, 6),
    (0.3, 10, 8),
    (0.4, 12, 8),
    (0.5, 14, 8),
    (0.6, 14, 10),
    (0.7, 16, 12),
    (0.75, 18, 12),
    (0.8, 20, 14),
    (0.85, 24, 14),
    (0.9, 28, 18),
    (0.925, 32, 20),
)
#: The sizes hold to |h|, |k| ≤ 7 (checked in session 21 on the ring 6 < max(|h|, |k|) ≤ 7, a
#: 113 × 113 grid of step 0.125, 12 ρ per group and sign, against a 512-point rule: float64
#: ≤ 38 eps, float32 ≤ 0.0074 float32 eps, the float64 sizes on float32's re-evaluation
#: ≤ 6.7e-4 float32 eps, ``_DIRECT_WIDE32``'s rule ≤ 0.0024). At 6 a single variable with
#: μ/σ = −6.06 sent all its 1,023 pairs of `nm bench floor`'s problem to the other routes.
_DIRECT_HK = 7.0
#: Accepted where the rounding bound |ρΦ(h)Φ(k)| + (|G|max + 2)·J is at most ``_DIRECT_CANCEL``·|C|
#: (float64, float32): a relative error of a few times that many eps.
_DIRECT_CANCEL = {True: 32.0, False: 8.0}
#: float32 (PyTorch: autograd and masked paths; eager CPU and the compiled bulk take the rule
#: in s of ``DIRECT_S_WIDE`` points instead): (upper bound of |ρ|, rule size) of one
#: more group beyond the last, 0.925 ≤ |ρ| < 0.99 (|h|, |k| ≤ ``_DIRECT_HK``), evaluated in
#: float64 arithmetic and accepted by the ``wide`` rounding test, as the float32 rejects are
#: (the masked and autograd paths evaluate those with this rule too). Size: on
#: a 97 × 97 grid of (h, k) over [−6, 6]² at 12 values of ρ per sign from 0.925 to the upper
#: end, against a 512-point rule, on the elements that test accepts (98.4–100%): 40 points
#: reached 0.041 float32 eps relative to C, 48 points 0.0015 (the float32 column's bar is
#: 0.01). Without it, every such pair went to the closed form, Mehler's series or the
#: quadrature: ~12 ms of per-call overhead at p = 1024 for 1,938 pairs (`nm bench floor`).
_DIRECT_WIDE32 = (0.99, 48)
#: float64 (eager CPU and the compiled bulk, outside autograd): the same group, accepted by
#: float64's rounding test (``_DIRECT_CANCEL``); since session 33 evaluated by the rule in s
#: (``DIRECT_S_WIDE``), the 80 points in t kept for the ρ < 0 tail route's rule. Size: on a
#: 113 × 113 grid over [−7, 7]² at 16 ρ per sign from 0.925 to 0.99, against a 512-point rule,
#: on the accepted elements: 64 points 838 eps, 72 points 49, 80 points 38.6 (the groups'
#: rounding floor, 14–68 eps). Session 22:
#: the bench problem's 1,776 pairs there went to the closed form (whose |ρ| ≥ 0.925 part is an
#: eager Φ2: ~2 ms per call).
_DIRECT_WIDE64 = (0.99, 80)
#: (groups, rule size) of the compiled bulk's one pass (``torchbridge.moments._one_pass_bulk``;
#: float64, float32): the pairs of the first ``groups`` |ρ| groups of ``_DIRECT_GROUPS``
#: (float64 |ρ| < 0.7, float32 |ρ| < 0.925: 87% and 99.7% of `nm bench floor`'s pairs) are
#: evaluated in pair order by one rule of that size (float64: at least their own group's; no
#: sort into groups, no gathers, no scatter back); the others take the passes after it
#: (``direct_passes``). Session 24, that
#: problem (p = 1024, 1 thread, medians of 11 interleaved repeats of the whole call, against
#: the general path): float64 (2, 10) 1.21, (3, 12) 1.18, (5, 14) 1.00, (6, 16) 0.89, (7, 18)
#: 0.89, (8, 20) 0.91, (9, 24) 0.92 of the time; float32 (5, 10) 0.95, (7, 12) 0.80, (9, 14)
#: 0.75, (10, 18) 0.76. Sizes: on the 57 × 57 grid of [−7, 7]² at 12 ρ per group, against a
#: 512-point rule, on the accepted elements: float64 16 points ≤ 48.2 eps relative to C (its
#: groups' own sizes 26–46), float32 14 points ≤ 0.0029 float32 eps
#: (tests/test_pair_direct.py). Session 37, float32: (9, 14) left the 2.9% of pairs with
#: 0.85 ≤ |ρ| < 0.925 to the wide pass, in float64 arithmetic with 32 nodes: 18% of the call's
#: samples under `perf`. All 11 groups in the one pass, p = 1024, the whole call, medians of
#: 25 interleaved repeats against (9, 14), two runs: (11, 14) 0.89 / 0.90–0.93 of the time (1 /
#: 2 threads), (10, 13) 0.89 / 0.91, (11, 15) 0.90 / 0.92, (10, 14) 0.92 / 0.92; the rule in s (one exp
#: and one reciprocal per node, no sqrt, more products) (11, 14) 1.01 / 1.00. The float32
#: rule's quadrature error is bounded at a quarter float32 eps of C there (15 points: ≤ 0.19
#: at 0.9 ≤ |ρ| < 0.925, ≤ 0.012 below; 14 points reached 0.48): a quarter of one rounding,
#: where the rounding test accepts up to 8 eps and accepted values are held to 32 eps against
#: mpmath (the groups' own sizes keep 0.01 eps).
DIRECT_ONE_PASS = {True: (6, 14), False: (11, 15)}
#: The |h|, |k| bound of the one pass's pairs (float64, float32); float64's pairs beyond it
#: go to the second pass. Session 42: float64's 16 points were set by the corners of
#: [−7, 7]²; with |h|, |k| ≤ 4, 14 points are at the rounding floor on every |ρ| < 0.7. On a
#: grid of step 0.125 at 20 ρ per sign against a 512-point rule, on the elements the
#: rounding test accepts, the largest error relative to C: |h|, |k| ≤ 4: 13 points 371 eps,
#: 14 points 49.9, 16 points 56.0 (the floor); ≤ 4.5: 14 points 79.1; ≤ 5: 158; ≤ 7: 3,620
#: (step 0.25; scratch ``/tmp/s42/rulemapR.py``). On `nm bench floor`'s p = 1024 problem
#: 8,505 of the 523,776 pairs (1.6%) have |ρ| < 0.7 and a variable beyond 4. float32's
#: bound stays at 7: its 15 points are set by |ρ| near 0.925, not by |h|, |k| (14 points with
#: |h|, |k| ≤ 4: 0.11 float32 eps; ≤ 7: 0.48).
DIRECT_ONE_PASS_HK = {True: 4.0, False: _DIRECT_HK}
#: (groups, rule size in t) of float64's second pass (``direct_passes``; since session 33 it
#: takes ``DIRECT_S_GROUPS`` points in s instead): the groups after the one pass's
#: (0.7 ≤ |ρ| < 0.925) by their largest rule, on the pairs the one pass left (13% of
#: `nm bench floor`'s). One pass of 32 points instead of the general path's front, sort,
#: gathers, group kernels and scatter: with the wide pass and the tail route after it, 0.91 of
#: the call's time on that problem and the cold first call 36 vs 64 s (session 25, separate
#: processes against the code before; in one process, two passes of 20 or 24 and 32 points, or
#: a first pass of 18 or 20 points, were within 3% of it). On the 57 × 57 grid of [−7, 7]² at
#: 12 ρ per group against a 512-point rule: ≤ 43.2 eps of C on those groups
#: (tests/test_pair_direct.py).
DIRECT_GROUPS_PASS = (len(_DIRECT_GROUPS), max(g[1] for g in _DIRECT_GROUPS))
#: Rule sizes of the compiled passes after the first in the variable s of t = 2s/(1 + s²)
#: (``_direct_s_integral``): float64's second pass on 0.7 ≤ |ρ| < 0.925 (in t: 32 points,
#: ``DIRECT_GROUPS_PASS``) and the wide pass, float64's 0.925 ≤ |ρ| < 0.99 (in t: 80) and
#: float32's re-evaluation of every |ρ| < 0.99 in float64 arithmetic (in t: 48). In s the
#: singularity t = 1 moves from y = 1/ρ to 1/S = (1 + √(1 − ρ²))/ρ (y: the rule's variable on
#: [0, 1]): at ρ = 0.99, from 1.01 to 1.15. Sizes: on the 57 × 57 grid of [−7, 7]² at 12 ρ per
#: band and sign against an s-form 256-point rule in long double (scratch ``/tmp/s33/srule.py``,
#: session 33), the largest error of the float64 result relative to C, on the elements the
#: rounding test keeps: 0.7–0.85 20 points 15.0 eps (16: 5.3e4), 0.85–0.925 24 points 10.9
#: (20: 878), 0.925–0.99 32 points 9.4 (24: 2.1e4), every |ρ| < 0.99 at 32 points ≤ 20.9;
#: the t-rules in the same run 8.7–10.0 eps. Session 42, float64's second pass (which since
#: then also takes the one pass's groups beyond its |h|, |k| bound, ``DIRECT_ONE_PASS_HK``):
#: on a grid of step 0.125 over [−7, 7]² against the 512-point t-rule, 0.7–0.925 at 16 ρ per
#: sign: 20 points 903 eps, 22 points 31.8, 24 points 37.7; |ρ| < 0.7 at 20 ρ per sign: 22
#: points 37.0, 24 points 37.9 (scratch ``/tmp/s42/smap.py``, ``s24low.py``). Checked against
#: the 512-point t-rule by tests/test_pair_direct.py.
DIRECT_S_GROUPS = 22
DIRECT_S_WIDE = 32
_DIRECT_RULES: dict = {}


def _direct_rule(n: int, like):
    """(y, w(1 − y)) of the n-point Gauss–Legendre rule mapped to [0, 1] (y = (1 + x)/2), as
    arrays of ``like``'s kind, dtype and device (cached)."""
    if isinstance(like, np.ndarray):
        key = (n, "numpy")
    else:
        key = (n, like.dtype, like.device)
    if key not in _DIRECT_RULES:
        from nmgen.generated.gauss_legendre import RULES

        x, w = (np.asarray(v, dtype=np.float64) for v in RULES[n])
        y = 0.5 * (1.0 + x)
        vals = (y, w * (1.0 - y))
        if not isinstance(like, np.ndarray):
            import torch

            vals = tuple(torch.as_tensor(v, dtype=like.dtype, device=like.device) for v in vals)
        _DIRECT_RULES[key] = vals
    return _DIRECT_RULES[key]


def _direct_integral(h, k, r, rule):
    """J = ∫_0^ρ (ρ − t) φ2(h, k; t) dt ≥ 0 by the rule (y, w(1 − y)) on t = ρy (1-D inputs,
    |ρ| < 1): J = ρ²/(4π) Σ w_i (1 − y_i) e^{G(t_i)}/√(1 − t_i²) with
    G(t) = −[A(1 + t) + B(1 − t)]/(1 − t²), A = (h − k)²/4, B = (h + k)²/4 (= (hkt − (h² + k²)/2)/
    (1 − t²), as a sum of terms ≥ 0: nothing cancels). Every term is ≥ 0 for either sign of ρ.
    Torch tensors outside autograd run in place."""
    y, wy = rule
    a = -0.25 * (h - k) ** 2
    b = -0.25 * (h + k) ** 2
    if isinstance(h, np.ndarray) or (h.requires_grad or k.requires_grad):
        t = r[..., None] * y
        u, v = 1.0 + t, 1.0 - t
        q = 1.0 / (u * v)
        g = (a[..., None] * u + b[..., None] * v) * q
        if isinstance(h, np.ndarray):
            f = np.exp(g) * np.sqrt(q)
        else:
            f = g.exp() * q.sqrt()
        return (r * r) * (f @ wy) * (0.25 / math.pi)
    import torch

    t = torch.outer(r, y)
    u = t.add(1.0)
    v = torch.rsub(t, 1.0)
    g = torch.mul(u, a.unsqueeze(1)).addcmul_(v, b.unsqueeze(1))
    q = u.mul_(v).reciprocal_()
    f = g.mul_(q).exp_().mul_(q.sqrt_())
    return (r * r).mul_(f @ wy).mul_(0.25 / math.pi)


def _direct_s_integral(h, k, r, rule):
    """J of ``_direct_integral`` by the rule (y, w(1 − y)) in s, t = 2s/(1 + s²), s = Sy,
    S = ρ/(1 + √(1 − ρ²)) (so that t = ρ at y = 1): dt/√(1 − t²) = 2ds/(1 + s²) and
    ρ − t = 2S(1 − y)(1 − S²y)/((1 + S²)(1 + s²)), so

        J = ρS/(2π) Σ w_i (1 − y_i)(1 − S²y_i) e^{G}/(1 + s_i²)²,
        G = −(1 + s²)[A/(1 − s)² + B/(1 + s)²] = −[A(1 + s)² + B(1 − s)²](1 + s²)³·q,
        q = 1/((1 + s²)(1 + s)(1 − s))²,  1/(1 + s²)² = ((1 + s)(1 − s))²·q,

    A = (h − k)²/4, B = (h + k)²/4: every term ≥ 0 for either sign of ρ (ρS ≥ 0, S² < 1), one
    reciprocal and one exp per node, no square root (one per pair, in S). The [pairs, nodes]
    form (NumPy or torch; 1-D inputs, |ρ| < 1); ``_direct_s_unrolled`` is the compiled
    passes' form of the same sum."""
    y, wy = rule
    if isinstance(h, np.ndarray):
        sqrt, exp = np.sqrt, np.exp
    else:
        import torch

        sqrt, exp = torch.sqrt, torch.exp
    S = r / (1.0 + sqrt((1.0 - r) * (1.0 + r)))
    a = (0.25 * (h - k) ** 2)[..., None]
    b = (0.25 * (h + k) ** 2)[..., None]
    s = S[..., None] * y
    u, v, p2 = 1.0 + s, 1.0 - s, 1.0 + s * s
    uv = u * v
    q = 1.0 / ((p2 * uv) ** 2)
    g = (a * (u * u) + b * (v * v)) * (p2 * p2 * p2) * q
    f = (1.0 - (S * S)[..., None] * y) * exp(-g) * ((uv * uv) * q)
    return (r * S) * (f @ wy) * (0.5 / math.pi)


def _cov_direct(o, h, k, r, eps, cdf=None):
    """(C, accepted) by the direct route for |h|, |k| ≤ 7, |ρ| < 0.925:

        C = ρΦ(h)Φ(k) + J,   J = ∫_0^ρ (ρ − t) φ2(h, k; t) dt ≥ 0

    (C = ∫_0^ρ Φ2(h, k; r) dr, ∂Φ2/∂r = φ2, order of integration swapped), J by a fixed
    Gauss–Legendre rule per |ρ| group (``_DIRECT_GROUPS``; ``sync_free``: the largest rule on
    every element, masked). ρ ≥ 0: two terms ≥ 0, nothing cancels; accepted where the rounding
    bound allows (``_direct_accept``); float32 elements it rejects are evaluated again in
    float64 arithmetic (then only a 2¹⁶-fold cancellation rejects them). One exp, one sqrt
    and one reciprocal per node (q = 1/(1 − t²) gives G = num·q and 1/√(1 − t²) = √q: a
    division fewer than num/(1 − t²) and rsqrt); no Φ2, no conditional Φ terms. 1-D inputs.
    ``cdf``: optional (Φ(h), Φ(k)) of the same shape, computed by the caller (e.g. once per
    variable and gathered per pair); used by the eager CPU route outside autograd, ignored
    elsewhere.
    """
    f64 = eps < 1e-10
    fused = _direct_fused(h, k, r, eps, cdf)
    if fused is not None:
        return fused
    ar = o.abs(r)
    dom = (o.abs(h) <= _DIRECT_HK) & (o.abs(k) <= _DIRECT_HK) & (ar < _DIRECT_GROUPS[-1][0])
    if sync_free(h):
        n = max(g[1 if f64 else 2] for g in _DIRECT_GROUPS)
        hm, km, rm = o.where(dom, h, 0.0 * h), o.where(dom, k, 0.0 * k), o.where(dom, r, 0.0 * r)
        j = o.where(dom, _direct_integral(hm, km, rm, _direct_rule(n, h)), 0.0 * h)
        c, ok = _direct_accept(o, hm, km, rm, j, eps)
        ok = dom & ok
        if not f64:  # as on eager CPU: the float32 rejects and ``_DIRECT_WIDE32``'s range
            # again in float64 arithmetic, masked: one pass of its rule on every element
            # (it also serves |ρ| < 0.925: ≤ 5e-5 float32 eps there, tests/test_pair_direct.py)
            wide = _direct_wide_domain(o, h, k, ar)
            w = [o.where(wide, v, 0.0 * v).double() for v in (h, k, r)]
            j2 = _direct_integral(*w, _direct_rule(_DIRECT_WIDE32[1], w[0]))
            c2, ok2 = _direct_accept(o, *w, j2, eps, True)
            c = o.where(ok, c, c2.to(c.dtype))
            ok = ok | (wide & ok2)
        return c, ok
    if isinstance(h, np.ndarray) or h.requires_grad or k.requires_grad:
        j = 0.0 * h
        lo = 0.0
        for hi, n64, n32 in _DIRECT_GROUPS:
            sel = dom & (ar >= lo) & (ar < hi)
            lo = hi
            if bool(sel.any()):
                rule = _direct_rule(n64 if f64 else n32, h)
                j[sel] = _direct_integral(h[sel], k[sel], r[sel], rule)
    else:
        c, ok = _direct_sliced(h, k, r, ar, dom, eps, cdf=cdf)
        if not f64:  # float32: the rejected ones again in float64 arithmetic (``wide``)
            redo = (dom & ~ok).nonzero().squeeze(1)
            if redo.numel():
                w = [v.index_select(0, redo).double() for v in (h, k, r, ar)]
                c2, ok2 = _direct_sliced(*w, dom.index_select(0, redo), eps, True)
                c.index_copy_(0, redo, c2.to(c.dtype))
                ok.index_copy_(0, redo, ok2)
        _direct_high(h, k, r, c, ok, (~dom).nonzero().squeeze(1))
        return c, ok
    c, ok = _direct_accept(o, h, k, r, j, eps)
    ok = dom & ok
    if not f64 and not isinstance(h, np.ndarray):  # as above (autograd)
        redo = _direct_wide_domain(o, h, k, ar) & ~ok
        if bool(redo.any()):
            w = [v[redo].double() for v in (h, k, r)]
            j2 = _direct_integral(*w, _direct_rule(_DIRECT_WIDE32[1], w[0]))
            c2, ok2 = _direct_accept(o, *w, j2, eps, True)
            c = c.index_put((redo,), c2.to(c.dtype))  # out of place: autograd records it
            ok = ok.index_put((redo,), ok2)
    return c, ok


def _direct_wide_domain(o, h, k, ar, top: float | None = None):
    """Where float32's float64 re-evaluation applies: |h|, |k| ≤ ``_DIRECT_HK`` and |ρ| below
    ``top`` (default ``_DIRECT_WIDE32``'s bound: the groups' range and the float32 group
    beyond it)."""
    hk = (o.abs(h) <= _DIRECT_HK) & (o.abs(k) <= _DIRECT_HK)
    return hk & (ar < (_DIRECT_WIDE32[0] if top is None else top))


def _direct_accept(o, h, k, r, j, eps, wide: bool = False, base=None):
    """(C = ρΦ(h)Φ(k) + J, accepted): the rounding bound eps·(|ρΦ(h)Φ(k)| + (|G|max + 2)·J)
    at most ``_DIRECT_CANCEL``·eps·|C| (e^G is conditioned by |G|, and on the nodes
    |G| ≤ max(A + B, A/(1 − ρ) + B/(1 + ρ)): G(t) is convex in t), and |C| a normal number of
    the target precision ``eps`` (or ρ = 0, where C = 0 exactly). ``wide``: a float32 target
    evaluated in float64, whose rounding (2⁻⁵² per term) may then lose up to 2¹⁶ to
    cancellation and stay below 1e-4 float32 eps; the rule must then be float64's size too:
    the float32 sizes' quadrature error is below 0.01 float32 eps of C only where at most 8
    is lost (on a 49 × 49 grid over [−6, 6]² at 12 ρ per group and sign against a 512-point
    rule: ≤ 0.0012 float32 eps there, but up to 31 float32 eps with 2¹⁶; float64's sizes
    ≤ 2.5e-5 float32 eps with 2¹⁶). ``base``: ρΦ(h)Φ(k) where the caller has it
    (the same values: two erfc passes saved)."""
    f64 = eps < 1e-10
    cancel = 2.0**16 if wide else _DIRECT_CANCEL[f64]
    if base is None:
        base = r * _ncdf(o, h) * _ncdf(o, k)
    c = base + j
    a4, b4 = (h - k) ** 2, (h + k) ** 2
    gmax = 0.25 * o.maximum(a4 + b4, a4 / (1.0 - r) + b4 / (1.0 + r))
    ac = o.abs(c)
    keep = o.abs(base) + j * (gmax + 2.0) <= cancel * ac
    return c, keep & ((ac >= _TINY_NORMAL[f64] / eps) | (r == 0))


#: Pairs per direct-route evaluation on eager CPU (its [pairs, nodes] temporaries stay in the
#: 1 MiB L2; measured on the bench problem: 2048 / 4096 / 8192 / 16384 pairs took 0.101 /
#: 0.079 / 0.072 / 0.071 s for the whole route).
_DIRECT_SLICE = 8192


#: The eager route's fixed cost of evaluating one |ρ| group, in units of one pair's node:
#: ~130 µs per group against ~16 ns per pair and node (1 thread; J and the acceptance test
#: on 64 to 8,192 pairs and 8, 16 and 32 nodes, scratch ``/tmp/s31/c0c1.py``). Where a group
#: has fewer pairs than that makes worth a call of its own, ``_direct_bands`` merges it with
#: its neighbours under the larger rule.
_DIRECT_GROUP_COST = 8192


def _direct_bands(counts: list[int], sizes: list[int]) -> list[int]:
    """The end indices of the bands of consecutive |ρ| groups the eager route evaluates
    together, each by the rule of its last group (``sizes`` do not decrease: the largest, and
    a group's own rule or a larger one meets its bar, tests/test_pair_direct.py), chosen to
    minimise Σ_bands (``_DIRECT_GROUP_COST`` + its pairs × its rule size) for the groups'
    pair ``counts``. Large problems keep every group apart (p = 1024: all 11); a small one
    (p = 64: 2,016 pairs) takes one or two bands instead of eleven calls."""
    best, cut = [0.0], [0]
    for b in range(1, len(counts) + 1):
        costs = []
        for a in range(b):
            pairs = sum(counts[a:b])
            costs.append((best[a] + (_DIRECT_GROUP_COST + pairs * sizes[b - 1] if pairs else 0), a))
        cost, a = min(costs)
        best.append(cost)
        cut.append(a)
    ends, b = [], len(counts)
    while b:
        ends.append(b)
        b = cut[b]
    return ends[::-1]


def _direct_sliced(h, k, r, ar, dom, eps, wide: bool = False, cdf=None):
    """``_cov_direct`` on eager CPU tensors outside autograd: the pairs sorted by |ρ| band (one
    gather each of h, k, ρ; bands of groups by ``_direct_bands``, on a small problem one or
    two; none where one band holds every pair), each band evaluated with its rule, J and the
    acceptance test in slices of ``_DIRECT_SLICE`` pairs (in cache), scattered back; (0,
    False) outside ``dom``. With ``compiled_bulk`` on, each band in one call of
    ``_direct_unrolled`` compiled for its rule size instead. ``eps`` is the target precision
    (its column of rule sizes); ``wide``: see ``_direct_accept``; ``cdf``: (Φ(h), Φ(k)) or
    None (see ``_cov_direct``)."""
    import torch

    o = _torch_ops_cached()
    f64 = eps < 1e-10

    def slice_value(hs, ks, rs, y, wy, base=None):
        j = _direct_integral(hs, ks, rs, (y, wy))
        return _direct_accept(o, hs, ks, rs, j, eps, wide, base)

    grp = _direct_group_index(ar)
    grp.masked_fill_(~dom, len(_DIRECT_GROUPS))
    counts = torch.bincount(grp, minlength=len(_DIRECT_GROUPS) + 1).tolist()
    # wide: float64's sizes (see ``_direct_accept``)
    sizes = [g[1] if f64 or wide else g[2] for g in _DIRECT_GROUPS]
    ends = _direct_bands(counts[:-1], sizes)
    bands = [(sum(counts[a:b]), sizes[b - 1]) for a, b in itertools.pairwise([0, *ends])]
    if len(ends) < len(_DIRECT_GROUPS):  # groups merged: sort by band (outside: after them)
        band_of = [bisect.bisect_right(ends, g) for g in range(len(_DIRECT_GROUPS) + 1)]
        lut = torch.tensor(band_of, dtype=grp.dtype, device=grp.device)
        grp = lut.index_select(0, grp.to(torch.int64))
    # ρΦ(h)Φ(k) from the caller's Φ values, formed before the permutation: one gather, not two
    if cdf is not None:
        base = cdf.base if isinstance(cdf, DirectFront) else r * cdf[0] * cdf[1]
    whole = counts[-1] == 0 and sum(1 for cnt, _ in bands if cnt) == 1
    if whole:  # one band holds every pair: no sort, no gathers, no scatter
        perm = None
        hp, kp, rp = h, k, r
        basep = () if cdf is None else (base,)
    else:
        _, perm = torch.sort(grp, stable=True)
        hp, kp, rp = (v.index_select(0, perm) for v in (h, k, r))
        basep = () if cdf is None else (base.index_select(0, perm),)
    cp = torch.zeros_like(h)
    okp = torch.zeros_like(h, dtype=torch.bool)
    start = 0
    for cnt, n in bands:
        fused = _direct_compiled(h, n, eps, wide, bool(basep)) if cnt else None
        if fused is not None:  # one fused pass over the whole band
            e = start + cnt
            cs, oks = fused(hp[start:e], kp[start:e], rp[start:e], *(v[start:e] for v in basep))
            cp[start:e] = cs
            okp[start:e] = oks
            start = e
            continue
        rule = _direct_rule(n, h) if cnt else None
        for a in range(start, start + cnt, _DIRECT_SLICE):
            e = min(a + _DIRECT_SLICE, start + cnt)
            hs, ks, rs = hp[a:e], kp[a:e], rp[a:e]
            cs, oks = slice_value(hs, ks, rs, *rule, *(v[a:e] for v in basep))
            cp[a:e] = cs
            okp[a:e] = oks
        start += cnt
    if whole:
        return cp, okp
    c = torch.empty_like(cp).scatter_(0, perm, cp)
    ok = torch.empty_like(okp).scatter_(0, perm, okp)
    return c, ok


class DirectFront(NamedTuple):
    """The direct route's per-pair fields computed by a caller in its own compiled pass
    (``direct_front`` inside ``torchbridge.moments``' pair front): the group key and
    ρΦ(h)Φ(k).
    Passed as ``cdf`` to the torch binding's covariance (compiled bulk only)."""

    key: object
    base: object


def direct_front(h, k, r, p0=None, p1=None):
    """(uint8 group key, ρΦ(h)Φ(k) or None) in one pass (``_direct_fused``'s, or fused by a
    caller into its own compiled pass: ``torchbridge.moments``' pair front): the number of
    group bounds at or below |ρ| (the group of ``_DIRECT_GROUPS`` holding |ρ|),
    ``len(_DIRECT_GROUPS)`` outside the direct route's domain. Counted in int64 and stored as
    uint8: in the compiled pass uint8 arithmetic ran 20 ms at p = 1024, a table lookup 4.7 ms
    (the whole pair front), ``torch.bucketize`` 8.5 ms, the int64 count 2.3 ms; sorting uint8
    keys took 1.0 ms vs 4.1 ms for int64. (Eagerly the count is 11 passes: the eager route
    keeps ``_direct_group_index``'s table, 5.1 ms vs 10.8 ms for ``torch.bucketize``.)"""
    import torch

    ar = r.abs()
    dom = (h.abs() <= _DIRECT_HK) & (k.abs() <= _DIRECT_HK) & (ar < _DIRECT_GROUPS[-1][0])
    key = (ar >= _DIRECT_GROUPS[0][0]).to(torch.int64)
    for bound, _, _ in _DIRECT_GROUPS[1:-1]:
        key = key + (ar >= bound).to(torch.int64)
    key = torch.where(dom, key, len(_DIRECT_GROUPS)).to(torch.uint8)
    return key, (None if p0 is None else r * p0 * p1)


def direct_groups_below(h, k, r, top: int, hk: float = _DIRECT_HK):
    """Whether (h, k, ρ) is in one of the first ``top`` |ρ| groups of the direct route
    (1 ≤ top ≤ ``len(_DIRECT_GROUPS)``): ``direct_front``'s key below ``top`` (NaN: False),
    in one comparison of |ρ| instead of counting bounds (the same values; the compiled one
    pass of ``torchbridge.moments`` at p = 1024 took 19.04 vs 19.51 ms in float64, 8.25 vs
    8.99 ms in float32, medians of 25 interleaved runs). ``hk``: a bound on |h|, |k| at or
    below the route's (``DIRECT_ONE_PASS_HK``)."""
    bound = _DIRECT_GROUPS[top - 1][0]
    return (h.abs() <= hk) & (k.abs() <= hk) & (r.abs() < bound)


class DirectPass(NamedTuple):
    """One compiled pass of the direct route in pair order (``direct_passes``): its name (a
    code object of its own), ``values`` (fn(h, k, ρ, base=None) -> (C, accepted): one rule
    for every pair), ``keep`` (fn(h, k, ρ) -> where those values are final when accepted) and
    ``wide`` (h, k, ρ taken to float64 arithmetic first, ρΦ(h)Φ(k) formed there: float32's
    re-evaluation)."""

    name: str
    values: Callable
    keep: Callable
    wide: bool


def _wide_band(f64: bool) -> Callable:
    """Whether (h, k, ρ) is in the wide group (float64: 0.925 ≤ |ρ| < 0.99, |h|, |k| ≤ 7;
    float32: its re-evaluation's domain, every |ρ| < 0.99), for a compiled pass."""
    if not f64:
        return lambda h, k, r: _direct_wide_domain(_TORCH_OPS[0], h, k, r.abs())
    top, bound = _DIRECT_WIDE64[0], _DIRECT_GROUPS[-1][0]
    return lambda h, k, r: (
        _direct_wide_domain(_TORCH_OPS[0], h, k, r.abs(), top) & (r.abs() >= bound)
    )


@functools.lru_cache(maxsize=2)
def direct_passes(f64: bool) -> tuple[DirectPass, ...]:
    """The compiled bulk's passes in pair order (``torchbridge.moments._one_pass_bulk``), each
    on the pairs the ones before left, each keeping its own band of |ρ|: the one pass
    (``DIRECT_ONE_PASS``, the rule in t, on |h|, |k| ≤ ``DIRECT_ONE_PASS_HK``); in float64
    the other groups (0.7 ≤ |ρ| < 0.925) and the one pass's groups beyond its |h|, |k| bound;
    then the wide group: float64 0.925 ≤ |ρ| < 0.99 (float64's rounding test), float32 every
    |ρ| < 0.99 left (in float64 arithmetic, the ``wide`` test, as the general path evaluates
    them); then the ρ < 0 tail route (``neg_tail_pass_values``). The second and wide passes
    take their rules in s (``_direct_s_integral``: ``DIRECT_S_GROUPS`` and ``DIRECT_S_WIDE``
    points, where t needs 32 and 80 (float32's: 48)). The pairs a band's rounding test
    rejects stay for the routes after."""
    eps = 2.0**-52 if f64 else 2.0**-23
    first, n = DIRECT_ONE_PASS[f64]
    keep = functools.partial(direct_groups_below, top=first, hk=DIRECT_ONE_PASS_HK[f64])
    passes = [DirectPass(f"one_pass_{n}", direct_group_values(n, eps), keep, False)]
    if f64:  # and the one pass's groups beyond its |h|, |k| bound (``DIRECT_ONE_PASS_HK``)
        top, n = DIRECT_GROUPS_PASS[0], DIRECT_S_GROUPS
        keep = functools.partial(direct_groups_below, top=top)
        values = direct_group_values(n, eps, in_s=True)
        passes.append(DirectPass(f"groups_pass_s{n}", values, keep, False))
    # the rule in s: 32 points where t needs 80 (float32's: 48); float64's few pairs in the
    # [pairs, nodes] form (``direct_s_matrix_values``: as fast as the unrolled one there, and
    # a second less to compile), float32's more pairs unrolled (0.94 of the call's time
    # against 1.03 for the [pairs, nodes] form; session 33, p = 1024, one process, calls
    # interleaved, scratch ``/tmp/s33/ab3.py``)
    n = DIRECT_S_WIDE
    if f64:
        values = direct_s_matrix_values(n, eps)
    else:
        values = direct_group_values(n, eps, wide=True, in_s=True)
    passes.append(DirectPass(f"wide_pass_s{n}", values, _wide_band(f64), not f64))
    # the ρ < 0 tail route on the cancelling pairs left (few: 3,649 of p = 1024's float64
    # pairs, none of float32's): compiled into each thread's ranges, where it ran eagerly
    # after them on all the pairs left (1.6 ms of the float64 call, one thread)
    tail = DirectPass("neg_tail_pass", neg_tail_pass_values(eps), _neg_tail_domain, True)
    return (*passes, tail)


def _direct_fused(h, k, r, eps: float, cdf=None):
    """``_cov_direct``'s (C, accepted) with ``compiled_bulk`` on (eager CPU tensors outside
    autograd), else None: the group key and ρΦ(h)Φ(k) in one compiled pass
    (``direct_front``; or from ``cdf``, a ``DirectFront``), one sort and one gather in group
    order, then per |ρ| group one compiled pass of ``_direct_unrolled`` whose values are
    scattered straight to the pairs' places (float32's rejects redone in float64 arithmetic:
    ``_direct_redo32``), then the group beyond the last (``_direct_high``)."""
    import torch

    from nmruntime.torch_support import compiled

    if isinstance(h, np.ndarray) or h.requires_grad or k.requires_grad:
        return None
    front = compiled(h, f"front{cdf is None}", direct_front)
    if front is None:
        return None
    f64 = eps < 1e-10
    _torch_ops_cached()
    if isinstance(cdf, DirectFront):  # the caller's compiled pass computed them
        key, base = cdf
    else:
        key, base = front(h, k, r, *(cdf or ()))
    _, perm = torch.sort(key, stable=True)
    counts = torch.bincount(key, minlength=len(_DIRECT_GROUPS) + 1).tolist()
    c, ok = torch.empty_like(h), torch.empty_like(h, dtype=torch.bool)
    # one gather of each input in group order (a gather fused into the groups' kernels was
    # no faster at p = 1024, measured alternating)
    ins = tuple(v.index_select(0, perm) for v in ((h, k, r) if base is None else (h, k, r, base)))
    okp = torch.empty_like(h, dtype=torch.bool)  # acceptance in group order
    start, starts = 0, []
    for (_, n64, n32), cnt in zip(_DIRECT_GROUPS, counts, strict=False):
        starts.append(start)
        if cnt:
            n = n64 if f64 else n32
            # eager where compiling failed during this call (``torch_support.compiled``)
            run = _direct_compiled(h, n, eps, False, base is not None) or direct_group_values(
                n, eps
            )
            cs, oks = run(*(v[start : start + cnt] for v in ins))
            c.index_copy_(0, perm[start : start + cnt], cs)
            okp[start : start + cnt] = oks
        start += cnt
    if not f64:  # float32: the rejects again in float64 arithmetic (``wide``)
        _direct_redo32(ins, perm, okp[:start], starts, c, eps)
    ok.index_copy_(0, perm[:start], okp[:start])
    out = perm[start:]
    if out.numel():
        c.index_fill_(0, out, 0.0)
        ok.index_fill_(0, out, False)
    _direct_high(h, k, r, c, ok, out)
    return c, ok


#: float32's rejects of the compiled groups are redone in float64 arithmetic in these batches
#: of groups (end indices into ``_DIRECT_GROUPS``), each with the largest float64 rule size of
#: its groups (more nodes than a group needs: as accurate). Session 22, `nm bench floor`'s
#: problem (17,878 rejects): one pass per group (11 nonzero, gather and scatter sets) took
#: ~2-3 ms per call; three batches fewer.
_REDO32_BATCHES = (5, 9, len(_DIRECT_GROUPS))


def _direct_redo32(ins, perm, okp, starts, c, eps: float) -> None:
    """float32 under the compiled bulk: the pairs the groups rejected (``okp`` False, in group
    order; ``ins`` = h, k, ρ, … in group order, ``perm`` their places) evaluated again in
    float64 arithmetic with float64's rule sizes (``_REDO32_BATCHES``) and accepted by the
    ``wide`` test; values written into ``c`` (pair order), acceptance into ``okp``."""
    import torch

    bad = (~okp).nonzero().squeeze(1)
    if bad.numel() == 0:
        return
    lo = 0
    for end in _REDO32_BATCHES:
        # the bad positions inside groups lo .. end − 1 (sorted: one searchsorted per edge)
        edges = torch.tensor([starts[lo], starts[end] if end < len(starts) else okp.numel()])
        a, b = torch.searchsorted(bad, edges).tolist()
        if b > a:
            sel = bad[a:b]
            n = max(g[1] for g in _DIRECT_GROUPS[lo:end])
            w = [v.index_select(0, sel).double() for v in ins[:3]]
            run = _direct_compiled(w[0], n, eps, True, False) or direct_group_values(n, eps, True)
            c2, ok2 = run(*w)
            c.index_copy_(0, perm.index_select(0, sel), c2.to(c.dtype))
            okp.index_copy_(0, sel, ok2)
        lo = end


def _direct_high(h, k, r, c, ok, cand) -> None:
    """Eager CPU, outside autograd: the pairs among the indices ``cand`` (outside the groups'
    domain) with |h|, |k| ≤ ``_DIRECT_HK`` and |ρ| below the wide group's bound
    (``_DIRECT_WIDE32`` or ``_DIRECT_WIDE64``) by the rule in s of ``DIRECT_S_WIDE`` points
    (as the compiled wide pass), in float64 arithmetic, accepted by the ``wide`` rounding test
    (float32) or float64's; their values and acceptance written into ``c``, ``ok`` in place
    (one compiled pass of ``_direct_s_matrix`` where the compiled bulk is on)."""
    import torch

    from nmruntime.torch_support import compiled

    if cand.numel() == 0:
        return
    f64 = h.dtype == torch.float64
    top = (_DIRECT_WIDE64 if f64 else _DIRECT_WIDE32)[0]
    hc, kc, rc = (v.index_select(0, cand) for v in (h, k, r))
    sub = _direct_wide_domain(_torch_ops_cached(), hc, kc, rc.abs(), top).nonzero().squeeze(1)
    if sub.numel() == 0:
        return
    w = [v.index_select(0, sub).double() for v in (hc, kc, rc)]
    eps = float(torch.finfo(h.dtype).eps)
    run = compiled(w[0], f"direct_wide:{eps}", lambda *a: _direct_s_matrix(*a, eps, not f64))
    rule = _direct_rule(DIRECT_S_WIDE, w[0])  # in s: 32 points where t needs 80 (48)
    c2, ok2 = (run or (lambda *a: _direct_s_matrix(*a, eps, not f64)))(*w, *rule)
    idx = cand.index_select(0, sub)
    c.index_copy_(0, idx, c2.to(c.dtype))
    ok.index_copy_(0, idx, ok2)


def _direct_s_matrix(h, k, r, y, wy, eps: float, wide: bool, base=None):
    """(C, accepted) of ``_direct_s_integral`` (the [pairs, nodes] form, the rule as tensors)
    and ``_direct_accept`` (``base``: ρΦ(h)Φ(k) or None): for a large rule on few pairs
    (compiled in seconds, where the unrolled form of 80 points in t took 22 s)."""
    j = _direct_s_integral(h, k, r, (y, wy))
    return _direct_accept(_torch_ops_cached(), h, k, r, j, eps, wide, base)


def _direct_unrolled(h, k, r, base, y: tuple, wy: tuple, eps: float, wide: bool):
    """(C, accepted) of ``_direct_integral`` and ``_direct_accept`` with the rule's nodes ``y``
    and weights ``wy`` as Python floats: the node loop unrolled into one elementwise
    expression (one fused pass over memory under ``torch.compile``; no [pairs, nodes]
    temporary). The same formula as there, summed node by node (the eager route's matvec
    may sum in another order: a few eps apart). ``base``: ρΦ(h)Φ(k) or None. 1-D tensors."""
    import torch

    a = -0.25 * (h - k) ** 2
    b = -0.25 * (h + k) ** 2
    acc = 0.0 * h
    for yi, wi in zip(y, wy, strict=True):
        t = r * yi
        u, v = 1.0 + t, 1.0 - t
        q = torch.reciprocal(u * v)
        acc = acc + wi * (torch.exp((u * a + v * b) * q) * torch.sqrt(q))
    j = (r * r) * acc * (0.25 / math.pi)
    return _direct_accept(_TORCH_OPS[0], h, k, r, j, eps, wide, base)


def direct_group_values(n: int, eps: float, wide: bool = False, in_s: bool = False):
    """fn(h, k, ρ, base=None) -> (C, accepted): ``_direct_unrolled`` (``in_s``: the rule in s,
    ``_direct_s_unrolled``) with the n-point rule's nodes and weights as constants (``base``:
    ρΦ(h)Φ(k) or None), for a caller that compiles it, alone (``_direct_compiled``) or inside
    its own pass (``torchbridge.moments``' passes). ``eps``: the target dtype's; ``wide``:
    see ``_direct_accept``."""
    _torch_ops_cached()
    y, wy = (tuple(float(v) for v in t) for t in _direct_rule(n, np.zeros(0)))
    unrolled = _direct_s_unrolled if in_s else _direct_unrolled

    def values(h, k, r, base=None):
        return unrolled(h, k, r, base, y, wy, eps, wide)

    return values


def _direct_s_unrolled(h, k, r, base, y: tuple, wy: tuple, eps: float, wide: bool):
    """``_direct_unrolled`` with J by ``_direct_s_integral``'s sum (the rule in s), node by
    node: one fused pass under ``torch.compile``."""
    import torch

    a = 0.25 * (h - k) ** 2
    b = 0.25 * (h + k) ** 2
    S = r / (1.0 + torch.sqrt((1.0 - r) * (1.0 + r)))
    s2 = S * S
    acc = 0.0 * h
    for yi, wi in zip(y, wy, strict=True):
        s = S * yi
        u, v, p2 = 1.0 + s, 1.0 - s, 1.0 + s * s
        uv = u * v
        q = torch.reciprocal((p2 * uv) * (p2 * uv))
        g = (a * (u * u) + b * (v * v)) * (p2 * p2 * p2) * q
        acc = acc + wi * ((1.0 - s2 * yi) * torch.exp(-g) * ((uv * uv) * q))
    j = (r * S) * acc * (0.5 / math.pi)
    return _direct_accept(_TORCH_OPS[0], h, k, r, j, eps, wide, base)


def direct_s_matrix_values(n: int, eps: float, wide: bool = False):
    """``direct_group_values(..., in_s=True)`` in the [pairs, nodes] form of
    ``_direct_s_integral`` (float64 inputs): for a large rule on few pairs inside a caller's
    compiled pass."""
    import torch

    _torch_ops_cached()
    rule = _direct_rule(n, torch.zeros(0, dtype=torch.float64))

    def values(h, k, r, base=None):
        return _direct_s_matrix(h, k, r, *rule, eps, wide, base)

    return values


def _direct_compiled(like, n: int, eps: float, wide: bool, with_base: bool):
    """``_direct_unrolled`` for the n-point rule compiled (``torch_support.compiled``: one
    compile per rule size, dtype and variant, dynamic in the pair count), or None where the
    compiled bulk is off or does not apply to ``like``."""
    from nmruntime.torch_support import compiled

    run = direct_group_values(n, eps, wide)
    # a code object of its own per rule size (``renamed``): 11 rule sizes would share one
    return compiled(like, f"direct{n}:{eps}:{wide}:{with_base}", renamed(run, f"direct_{n}"))


#: The ρ < 0 tail route (``cov_neg_tail``): h + k ≤ 0, |h|, |k| ≤ ``_DIRECT_HK``,
#: −0.99 < ρ < 0, B/S ≥ ``_NEG_TAIL_B`` and A·S² ≤ B·(2 − S)² (A = (h − k)²/4, B = (h + k)²/4,
#: S = 1 + ρ). There the Gauss–Laguerre variable's nearest singularity lies at least
#: B/(2S) ≥ 4 left of the origin and the integrand decreases from it (h, k ≤ 0 give A ≤ B, so
#: the last condition holds). Measured against mpmath (30 digits), session 22, with the
#: 32-point Laguerre rule and the 32-point (|ρ| < 0.925) or 80-point Legendre rule for Q: on
#: 219 random points of the domain (h ∈ [−7, 4], k ∈ [−7, 0]) ≤ 53.9 eps relative (at
#: (h² + k²)/2 = 36: the exp's conditioning), B/S ≥ 6 the same, B/S ≥ 4 77.6 eps and, at
#: ρ = −0.036, 366 eps; on 117 points with h, k ≤ 0 and B/S ≥ 8, 24 Laguerre points ≤ 39 eps
#: and 16 points 4,700 eps. The bench problem's cancelling pairs have B/S ≥ 8.1.
_NEG_TAIL_B = 8.0


def _neg_tail_domain(h, k, r):
    """Where ``cov_neg_tail`` applies (see ``_NEG_TAIL_B``)."""
    a, b, s = 0.25 * (h - k) ** 2, 0.25 * (h + k) ** 2, 1.0 + r
    inside = (h + k <= 0.0) & (h.abs() <= _DIRECT_HK) & (k.abs() <= _DIRECT_HK)
    inside = inside & (r < 0.0) & (r > -_DIRECT_WIDE64[0]) & (b >= _NEG_TAIL_B * s)
    return inside & (a * s * s <= b * (2.0 - s) ** 2)


def _neg_tail_values(h, k, r, y, wq, xl, wl):
    """C(h, k, ρ) for ρ < 0, h + k ≤ 0 (float64 tensors, 1-D; rules as tensors) without
    cancellation. C = ∫_0^ρ Φ2(h, k; r) dr = ρΦ2(h, k; ρ) + ∫_ρ^0 t φ2(t) dt (by parts) =
    −(|ρ|P + Q), P = Φ2(h, k; ρ) = ∫_{−1}^ρ φ2 dt (Φ2(h, k; −1) = 0 as h + k ≤ 0) and
    Q = ∫_ρ^0 |t| φ2 dt: two positive terms. With φ2(t) = e^{−A/(1 − t) − B/(1 + t)}/(2π√(1 − t²)),
    A = (h − k)²/4, B = (h + k)²/4:

        Q = ρ²/(4π) Σ w_i y_i e^{G(ρy_i)}/√(1 − ρ²y_i²)   (Gauss–Legendre on t = ρy, y ∈ [0, 1]),
        P = 1/(2πB) Σ ω_j e^{−B/S − A/(2 − s_j)} s_j √(s_j/(2 − s_j)),   s_j = 1/(x_j/B + 1/S),

    S = 1 + ρ, (x_j, ω_j) the Gauss–Laguerre rule: with s = 1 + t and u = B(1/s − 1/S),
    e^{−B/s} = e^{−B/S} e^{−u} and ds = −(s²/B) du. ``wq`` = w·y of the [0, 1] rule ``y``."""
    import torch

    a = 0.25 * (h - k) ** 2
    b = 0.25 * (h + k) ** 2
    t = torch.outer(r, y)
    u, v = 1.0 + t, 1.0 - t
    q = torch.reciprocal(u * v)
    g = -(u * a[:, None] + v * b[:, None]) * q
    qv = (r * r) * ((torch.exp(g) * torch.sqrt(q)) @ wq) * (0.25 / math.pi)
    sr = 1.0 + r
    s = torch.reciprocal(xl / b[:, None] + torch.reciprocal(sr)[:, None])
    e = -(b / sr)[:, None] - a[:, None] / (2.0 - s)
    pv = ((torch.exp(e) * s * torch.sqrt(s / (2.0 - s))) @ wl) * (_INV_2PI / b)
    return -(r.abs() * pv + qv)


#: ρ at and below which the tail route's Legendre part takes the wide group's rule
_NEG_TAIL_HIGH = -_DIRECT_GROUPS[-1][0]


def _neg_tail_rules(like):
    """The tail route's rules as float64 tensors on ``like``'s device: the Gauss–Laguerre
    [nodes, weights], and the Gauss–Legendre (y, w·y) for ρ above and at or below
    ``_NEG_TAIL_HIGH`` (the last group's size and the wide group's)."""
    import torch
    from nmgen.generated.gauss_legendre import LAGUERRE

    lag = [torch.as_tensor(v, dtype=torch.float64, device=like.device) for v in LAGUERRE]
    legendre = []
    for n in (_DIRECT_GROUPS[-1][1], _DIRECT_WIDE64[1]):
        y, wy = _direct_rule(n, lag[0])
        legendre.append((y, wy * y / (1.0 - y)))  # w·y from the cached w(1 − y) (y < 1)
    return lag, legendre


def cov_neg_tail(h, k, r, eps: float):
    """(C, accepted) by the ρ < 0 tail route (``_neg_tail_values``) on eager CPU tensors
    outside autograd (1-D), evaluated in float64 arithmetic: (0, False) outside
    ``_neg_tail_domain`` and where |C| is not a normal number of the target precision
    ``eps``. It takes the pairs whose ρΦ(h)Φ(k) + J cancels beyond the direct route's
    rounding test (ρ < 0, both units mostly off): on `nm bench floor`'s p = 1024 problem all
    3,649 of them, which otherwise went to the closed form, Mehler's series and the
    quadrature (~7 ms of per-call overhead). Compiled (one pass per Legendre size) with the
    compiled bulk."""
    import torch

    from nmruntime.torch_support import compiled

    c = torch.zeros_like(h)
    ok = torch.zeros_like(h, dtype=torch.bool)
    dom = _neg_tail_domain(h, k, r)
    high = r <= _NEG_TAIL_HIGH
    w64 = [v.double() for v in (h, k, r)]
    lag, (low_rule, high_rule) = _neg_tail_rules(w64[0])
    run = compiled(w64[0], "neg_tail", _neg_tail_values) or _neg_tail_values
    for sel, (y, wq) in ((dom & ~high, low_rule), (dom & high, high_rule)):
        idx = sel.nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        vals = run(*(v.index_select(0, idx) for v in w64), y, wq, *lag)
        c.index_copy_(0, idx, vals.to(c.dtype))
        ok.index_copy_(0, idx, vals.abs().to(c.dtype) >= _TINY_NORMAL[eps < 1e-10] / eps)
    return c, ok


def neg_tail_pass_values(eps: float):
    """fn(h, k, ρ, base=None) -> (C, accepted): ``cov_neg_tail`` for a caller that compiles
    it inside its own pass (float64 h, k, ρ: the ``wide`` passes of ``direct_passes``), masked
    where ``cov_neg_tail`` gathers: both Legendre sizes on every pair, each pair taking its
    own; accepted where ``_neg_tail_domain`` holds and |C| is a normal number of the target
    precision ``eps``. ``base`` is not used."""
    import torch

    lag, rules = _neg_tail_rules(torch.zeros(0, dtype=torch.float64))
    low = _TINY_NORMAL[eps < 1e-10] / eps

    def values(h, k, r, base=None):
        lo, hi = (_neg_tail_values(h, k, r, y, wq, *lag) for y, wq in rules)
        c = torch.where(r <= _NEG_TAIL_HIGH, hi, lo)
        return c, _neg_tail_domain(h, k, r) & (c.abs() >= low)

    return values


#: |ρ| → group of ``_DIRECT_GROUPS`` by a table on ⌊40|ρ|⌋ (every group bound is a multiple of
#: 1/40; a |ρ| within rounding of a bound may take the next group's larger rule, never a
#: smaller one than its own: 40·fl(b) rounds to 40b for these bounds).
_DIRECT_LUT: dict = {}


def _direct_group_index(ar):
    """uint8 group index of each |ρ| (``len(_DIRECT_GROUPS)`` at and above the last bound)."""
    import torch

    key = ar.device
    if key not in _DIRECT_LUT:
        bounds = [g[0] for g in _DIRECT_GROUPS]
        table = [sum(1 for b in bounds if i >= round(40 * b)) for i in range(42)]
        _DIRECT_LUT[key] = torch.tensor(table, dtype=torch.uint8, device=ar.device)
    cell = (ar * 40.0).clamp_(0.0, 41.0).nan_to_num_(41.0).to(torch.int64)  # NaN: outside
    return _DIRECT_LUT[key].index_select(0, cell)
