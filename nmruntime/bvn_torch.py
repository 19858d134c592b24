"""Bivariate standard normal CDF Φ2(h, k; ρ) = P(Z1 < h, Z2 < k) in PyTorch.

Forward: the Gauss-Legendre scheme of [DW1990]_ as refined by [Genz2004]_ (re-derived here).

* |ρ| < 0.925: Plackett's identity ∂Φ2/∂ρ = φ2(h, k; ρ) with ρ = sin θ gives

      Φ2 = Φ(h)Φ(k) + (1/2π) ∫_0^{asin ρ} exp(−(h² − 2hk sin θ + k²)/(2cos²θ)) dθ,

  integrated with the 6-, 12- or 20-point rule for |ρ| < 0.3, < 0.75, otherwise.
* 0.925 <= |ρ| < 1: with σ = sign ρ, κ = σk, x = √(1 − t²), a = √(1 − ρ²), b = |h − κ|,

      Φ2 = B(h, k; σ) − σ J,   J = (1/2π) ∫_0^a exp(−b²/(2x²) − hκ/(1 + √(1−x²)))/√(1−x²) dx,

  where B = Φ(min(h, k)) for σ = 1 and P(−max(h, k) < Z < min(h, k)) for σ = −1 (the
  |ρ| = 1 limits; the interval probability without cancellation, ``interval_prob``). The factor exp(−hκ/(1+t))/t is replaced by its expansion
  e^{−hκ/2}(1 + c x² + c d x⁴), c = (4 − hκ)/8, d = (12 − hκ)/16, whose integral against
  exp(−b²/(2x²)) is done in closed form (with Φ(−b/a)); the small smooth remainder is
  integrated with the 20-point rule.
* |ρ| = 1: the exact limits B. h, k are clamped to ±40 (exact in float64: Φ(−40) < 1e-349),
  which also covers ±inf. Results are clipped to the Fréchet bounds
  [max(0, Φ(h) + Φ(k) − 1), Φ(min(h, k))]. NaN inputs or |ρ| > 1 give NaN.

Backward (a custom autograd Function, itself differentiable so double backward works) uses the
closed forms ∂Φ2/∂h = φ(h)Φ((k − ρh)/s), ∂Φ2/∂k = φ(k)Φ((h − ρk)/s),
∂Φ2/∂ρ = φ(k)φ((h − ρk)/s)/s, s = √(1 − ρ²), with masked inputs; at |ρ| = 1 the Φ factors
become steps (½ at the tie) and ∂Φ2/∂ρ is set to 0 (its one-sided limit except at h = ±k,
where it diverges), so gradients are finite everywhere.

Quadrature rules (nodes and weights of the FULL n-point Gauss-Legendre rule on [−1, 1], as
produced by ``derivations.bvn.gauss_legendre(n)``, converted to floats) are passed either

* as ``nodes``/``weights`` (two sequences of n floats): one rule for every ρ (n = 20 is
  adequate everywhere), or
* as ``rules={6: (nodes6, weights6), 12: (nodes12, weights12), 20: (nodes20, weights20)}``:
  Genz's size selection (key 20 required; a missing 6 or 12 falls back to the next larger).

With neither, the 6/12/20 rules come from ``generated/gauss_legendre.py`` (printed by nmgen
from ``derivations.bvn.gauss_legendre``: the one copy of the constants).

.. [Genz2004] A. Genz, "Numerical computation of rectangular bivariate and trivariate normal
   and t probabilities", Statistics and Computing 14 (2004) 251-260.
.. [DW1990] Z. Drezner and G. O. Wesolowsky, "On the computation of the bivariate normal
   integral", Journal of Statistical Computation and Simulation 35 (1990) 101-107.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from nmruntime.torch_support import sync_free

__all__ = ["bvn_cdf", "interval_prob"]

Rule = tuple[Sequence[float], Sequence[float]]

_CLIP = 40.0
_HI = 0.925  # |ρ| threshold between the two schemes [Genz2004]
_CHUNK = 65536
_INV_2PI = 1.0 / (2.0 * math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)
_ONE = torch.ones(())


def default_rules() -> Mapping[int, Rule]:
    """The 6/12/20-point rules printed by nmgen (generated/gauss_legendre.py, the one copy)."""
    from nmgen.generated.gauss_legendre import GENZ_SIZES, RULES

    return {n: RULES[n] for n in GENZ_SIZES}


def _resolve_rules(
    nodes: Sequence[float] | None,
    weights: Sequence[float] | None,
    rules: Mapping[int, Rule] | None,
) -> tuple[Rule, Rule, Rule]:
    """(rule for |ρ| < 0.3, rule for |ρ| < 0.75, rule for the rest) as float tuples."""
    if rules is not None and (nodes is not None or weights is not None):
        raise TypeError("bvn_cdf: pass either nodes/weights or rules, not both")
    if (nodes is None) != (weights is None):
        raise TypeError("bvn_cdf: nodes and weights must be given together")
    if nodes is not None:
        assert weights is not None
        if len(nodes) != len(weights) or len(nodes) == 0:
            raise ValueError("bvn_cdf: nodes and weights must have the same nonzero length")
        one = (tuple(float(v) for v in nodes), tuple(float(v) for v in weights))
        return one, one, one
    if rules is None:
        rules = default_rules()
    if 20 not in rules:
        raise ValueError("bvn_cdf: rules must contain the 20-point rule (key 20)")
    conv = {
        n: (tuple(float(v) for v in x), tuple(float(v) for v in w)) for n, (x, w) in rules.items()
    }
    for n, (x, w) in conv.items():
        if len(x) != n or len(w) != n:
            raise ValueError(f"bvn_cdf: rule {n} must have {n} nodes and {n} weights")
    r20 = conv[20]
    r12 = conv.get(12, r20)
    r6 = conv.get(6, r12)
    return r6, r12, r20


def _ndtr(x: Tensor) -> Tensor:
    """Φ(x) = erfc(−x/√2)/2 (``torch.special.ndtr`` uses 1 + erf and underflows to 0 for
    x < −8.3 in float64, e.g. it returns 0 for Φ(−10) = 7.6e-24)."""
    return 0.5 * torch.special.erfc(x * -_SQRT1_2)


def interval_prob(a: Tensor, b: Tensor) -> Tensor:
    """P(a < Z < b) for Z standard normal (0 where b ≤ a), same dtype/device, relatively
    accurate; no data-dependent control flow. The NumPy twin
    ``nmruntime.bvn_numpy.interval_prob`` states the forms and their error bound."""
    from nmgen.generated.gauss_legendre import RULES

    from nmruntime.bvn_numpy import NARROW_RULE

    x, w = (torch.tensor(v, dtype=a.dtype, device=a.device) for v in RULES[NARROW_RULE])
    m = 0.5 * a + 0.5 * b
    d = 0.5 * b - 0.5 * a
    erfc, erf = torch.special.erfc, torch.special.erf
    up = 0.5 * (erfc(a * _SQRT1_2) - erfc(b * _SQRT1_2))
    dn = 0.5 * (erfc(b * -_SQRT1_2) - erfc(a * -_SQRT1_2))
    mid = 0.5 * (erf(b * _SQRT1_2) - erf(a * _SQRT1_2))
    wide = torch.where(a >= 0, up, torch.where(b <= 0, dn, mid))
    narrow_ok = d * (m.abs() + 1.0) <= 1.0
    dx = torch.where(narrow_ok, d, 0.0).unsqueeze(-1) * x
    f = torch.exp(-dx * (m.unsqueeze(-1) + 0.5 * dx))
    narrow = d * torch.exp(-0.5 * m * m) * _INV_SQRT_2PI * (f @ w)
    return torch.where(b <= a, 0.0, torch.where(narrow_ok, narrow, wide))


def _exp_(t: Tensor) -> Tensor:
    """In-place exp that maps arguments whose result would be subnormal to exactly 0.

    (Subnormal results take a slow path in the vectorised exp; they are below 1e-304 in
    float64 and 1e-37 in float32, far under the accuracy of the result.)
    """
    cut = -700.0 if t.dtype == torch.float64 else -87.0
    return t.masked_fill_(t < cut, -math.inf).exp_()


def _low(
    h: Tensor, k: Tensor, r: Tensor, x: Tensor, w: Tensor, base: Tensor, sync_free: bool = False
) -> Tensor:
    """|ρ| < 0.925 (1-D inputs, all valid; runs without autograd, so ops are in place).

    ``base`` is Φ(h)Φ(k). The exponent (hk sin θ − (h² + k²)/2)/cos²θ is bounded below by
    −(h² + k²)/(1 − ρ²), so the subnormal guard of ``_exp_`` runs only where that bound
    is below the cut-off.
    """
    hk = h * k
    hs = (h * h + k * k) * 0.5
    asr = torch.asin(r)
    sn = torch.outer(asr, (1.0 + x) * 0.5).sin_()  # [m, n]
    den = torch.addcmul(_ONE.to(sn), sn, sn, value=-1.0)  # cos²θ
    e = torch.addcmul(hs.neg().unsqueeze(1), sn, hk.unsqueeze(1)).div_(den)
    cut = -700.0 if e.dtype == torch.float64 else -87.0
    if sync_free or bool((hs * -2.0 < cut * ((1.0 - r) * (1.0 + r))).any()):
        e.masked_fill_(e < cut, -math.inf)
    return torch.addcmul(base, asr, e.exp_() @ w, value=0.5 * _INV_2PI)


def _high(
    h: Tensor, k: Tensor, r: Tensor, x: Tensor, w: Tensor, upper: Tensor, lower: Tensor
) -> Tensor:
    """0.925 <= |ρ| < 1 (1-D inputs); ``upper``, ``lower``: Φ(min(h, k)) and
    max(0, Φ(min(h, k)) − Φ(−max(h, k)))."""
    sg = torch.where(r < 0, -1.0, 1.0).to(h.dtype)
    kk = sg * k
    hk = h * kk
    ar = r.abs()
    as_ = (1.0 - ar) * (1.0 + ar)
    a = torch.sqrt(as_)
    dif = h - kk
    bs = dif * dif
    b = dif.abs()
    c = (4.0 - hk) * 0.125
    d = (12.0 - hk) * 0.0625
    asr = -(bs / as_ + hk) * 0.5
    closed = (
        a
        * torch.exp(asr)
        * (1.0 - c * (bs - as_) * (1.0 - d * bs * 0.2) / 3.0 + c * d * as_ * as_ * 0.2)
    )
    closed = closed - _SQRT_2PI * b * torch.exp(-0.5 * hk + torch.special.log_ndtr(-b / a)) * (
        1.0 - c * bs * (1.0 - d * bs * 0.2) / 3.0
    )
    half = (0.5 * a)[:, None]
    xs = (half * (1.0 + x)).square_()  # [m, n]
    rs = torch.neg(xs).add_(1.0).sqrt_()
    hk2, bs2, c2, d2 = hk[:, None], bs[:, None], c[:, None], d[:, None]
    asx = torch.div(bs2, xs).add_(hk2).mul_(-0.5)
    t1 = torch.add(rs, 1.0).square_().reciprocal_().mul_(xs).mul_(hk2).mul_(-0.5)
    _exp_(t1.add_(asx)).div_(rs)
    t2 = torch.mul(xs, d2).add_(1.0).mul_(xs).mul_(c2).add_(1.0).mul_(_exp_(asx))
    f = t1.sub_(t2)
    j = (closed + (0.5 * a) * (f @ w)) * _INV_2PI
    base = torch.where(r > 0, upper, lower)
    return base - sg * j


def _forward(h: Tensor, k: Tensor, r: Tensor, rules: tuple[Rule, Rule, Rule]) -> Tensor:
    """Flat (1-D) float tensors in, Φ2 out (same dtype/device).

    Works in slices of about ``_CHUNK`` elements (so the [slice, nodes] temporaries stay in
    cache); within a slice, a rule group that holds every element is evaluated without
    gathering, the others on gathered indices.
    """
    dt, dev = h.dtype, h.device
    hc = h.clamp(-_CLIP, _CLIP)
    kc = k.clamp(-_CLIP, _CLIP)
    ph, pk = _ndtr(hc), _ndtr(kc)
    # Fréchet bounds max(0, Φ(h) + Φ(k) − 1) <= Φ2 <= Φ(min(h, k)) (the ρ = ∓1 values); at
    # |ρ| = 1 they are the result. Φ(min(h, k)) = min(Φ(h), Φ(k)) (Φ is monotone); the lower
    # one is P(−max(h, k) < Z < min(h, k)), formed without cancellation.
    upper = torch.minimum(ph, pk)
    lower = interval_prob(-torch.maximum(hc, kc), torch.minimum(hc, kc))
    ar = r.abs()
    if sync_free(h):
        out = _forward_sync_free(hc, kc, r, ar, rules, ph, pk, upper, lower)
        return torch.minimum(torch.maximum(out, lower), upper)
    out = torch.full_like(h, math.nan)
    # group: 0, 1, 2 (low scheme with rules 0, 1, 2), 3 (high scheme), 4 (|ρ| >= 1 or NaN)
    grp = (
        (ar >= 0.3).to(torch.int8)
        + (ar >= 0.75).to(torch.int8)
        + (ar >= _HI).to(torch.int8)
        + (~(ar < 1.0)).to(torch.int8)
    )
    t = [
        (torch.tensor(x, dtype=dt, device=dev), torch.tensor(w, dtype=dt, device=dev))
        for x, w in rules
    ]
    n = h.numel()
    for s in range(0, n, _CHUNK):
        e = min(n, s + _CHUNK)
        g = grp[s:e]
        cnt = torch.bincount(g, minlength=5).tolist()
        for gi in range(4):
            if cnt[gi] == 0:
                continue
            if cnt[gi] + cnt[4] == e - s:  # group-4 values are discarded below
                sel = slice(s, e)
            else:
                sel = (g == gi).nonzero().squeeze(1).add_(s)
            x, w = t[min(gi, 2)]
            if gi < 3:
                v = _low(hc[sel], kc[sel], r[sel], x, w, ph[sel] * pk[sel])
            else:
                v = _high(hc[sel], kc[sel], r[sel], x, w, upper[sel], lower[sel])
            out[sel] = v
    out = torch.where(
        r == 1.0, upper, torch.where(r == -1.0, lower, torch.where(grp < 4, out, math.nan))
    )
    return torch.minimum(torch.maximum(out, lower), upper)


def _forward_sync_free(
    hc: Tensor,
    kc: Tensor,
    r: Tensor,
    ar: Tensor,
    rules: tuple[Rule, Rule, Rule],
    ph: Tensor,
    pk: Tensor,
    upper: Tensor,
    lower: Tensor,
) -> Tensor:
    """``_forward`` without data-dependent control flow (accelerators, ``torch.compile``):
    the low scheme with the 20-point rule on every element (as accurate as the 6/12-point
    rules where those apply) and the high scheme on every element, each on masked ρ."""
    dt, dev = hc.dtype, hc.device
    x, w = (torch.tensor(v, dtype=dt, device=dev) for v in rules[2])
    low = ar < _HI
    high = (ar >= _HI) & (ar < 1.0)
    v_low = _low(hc, kc, torch.where(low, r, 0.0), x, w, ph * pk, sync_free=True)
    v_high = _high(hc, kc, torch.where(high, r, _HI), x, w, upper, lower)
    out = torch.where(low, v_low, torch.where(high, v_high, math.nan))
    return torch.where(r == 1.0, upper, torch.where(r == -1.0, lower, out))


def _grads(h: Tensor, k: Tensor, r: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(∂Φ2/∂h, ∂Φ2/∂k, ∂Φ2/∂ρ), finite everywhere, built from masked inputs."""
    hc = h.clamp(-_CLIP, _CLIP)
    kc = k.clamp(-_CLIP, _CLIP)
    inner = r.abs() < 1.0
    rs = torch.where(inner, r, torch.zeros_like(r))
    s = torch.sqrt((1.0 - rs) * (1.0 + rs))
    num_h = kc - r * hc  # k − ρh (true ρ: used for the step at |ρ| = 1)
    num_k = hc - r * kc
    ah = (kc - rs * hc) / s
    ak = (hc - rs * kc) / s

    def step(v: Tensor) -> Tensor:
        return torch.where(v > 0, 1.0, torch.where(v < 0, 0.0, 0.5)).to(v.dtype)

    cdf_h = torch.where(inner, _ndtr(ah), step(num_h))
    cdf_k = torch.where(inner, _ndtr(ak), step(num_k))
    pdf_h = torch.exp(-0.5 * hc * hc) * _INV_SQRT_2PI
    pdf_k = torch.exp(-0.5 * kc * kc) * _INV_SQRT_2PI
    g_r = torch.where(inner, pdf_k * torch.exp(-0.5 * ak * ak) * _INV_SQRT_2PI / s, 0.0)
    return pdf_h * cdf_h, pdf_k * cdf_k, g_r


