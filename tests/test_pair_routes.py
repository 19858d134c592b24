"""The cheap routes of the ReLU covariance for deep |μ|/σ (issue #13: LeNet's units sit at
|μ|/σ up to 125) against mpmath: the underflow route (C rounds to 0), the linear route
(C = ρΦ(k) where unit 1 is on almost surely) and Mehler's series at |h|, |k| > 6.

The references are mpmath quadratures of the definition (``derivations``); the linear route's
neglected term is also checked directly against its stated bound."""

from __future__ import annotations

import math

import mpmath as mp
import numpy as np
import pytest
import torch
from nmgen.derivations.cross_covariance import relu_cross_covariance_ref
from nmgen.derivations.reference import to_float
from nmgen.generated import numpy_kernels as NK
from nmgen.generated import torch_kernels as TK

from nmruntime import pair_ops as po
from nmruntime import relu_pair as rp
from nmruntime.torch_support import force_sync_free

OPS = po.torch_ops()
EPS64 = 2.0**-52


def _cov(h: float, k: float, r: float, dtype=torch.float64) -> float:
    t = [torch.tensor([v], dtype=dtype) for v in (h, k, r)]
    return float(TK.relu_cross_covariance(t[0], t[1], 1.0, 1.0, t[2]))


def _ref(h: float, k: float, r: float) -> float:
    return to_float(relu_cross_covariance_ref(h, k, 1.0, 1.0, r))


def _masks(h, k, r, eps):
    h, k, r = (torch.tensor(v, dtype=torch.float64) for v in (h, k, r))
    under = rp._underflows(OPS, h, k, r, eps)
    lin = rp._linear_ok(OPS, h, k, r, eps) | rp._linear_ok(OPS, k, h, r, eps)
    return under, lin


# (h, k, ρ): LeNet-like stress points, one unit on almost surely
LINEAR_POINTS = [(12.0, -8.0, -0.5), (15.0, 3.0, 0.9)]  # more: the slow test below
# both units deep in their tails, |ρ|(h² + k²) small enough for the series
MEHLER_POINTS = [(-12.0, -13.0, 0.2), (9.0, -9.0, -0.05)]


@pytest.mark.parametrize("h, k, r", LINEAR_POINTS)
def test_linear_route_matches_mpmath(h, k, r):
    under, lin = _masks([h], [k], [r], EPS64)
    assert bool(lin) and not bool(under)
    want = _ref(h, k, r)
    for got in (_cov(h, k, r), float(NK.relu_cross_covariance(h, k, 1.0, 1.0, r))):
        assert abs(got - want) <= 1e-13 * abs(want), (got, want)


@pytest.mark.parametrize("h, k, r", MEHLER_POINTS)
def test_deep_mehler_route_matches_mpmath(h, k, r):
    t = [torch.tensor([v], dtype=torch.float64) for v in (h, k, r)]
    _, ok = rp._cov_mehler(OPS, *t, rp._FAST_RATIO[8], EPS64)
    under, lin = _masks([h], [k], [r], EPS64)
    assert bool(ok) and not bool(under | lin)
    want = _ref(h, k, r)
    # the intrinsic conditioning of C in h, k is ≈ (h² + k²)·eps relative
    assert abs(_cov(h, k, r) - want) <= 1e-12 * abs(want)


def test_linear_route_bound_holds_at_its_edge():
    """At points just inside the route (E ≈ 2 log(4/eps)), the neglected term
    C(h, k, ρ) − ρΦ(k) = C(−h, k, −ρ) = ∫_0^{−ρ} Φ2(−h, k; t) dt, by mpmath, is below eps/4
    of ρΦ(k) (the route's claim)."""
    eps = EPS64
    e_min = 2 * math.log(4 / eps)
    # k ≥ 0: E = h²; k < 0, ρ < 0: E = (h − r*|k|)²/(1 − r*²) (corner) or h² − k² (face)
    points = [(math.sqrt(e_min) + 1e-3, 0.5, -0.7), (10.0, -4.0, -0.4), (9.5, -3.7, -0.9)]
    mp.mp.dps = 40
    for h, k, r in points:
        _, lin = _masks([h], [k], [r], eps)
        assert bool(lin), (h, k, r)
        rs = max(-r, 0.0)
        # Φ2(−h, k; t) increases in t: the integral is at most |ρ| Φ2(−h, k; r*)
        phi2 = _bvn_mp(-h, k, rs)
        main = abs(r) * mp.ncdf(k)
        assert abs(r) * phi2 <= eps / 4 * main, (h, k, r)


def _bvn_mp(h: float, k: float, r: float) -> mp.mpf:
    """Φ2(h, k; r) = ∫_{−∞}^{k} φ(z) Φ((h − r z)/√(1 − r²)) dz by mpmath quadrature."""
    if r == 0:
        return mp.ncdf(h) * mp.ncdf(k)
    s = mp.sqrt(1 - mp.mpf(r) ** 2)
    f = lambda z: mp.npdf(z) * mp.ncdf((h - r * z) / s)  # noqa: E731
    zc = min(k, h / r if r > 0 else k)
    pts = sorted({-mp.inf, mp.mpf(k), mp.mpf(zc) - 1, mp.mpf(zc) - 10})
    pts = [p for p in pts if p <= k]
    return mp.quad(f, pts)


def test_underflow_route_is_below_half_the_smallest_subnormal():
    """Where the route returns 0 the exact |C| ≤ |ρ| Φ2(h, k; max(ρ, 0)) is below 2⁻¹⁰⁷⁵
    (float64) / 2⁻¹⁵⁰ (float32), by mpmath."""
    mp.mp.dps = 30
    cases = [
        ((-38.6, 5.0, 0.5), EPS64, mp.mpf(2) ** -1075),
        ((-30.0, -35.0, 0.2), EPS64, mp.mpf(2) ** -1075),
        ((-13.8, -12.3, 0.087), 2.0**-23, mp.mpf(2) ** -150),
    ]
    for (h, k, r), eps, half_sub in cases:
        under, _ = _masks([h], [k], [r], eps)
        assert bool(under), (h, k, r)
        bound = abs(r) * _bvn_mp(h, k, max(r, 0.0))
        assert bound < half_sub, (h, k, r, bound)
    assert _cov(-38.6, 5.0, 0.5) == 0.0
    assert _cov(-13.8, -12.3, 0.087, torch.float32) == 0.0


def test_routes_sync_free_agree_and_gradients_are_finite():
    """The masked (accelerator/compile) path gives the eager values on a mix of every
    route, and gradients in μ and σ are finite everywhere."""
    rng = np.random.default_rng(3)
    n = 3000
    h = torch.tensor(rng.uniform(-45, 45, n))
    k = torch.tensor(rng.uniform(-45, 45, n))
    r = torch.tensor(rng.uniform(-1, 1, n))
    eager = TK.relu_cross_covariance(h, k, 1.0, 1.0, r)
    with force_sync_free():
        masked = TK.relu_cross_covariance(h, k, 1.0, 1.0, r, validate=False)
    assert torch.equal(eager == 0, masked == 0)
    nz = eager != 0
    assert ((eager[nz] - masked[nz]).abs() <= 1e-13 * eager[nz].abs()).all()
    mu = h.clone().requires_grad_()
    s = torch.ones(n, dtype=torch.float64, requires_grad=True)
    TK.relu_cross_covariance(mu, k, s, 1.0, r).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(s.grad).all()


def test_routes_float32_match_float64():
    """float32 on LeNet-like deep points: within max(1e-5, 8·eps32·max(h², k²)) relative of
    float64 wherever the value is a normal float32 number (float64 is checked against mpmath
    above and in verify). The second term is the intrinsic conditioning: rounding the
    argument of e^{−k²/2} (or of erfc) to float32 alone moves the value by ≈ k²·eps32."""
    rng = np.random.default_rng(4)
    n = 20000
    h = rng.uniform(-16, 30, n)
    k = rng.uniform(-16, 30, n)
    r = rng.uniform(-0.9, 0.9, n)
    h32, k32, r32 = (torch.tensor(v, dtype=torch.float32) for v in (h, k, r))
    got = TK.relu_cross_covariance(h32, k32, 1.0, 1.0, r32).double()
    want = TK.relu_cross_covariance(h32.double(), k32.double(), 1.0, 1.0, r32.double())
    normal = want.abs() >= 1e-35
    rel = (got - want).abs() / want.abs().clamp_min(1e-300)
    assert normal.sum() > 1000
    bar = np.maximum(1e-5, 8 * 2.0**-23 * np.maximum(h, k) ** 2)
    bar = torch.tensor(np.maximum(bar, 8 * 2.0**-23 * np.minimum(h, k) ** 2))
    assert (rel[normal] <= bar[normal]).all(), float((rel / bar)[normal].max())