class _BVN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, k: Tensor, r: Tensor, rules: tuple[Rule, Rule, Rule]) -> Tensor:
        ctx.save_for_backward(h, k, r)
        shape = h.shape
        out = _forward(h.reshape(-1), k.reshape(-1), r.reshape(-1), rules)
        return out.reshape(shape)

    @staticmethod
    def backward(ctx, g: Tensor):
        h, k, r = ctx.saved_tensors
        gh, gk, gr = _grads(h, k, r)
        return g * gh, g * gk, g * gr, None


def bvn_cdf(
    h: Tensor | float,
    k: Tensor | float,
    rho: Tensor | float,
    nodes: Sequence[float] | None = None,
    weights: Sequence[float] | None = None,
    *,
    rules: Mapping[int, Rule] | None = None,
) -> Tensor:
    """Φ2(h, k; ρ) elementwise with broadcasting; differentiable in h, k and ρ.

    h, k, rho: tensors (or Python floats) of broadcastable shapes, float32 or float64 (mixed
    inputs promote); h, k may be ±inf, rho must lie in [−1, 1]. Returns a tensor of the
    broadcast shape with the promoted dtype on the inputs' device. ``nodes``/``weights`` (one
    full Gauss-Legendre rule on [−1, 1], 20 points recommended) or ``rules`` ({6: (x, w),
    12: (x, w), 20: (x, w)}) select the quadrature; see the module docstring.
    Raises TypeError for a dtype other than float32/float64.
    """
    tens = [v for v in (h, k, rho) if isinstance(v, Tensor)]
    if tens:
        dtype = functools.reduce(torch.promote_types, [v.dtype for v in tens])
        device = tens[0].device
    else:
        dtype, device = torch.get_default_dtype(), torch.device("cpu")
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(
            f"bvn_cdf: unsupported dtype {dtype}; expected torch.float32 or torch.float64"
        )
    hh, kk, rr = (torch.as_tensor(v, dtype=dtype, device=device) for v in (h, k, rho))
    hh, kk, rr = torch.broadcast_tensors(hh, kk, rr)
    return _BVN.apply(hh, kk, rr, _resolve_rules(nodes, weights, rules))