def test_underflow_test_does_not_cancel_near_rho_one():
    """float32, ρ = 1 − 2⁻²³, h ≈ k = −10: C ≈ 1.45e-25 (a normal float32) must not be
    routed to 0 by a rounded h² − 2ρhk + k² (the test uses (h − k)² + 2(1 − ρ)hk)."""
    h, k, r = (torch.tensor([v], dtype=torch.float32) for v in (-10.0, -10.0001, 1 - 2.0**-23))
    assert not bool(rp._underflows(OPS, h, k, r, 2.0**-23))
    got = float(TK.relu_cross_covariance(h, k, 1.0, 1.0, r))
    want = float(TK.relu_cross_covariance(h.double(), k.double(), 1.0, 1.0, r.double()))
    assert abs(got - want) <= 1e-5 * abs(want) and want > 1e-30


@pytest.mark.slow
def test_routes_on_random_deep_points_match_mpmath():
    """24 random points with |h| or |k| in (6, 38.5) taken by the one-on or Mehler route
    (float64): each within 1e-12 relative of the mpmath reference (nmgen verify's bar)."""
    rng = np.random.default_rng(11)
    n = 4000
    h = torch.tensor(rng.uniform(-38, 38, n))
    k = torch.tensor(rng.uniform(-38, 38, n))
    r = torch.tensor(rng.uniform(-0.8, 0.8, n))
    deep = (h.abs() > 6) | (k.abs() > 6)
    under, lin = _masks(h.tolist(), k.tolist(), r.tolist(), EPS64)
    _, mehler = rp._cov_mehler(OPS, h, k, r, rp._FAST_RATIO[8], EPS64)
    picks = []
    for mask in (deep & lin & ~under, deep & mehler & ~lin & ~under):
        idx = torch.nonzero(mask).squeeze(1)
        assert idx.numel() >= 12
        picks += idx[
            torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(0))[:12]
        ].tolist()
    for i in picks:
        hv, kv, rv = float(h[i]), float(k[i]), float(r[i])
        want = _ref(hv, kv, rv)
        if abs(want) < 1e-300:
            continue  # below float64's normal range: not held to the relative bar
        got = _cov(hv, kv, rv)
        assert abs(got - want) <= 1e-12 * abs(want), (hv, kv, rv, got, want)


def test_numpy_erfc_keeps_the_subnormal_range():
    """The NumPy backend's erfc (``_erfc_numpy``) is SciPy's up to x = 26 and erfcx(x)·e^{−x²}
    above, where SciPy's (Cephes) is 0 from x ≈ 26.55 on while the value is still a subnormal
    number: against mpmath within the rounding of x² in the exponent (2x²·eps relative, as
    SciPy's own erfc there) plus one subnormal spacing (2⁻¹⁰⁷⁴)."""
    import scipy.special as sc

    low = np.linspace(20.0, 26.0, 25)
    assert np.array_equal(po._erfc_numpy(low), sc.erfc(low))
    xs = np.linspace(26.0, 27.3, 131)
    got = po._erfc_numpy(xs)
    for x, g in zip(xs, got, strict=True):
        ref = float(mp.erfc(mp.mpf(float(x))))
        assert abs(g - ref) <= 2.0**-1074 + 2 * x * x * EPS64 * ref, (x, g, ref)
    assert got[-1] == 0.0 and got[xs < 27.2][-1] > 0.0 and sc.erfc(27.0) == 0.0


def test_few_quadrature_pairs_through_numpy_match_torch():
    """``_cov_std_few`` (few eager CPU elements: the quadrature through the NumPy backend, in
    float64) against the same algorithm through PyTorch (``_cov_std``) on held-out points:
    the quadrature's usual territory (ρ near −1 with h, k in [−8, 2]: what `nm bench floor`'s
    190 quadrature pairs look like) within 16 eps relative (measured 2.4), the deep tails
    (|h|, |k| up to 30, where both are tens to hundreds of eps from mpmath) within the
    design's 1e-12 (measured 110 eps); both against mpmath at four of the points. Float32
    inputs get the float64 value rounded: within 1 float32 eps of PyTorch's float64 path at
    the same inputs on every normal float32 value (measured 0.47; PyTorch's float32 path
    itself was up to 96 float32 eps off there)."""
    rng = np.random.default_rng(21)
    n = 200
    h = np.concatenate([rng.uniform(-8, 2, n // 2), rng.uniform(-30, 30, n // 2)])
    k = np.concatenate([rng.uniform(-8, 2, n // 2), rng.uniform(-30, 30, n // 2)])
    r = np.concatenate([rng.uniform(-0.999, -0.6, n // 2), rng.uniform(-1, 1, n // 2)])
    t = [torch.tensor(v, dtype=torch.float64) for v in (h, k, r)]
    rule = _pair_rule()
    few = rp._cov_std_few(OPS, *t, rule)
    ref = rp._cov_std(OPS, *t, rule)
    assert few.dtype == torch.float64
    rel = (few - ref).abs() / ref.abs()
    assert (ref.abs() >= 2.2250738585072014e-308).all()
    assert (rel[: n // 2] <= 16 * EPS64).all() and (rel <= 1e-12).all()
    for i in (0, 1, n // 2, n - 1):
        exact = _ref(h[i], k[i], r[i])
        assert abs(float(few[i]) - exact) <= 1e-12 * abs(exact), i
    t32 = [v.float() for v in t]
    few32 = rp._cov_std_few(OPS, *t32, tuple(v.float() for v in rule))
    ref32 = rp._cov_std(OPS, *(v.double() for v in t32), rule)
    normal = ref32.abs() >= torch.finfo(torch.float32).tiny
    assert few32.dtype == torch.float32 and normal.sum() > n // 2
    eps32 = torch.finfo(torch.float32).eps
    assert ((few32.double() - ref32).abs() <= eps32 * ref32.abs())[normal].all()


def _pair_rule() -> tuple[torch.Tensor, torch.Tensor]:
    """The pair quadrature's Gauss–Legendre rule (nodes, weights) in float64 tensors."""
    from nmgen.generated.gauss_legendre import PAIR_SIZE, RULES

    return tuple(torch.as_tensor(v, dtype=torch.float64) for v in RULES[PAIR_SIZE])


def test_general_routes_evaluate_the_closed_form_on_the_moderate_pairs_only(monkeypatch):
    """Eager CPU outside autograd: ``_cov_general`` hands the closed form only the pairs in its
    domain (|ρ| ≤ 0.99, −6 < h, k < 8; the joint tails of LeNet's layers are most of the rest),
    and each pair's value is the one it gets alone (no pair takes another's place)."""
    from nmgen.generated.gauss_legendre import PAIR_SIZE, RULES

    g = torch.Generator().manual_seed(3)
    n = 300
    h = torch.randn(n, generator=g, dtype=torch.float64) * 9 - 4
    k = torch.randn(n, generator=g, dtype=torch.float64) * 9 - 4
    r = torch.rand(n, generator=g, dtype=torch.float64) * 1.98 - 0.99
    moderate = (h > -6) & (k > -6) & (h < 8) & (k < 8)
    assert 50 < int(moderate.sum()) < n - 50
    sizes = []
    closed = rp._cov_closed

    def spy(o, h, *args):
        sizes.append(int(h.shape[0]))
        return closed(o, h, *args)

    monkeypatch.setattr(rp, "_cov_closed", spy)
    rule = tuple(torch.as_tensor(v, dtype=torch.float64) for v in RULES[PAIR_SIZE])
    args = (rule, TK._bvn_fast, rp._FAST_RATIO[8], EPS64)
    got = rp._cov_general(OPS, h, k, r, *args)
    assert sizes == [int(moderate.sum())]
    alone = torch.cat([rp._cov_general(OPS, h[i : i + 1], k[i : i + 1], r[i : i + 1], *args)
                       for i in range(n)])  # fmt: skip
    assert sizes[1:] == [1] * int(moderate.sum())
    rel = ((got - alone).abs() / alone.abs().clamp_min(1e-300)).max()
    assert float(rel) <= 4 * EPS64
    # and against mpmath (the definition's quadrature) on a few pairs of each kind
    picks = [*moderate.nonzero()[:3, 0].tolist(), *(~moderate).nonzero()[:3, 0].tolist()]
    for i in picks:
        want = _ref(float(h[i]), float(k[i]), float(r[i]))
        assert abs(float(got[i]) - want) <= 1e-12 * abs(want), (i, float(got[i]), want)
