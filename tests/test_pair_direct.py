"""The direct route of the exact pair covariance (``nmruntime.pair_direct._cov_direct``, issue #13).

C(h, k, ρ) = ρΦ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt by one fixed Gauss–Legendre rule per
|ρ| group, for |h|, |k| ≤ 7 and |ρ| < 0.925. Its rule sizes were chosen on a grid against a
96-point rule of the same integral; these tests check the values it *accepts* against mpmath on
held-out points: the covariance's definition (``relu_cross_covariance_ref``, slow: a few
points including the grid's worst corners) and mpmath quadrature of the swapped integral at 30
digits (many random points).
"""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from nmgen.derivations.cross_covariance import relu_cross_covariance_ref

from nmruntime import pair_direct as pd
from nmruntime import pair_ops as po
from nmruntime import torch_support

EPS = {torch.float64: 2.0**-52, torch.float32: 2.0**-23}
#: Relative bars (in eps of the dtype) for accepted values. Measured on 3,000 random points
#: before this test was written: 45 eps (float64, the exp of |G| ≈ 20 and the ρ < 0
#: difference), 21 eps (float32); the routes' acceptance bars are 256 and 32 eps.
BAR = {torch.float64: 64.0, torch.float32: 32.0}


def _swapped_ref(h: float, k: float, r: float) -> float:
    """C = ρΦ(h)Φ(k) + ∫_0^ρ (ρ − t) φ2(h, k; t) dt by mpmath at 30 digits."""
    with mp.workdps(30):
        h, k, r = mp.mpf(h), mp.mpf(k), mp.mpf(r)

        def f(t):
            q = (h * h - 2 * h * k * t + k * k) / (2 * (1 - t * t))
            return (r - t) * mp.exp(-q) / (2 * mp.pi * mp.sqrt(1 - t * t))

        val = r * mp.ncdf(h) * mp.ncdf(k) + mp.quad(f, mp.linspace(0, r, 5))
        return float(val)


def _high_points(n: int, lo: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out points with lo ≤ |ρ| < 0.99, both signs; the first four at the band's ends."""
    rng = np.random.default_rng(seed)
    h = rng.normal(0.0, 2.5, n).clip(-7, 7)
    k = rng.normal(0.0, 2.5, n).clip(-7, 7)
    r = rng.uniform(lo, 0.99, n) * np.resize([1.0, -1.0], n)
    r[:4] = [lo, -lo, 0.99 - 1e-9, -(0.99 - 1e-9)]
    return h, k, r


def _direct(h, k, r, dtype):
    t = [torch.tensor(v, dtype=dtype) for v in (h, k, r)]
    c, ok = pd._cov_direct(po.torch_ops(), *t, EPS[dtype])
    return c.double().numpy(), ok.numpy(), [v.double().numpy() for v in t]


def _points(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Held-out points (not the grid the sizes were chosen on): the bulk, the domain's corners
    and both ends of every |ρ| group."""
    rng = np.random.default_rng(seed)
    h = rng.normal(0.0, 2.5, n).clip(-7, 7)
    k = rng.normal(0.0, 2.5, n).clip(-7, 7)
    r = rng.uniform(-0.925, 0.925, n)
    ends = np.array([g[0] for g in pd._DIRECT_GROUPS])
    m = min(n // 4, 2 * len(ends))
    r[:m] = np.resize(np.concatenate([ends - 1e-9, -(ends - 1e-9)]), m)
    h[:m] = rng.choice([-7.0, -6.0, -5.5, 6.0, 6.9], m)
    k[:m] = rng.choice([-7.0, -6.0, -4.0, 5.9, 7.0], m)
    return h, k, r


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_accepted_values_match_mpmath_quadrature(dtype):
    h, k, r = _points(120, seed=2026)
    c, ok, (hd, kd, rd) = _direct(h, k, r, dtype)
    assert ok.mean() > 0.6  # the route takes the bulk of these points
    worst = []
    for i in np.nonzero(ok)[0]:
        ref = _swapped_ref(hd[i], kd[i], rd[i])
        worst.append((abs(c[i] - ref) / abs(ref) / EPS[dtype], hd[i], kd[i], rd[i]))
    worst.sort(reverse=True)
    assert worst[0][0] <= BAR[dtype], f"worst (rel/eps, h, k, rho): {worst[:3]}"


def _band_cost(counts, sizes, ends) -> float:
    """Σ over the bands [a, b) ending at ``ends`` of the fixed cost (where it has pairs) plus
    its pairs × the rule size of its last group: what ``_direct_bands`` minimises."""
    cost, a = 0.0, 0
    for b in ends:
        pairs = sum(counts[a:b])
        cost += (pd._DIRECT_GROUP_COST + pairs * sizes[b - 1]) if pairs else 0.0
        a = b
    return cost


def test_direct_bands_minimise_the_cost():
    """``_direct_bands`` against every partition of the groups into consecutive bands (2¹⁰,
    enumerated here): its cost is the least, for random pair counts from empty to p = 1024's
    and both columns of rule sizes. Large counts keep every group whose rule differs from its
    neighbours' apart (p = 1024's: at least 8 bands); p = 64's merge into one or two."""
    import itertools

    n = len(pd._DIRECT_GROUPS)
    rng = np.random.default_rng(7)
    for col in (1, 2):
        sizes = [g[col] for g in pd._DIRECT_GROUPS]
        cases = [[0] * n, [5] * n]
        cases += [list(rng.integers(0, 10 ** rng.uniform(1, 5.5), n)) for _ in range(40)]
        for counts in cases:
            ends = pd._direct_bands(counts, sizes)
            assert ends[-1] == n and ends == sorted(set(ends))
            least = min(
                _band_cost(counts, sizes, [*cut, n])
                for m in range(n)
                for cut in itertools.combinations(range(1, n), m)
            )
            assert _band_cost(counts, sizes, ends) == least, counts
    sizes = [g[1] for g in pd._DIRECT_GROUPS]
    apart = [b for b in range(1, n + 1) if b == n or sizes[b] != sizes[b - 1]]
    assert pd._direct_bands([10**6] * n, sizes) == apart  # only equal rules share a band
    p1024 = [214637, 131233, 57104, 50463, 21578, 18785, 14881, 10343, 2976, 1776, 3000]
    assert len(pd._direct_bands(p1024, sizes)) >= 8
    p64 = [393, 406, 237, 239, 222, 200, 89, 69, 84, 51, 17]
    assert len(pd._direct_bands(p64, sizes)) <= 2


def test_bands_either_way_match_mpmath(monkeypatch):
    """The eager route's values with every group apart (no fixed cost) and with all the
    groups in one band (the largest rule on every pair) both meet the bar against mpmath
    on held-out points, and differ (the merged band's rule is another)."""
    h, k, r = _points(60, seed=2031)
    got = {}
    for cost in (0, 10**12):
        monkeypatch.setattr(pd, "_DIRECT_GROUP_COST", cost)
        got[cost] = _direct(h, k, r, torch.float64)
    (c0, ok0, (hd, kd, rd)), (c1, ok1, _) = got[0], got[10**12]
    assert ok0.mean() > 0.6 and not np.array_equal(c0[ok0 & ok1], c1[ok0 & ok1])
    for i in np.nonzero(ok0 | ok1)[0]:
        ref = _swapped_ref(hd[i], kd[i], rd[i])
        for c, ok in ((c0, ok0), (c1, ok1)):
            if ok[i]:
                assert abs(c[i] - ref) <= BAR[torch.float64] * EPS[torch.float64] * abs(ref), i


def test_accepted_values_match_the_definition():
    """The covariance's definition (E[(x2⁺ − E x2⁺)(g(x2) − E x1⁺)], mpmath), independent of
    the swapped integral, at the corners where the rule sizes were tight and in the bulk."""
    pts = [(-5.9, -4.0, 0.8999), (-3.0, -3.0, 0.9249), (-4.0, -5.0, 0.84), (0.3, -1.2, -0.45)]
    h, k, r = (np.array(v) for v in zip(*pts, strict=True))
    c, ok, _ = _direct(h, k, r, torch.float64)
    for i in np.nonzero(ok)[0]:
        ref = float(relu_cross_covariance_ref(h[i], k[i], 1.0, 1.0, r[i], dps=30))
        assert abs(c[i] - ref) <= BAR[torch.float64] * EPS[torch.float64] * abs(ref), pts[i]
    assert ok.all()  # (at h = k = −6 the rounding test defers to the other routes)


def test_group_index_never_picks_a_smaller_rule():
    """The table on ⌊40|ρ|⌋ gives every |ρ| its own group or (within rounding of a bound)
    the next one: never fewer nodes than the grid search asked for."""
    bounds = np.array([g[0] for g in pd._DIRECT_GROUPS])
    ar = np.concatenate([bounds, np.nextafter(bounds, 0), np.nextafter(bounds, 1)])
    ar = np.concatenate([ar, np.linspace(0, 0.99, 1001)])
    got = pd._direct_group_index(torch.tensor(ar)).numpy()
    true = np.searchsorted(bounds, ar, side="right")
    assert (got >= true).all() and (got <= true + 1).all()
    assert (got[ar >= bounds[-1]] == len(bounds)).all()


def test_front_key_is_the_exact_group():
    """``direct_front``'s counted key (the compiled bulk's) is the group holding |ρ| exactly,
    and ``len(_DIRECT_GROUPS)`` outside the domain (|h| or |k| > 7, |ρ| ≥ 0.925, NaN)."""
    bounds = np.array([g[0] for g in pd._DIRECT_GROUPS])
    ar = np.concatenate([bounds, np.nextafter(bounds, 0), np.nextafter(bounds, 1)])
    ar = np.concatenate([ar, np.linspace(0, 0.99, 1001)])
    r = torch.tensor(ar * np.resize([1.0, -1.0], ar.size))
    h = torch.zeros_like(r)
    key, _ = pd.direct_front(h, h, r)
    assert key.dtype == torch.uint8
    assert np.array_equal(key.numpy(), np.searchsorted(bounds, ar, side="right"))
    nan = float("nan")
    h, k, r = (
        torch.tensor(v).double()
        for v in ([7.01, 0, nan, 0, 0], [0, -7.2, 0, 0, 0], [0.1, 0.2, 0.3, 0.95, nan])
    )
    key, _ = pd.direct_front(h, k, r)
    assert (key == len(bounds)).all()


def test_groups_below_is_the_key_comparison():
    """``direct_groups_below`` (the one pass's single comparison) is ``direct_front``'s key
    below ``top`` for every ``top`` it takes: at the bounds and next to them, in the domain's
    corners, outside it and at NaN."""
    bounds = np.array([g[0] for g in pd._DIRECT_GROUPS])
    ar = np.concatenate([bounds, np.nextafter(bounds, 0), np.nextafter(bounds, 1)])
    ar = np.concatenate([ar, np.linspace(0, 0.99, 201), [float("nan")]])
    hs = [0.0, 7.0, -7.0, np.nextafter(7.0, 8.0), float("nan")]
    r = torch.tensor(np.tile(ar * np.resize([1.0, -1.0], ar.size), len(hs) ** 2))
    h = torch.tensor(np.repeat(np.repeat(hs, len(hs)), ar.size))
    k = torch.tensor(np.repeat(np.tile(hs, len(hs)), ar.size))
    key, _ = pd.direct_front(h, k, r)
    for top in range(1, len(bounds)):
        assert torch.equal(pd.direct_groups_below(h, k, r, top), key < top), top


def test_outside_the_domain_nothing_is_accepted():
    """|h| or |k| > 7, |ρ| ≥ 0.99 (beyond the wide group 0.925 ≤ |ρ| < 0.99), NaN, ρ = −1."""
    h = torch.tensor([7.5, 0.0, 0.0, float("nan"), 0.2])
    k = torch.tensor([0.0, -7.5, 0.0, 0.0, 0.1])
    r = torch.tensor([0.5, 0.5, 0.995, 0.5, -1.0])
    _, ok = pd._cov_direct(po.torch_ops(), h.double(), k.double(), r.double(), EPS[torch.float64])
    assert not ok.any()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_unrolled_form_matches_the_eager_route_and_mpmath(dtype):
    """``_direct_unrolled`` (the form the compiled bulk compiles, here run eagerly) gives the
    eager route's values to a few eps (only the order of the node sum differs), the same
    acceptance, and matches mpmath on held-out points of every |ρ| group."""
    h, k, r = _points(240, seed=7)
    t = [torch.tensor(v, dtype=dtype) for v in (h, k, r)]
    eps = EPS[dtype]
    f64 = dtype == torch.float64
    po._torch_ops_cached()
    grp = pd._direct_group_index(t[2].abs()).long()
    checked = 0
    for g, (_, n64, n32) in enumerate(pd._DIRECT_GROUPS):
        sel = (grp == g) & (t[0].abs() <= pd._DIRECT_HK) & (t[1].abs() <= pd._DIRECT_HK)
        if not sel.any():
            continue
        hs, ks, rs = (v[sel] for v in t)
        y, wy = (tuple(float(v) for v in a) for a in pd._direct_rule(n64 if f64 else n32, h))
        c, ok = pd._direct_unrolled(hs, ks, rs, None, y, wy, eps, False)
        rule = pd._direct_rule(n64 if f64 else n32, hs)
        c_ref, ok_ref = pd._direct_accept(
            po.torch_ops(), hs, ks, rs, pd._direct_integral(hs, ks, rs, rule), eps
        )
        assert torch.equal(ok, ok_ref) or (ok != ok_ref).sum() <= 1  # a bound within rounding
        both = ok & ok_ref
        assert ((c - c_ref).abs() <= 4 * eps * c_ref.abs())[both].all()
        for i in torch.nonzero(ok).squeeze(1)[:3].tolist():  # mpmath: a few per group
            ref = _swapped_ref(float(hs[i]), float(ks[i]), float(rs[i]))
            assert abs(float(c[i]) - ref) <= BAR[dtype] * eps * abs(ref), (g, i)
            checked += 1
    assert checked >= 20


def test_s_form_matches_the_t_form_and_mpmath():
    """The rule in s (``_direct_s_integral``; ``_direct_s_unrolled``, the form the compiled
    passes after the first compile, here run eagerly) on held-out points with
    0.7 ≤ |ρ| < 0.99: the two s forms agree to a few eps, the s-rules of ``DIRECT_S_GROUPS``
    and ``DIRECT_S_WIDE`` points give the t-rules' J (32 and 80 points) within the 50-eps bar
    of C where the rounding test accepts, and accepted values match mpmath (the swapped
    integral for ρ > 0, the covariance's definition for ρ < 0, where the two terms may
    cancel)."""
    h, k, r = _high_points(400, 0.7, seed=61)
    h[:4], k[:4] = [-7.0, 7.0, -6.5, 5.0], [-7.0, -6.0, 6.0, -7.0]
    eps = EPS[torch.float64]
    o = po.numpy_ops()
    po._torch_ops_cached()
    checked = 0
    for n_s, n_t, top in ((pd.DIRECT_S_GROUPS, 32, 0.925), (pd.DIRECT_S_WIDE, 80, 0.99)):
        sel = np.abs(r) < top
        hs, ks, rs = h[sel], k[sel], r[sel]
        j_s = pd._direct_s_integral(hs, ks, rs, pd._direct_rule(n_s, np.zeros(0)))
        j_t = pd._direct_integral(hs, ks, rs, pd._direct_rule(n_t, np.zeros(0)))
        c, ok = pd._direct_accept(o, hs, ks, rs, j_s, eps)
        assert ok.mean() > 0.6
        assert (np.abs(j_s - j_t)[ok] <= 50.0 * eps * np.abs(c[ok])).all()
        t = [torch.tensor(v) for v in (hs, ks, rs)]
        y, wy = (tuple(float(v) for v in a) for a in pd._direct_rule(n_s, np.zeros(0)))
        cu, oku = pd._direct_s_unrolled(*t, None, y, wy, eps, False)
        jm = pd._direct_s_integral(*t, pd._direct_rule(n_s, t[0]))  # the same base: torch's
        cm, okm = pd._direct_accept(po.torch_ops(), *t, jm, eps)
        assert torch.equal(oku, okm) or (oku != okm).sum() <= 1  # a bound within rounding
        assert ((cu - cm).abs() <= 8 * eps * cm.abs())[oku & okm].all()
        both = oku.numpy() & ok
        for i in np.flatnonzero(both)[:6]:
            if rs[i] > 0:
                ref = _swapped_ref(hs[i], ks[i], rs[i])
            else:
                ref = float(relu_cross_covariance_ref(hs[i], ks[i], 1.0, 1.0, rs[i], dps=30))
            assert abs(c[i] - ref) <= BAR[torch.float64] * eps * abs(ref), (n_s, i)
            checked += 1
    assert checked == 12


def test_compiled_rule_matches_the_eager_route():
    """One rule size compiled (``torch.compile``, fullgraph, dynamic pair count) as the
    compiled bulk runs it: the eager route's values to a few eps on held-out points of its
    |ρ| group, two pair counts (no recompile), and mpmath on a few."""
    from nmruntime.torch_support import compiled_bulk

    rng = np.random.default_rng(11)
    eps = EPS[torch.float64]
    hi, n64, _ = pd._DIRECT_GROUPS[0]
    with compiled_bulk():
        fn = pd._direct_compiled(torch.zeros(1, dtype=torch.float64), n64, eps, False, False)
        assert fn is not None
        for n in (300, 1000):
            h = torch.tensor(rng.normal(0, 2, n).clip(-6, 6))
            k = torch.tensor(rng.normal(0, 2, n).clip(-6, 6))
            r = torch.tensor(rng.uniform(-hi, hi, n))
            c, ok = fn(h, k, r)
            rule = pd._direct_rule(n64, h)
            c_ref, ok_ref = pd._direct_accept(
                po.torch_ops(), h, k, r, pd._direct_integral(h, k, r, rule), eps
            )
            both = ok & ok_ref
            assert both.sum() >= 0.9 * ok_ref.sum() and (ok != ok_ref).sum() <= 2
            assert ((c - c_ref).abs() <= 4 * eps * c_ref.abs())[both].all()
    for i in torch.nonzero(ok).squeeze(1)[:4].tolist():
        ref = _swapped_ref(float(h[i]), float(k[i]), float(r[i]))
        assert abs(float(c[i]) - ref) <= BAR[torch.float64] * eps * abs(ref)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_moments_compiled_matches_eager(dtype):
    """``relu_moments(..., compiled=True)`` (the fused front, the direct route's compiled
    groups, the compiled closed form and Mehler blocks) on held-out problems: the eager
    covariance to a few eps relative (measured 2.0e-15 float64, 4.6e-7 float32 on
    ``nm bench floor``'s p = 1024 problem), the diagonal to 32 eps."""
    from torchbridge.experiments.bench_kernels import random_problem
    from torchbridge.moments import relu_moments

    eps = EPS[dtype]
    for seed in (5, 6):
        mean, cov = random_problem(300, seed)
        mean, cov = mean.to(dtype), cov.to(dtype)
        ref = relu_moments(mean, cov, "exact", check_psd=False)[1]
        got = relu_moments(mean, cov, "exact", check_psd=False, compiled=True)[1]
        tiny = torch.finfo(dtype).tiny
        assert ((got - ref).abs() <= 16 * eps * ref.abs() + tiny).all()
        # the ReLU variances: the compiled kernel (session 40) is up to 22 eps from the eager
        # one near h = −2 (both within 73 eps of mpmath, README)
        diag, ref_diag = got.diagonal(), ref.diagonal()
        assert ((diag - ref_diag).abs() <= 32 * eps * ref_diag.abs()).all()


def test_float64_wide_group_matches_mpmath():
    """float64 pairs with 0.925 ≤ |ρ| < 0.99 (``_DIRECT_WIDE64``'s group, after the groups; by
    the rule in s of ``DIRECT_S_WIDE`` points): accepted values within ``BAR`` of mpmath on
    held-out points, both signs of ρ (the rounding test defers the rest to the other
    routes)."""
    h, k, r = _high_points(40, 0.925, seed=47)
    c, ok, (hd, kd, rd) = _direct(h, k, r, torch.float64)
    assert ok.mean() > 0.6 and ok[rd > 0].sum() >= 10 and ok[rd < 0].sum() >= 8
    for i in np.nonzero(ok)[0]:
        if rd[i] > 0:
            ref = _swapped_ref(hd[i], kd[i], rd[i])
        else:  # ρΦ(h)Φ(k) + J may cancel: the covariance's definition, not the swapped form
            ref = float(relu_cross_covariance_ref(hd[i], kd[i], 1.0, 1.0, rd[i], dps=30))
        assert abs(c[i] - ref) <= BAR[torch.float64] * EPS[torch.float64] * abs(ref), i
    assert not _direct([0.0], [0.0], [0.9901], torch.float64)[1].any()  # beyond the group


def _neg_tail_ref(h: float, k: float, r: float) -> float:
    """C = −(|ρ|∫_{−1}^ρ φ2 dt + ∫_ρ^0 |t| φ2 dt) for ρ < 0, h + k ≤ 0 by mpmath's adaptive
    quadrature at 40 digits (positive integrands: at h = k = −7, ρ = −0.5 the swapped form's
    ρΦ(h)Φ(k) + J lost 233 eps at 30 digits, this form agrees with the definition)."""
    with mp.workdps(40):
        h, k, r = mp.mpf(h), mp.mpf(k), mp.mpf(r)

        def phi2(t):
            q = (h * h - 2 * h * k * t + k * k) / (2 * (1 - t * t))
            return mp.exp(-q) / (2 * mp.pi * mp.sqrt(1 - t * t))

        p = mp.quad(phi2, [-1, (r - 1) / 2, r])
        q = mp.quad(lambda t: -t * phi2(t), mp.linspace(r, 0, 4))
        return float(-(abs(r) * p + q))


def _neg_tail(h, k, r):
    t = [torch.tensor(np.asarray(v, dtype=np.float64)) for v in (h, k, r)]
    c, ok = pd.cov_neg_tail(*t, EPS[torch.float64])
    return c.numpy(), ok.numpy()


def test_neg_tail_route_matches_mpmath():
    """The ρ < 0 tail route (``cov_neg_tail``: C = −(|ρ|Φ2 + ∫_ρ^0 |t| φ2), no cancellation)
    on held-out points of its domain, both units mostly off or of opposite signs, the
    domain's edges (B → 8(1 + ρ), ρ → −0.99, h = k = −7, |ρ| across 0.925): within ``BAR`` of
    mpmath's adaptive quadrature of the same two integrals; a few also against the
    covariance's definition (which checks the integration by parts). These are
    the pairs whose ρΦ(h)Φ(k) + J cancels beyond the direct route's rounding test."""
    rng = np.random.default_rng(53)
    n = 400
    h, k = rng.uniform(-7.0, 3.0, n), rng.uniform(-7.0, 0.0, n)
    r = -rng.uniform(0.02, 0.99, n)
    keep = pd._neg_tail_domain(*(torch.tensor(v) for v in (h, k, r))).numpy()
    h, k, r = h[keep][:60], k[keep][:60], r[keep][:60]
    # corners, ρ → −0.99, B/S = 16, ρ → 0, both sides of |ρ| = 0.925 (Q's 32- and 80-point
    # rules), mixed signs, and B/S → 8 (h = k = −1, ρ → −0.875)
    edge_h = [-7.0, -7.0, -2.0, -3.0, -3.5, -3.5, 1.0, -0.5, -1.0]
    edge_k = [-7.0, -6.5, -2.0, -3.0, -3.5, -3.5, -7.0, -4.0, -1.0]
    edge_r = [-0.5, -0.989, -0.75, -0.05, -0.9249, -0.9251, -0.3, -0.93, -0.8751]
    h, k, r = (np.concatenate([a, b]) for a, b in ((h, edge_h), (k, edge_k), (r, edge_r)))
    assert (h * k < 0).sum() >= 5 and (r < -0.925).sum() >= 5
    c, ok = _neg_tail(h, k, r)
    assert ok.all()
    assert (c < 0).all()
    eps = EPS[torch.float64]
    refs = [_neg_tail_ref(h[i], k[i], r[i]) for i in range(h.size)]
    worst = max(abs(c[i] - ref) / abs(ref) for i, ref in enumerate(refs))
    assert worst <= BAR[torch.float64] * eps, worst / eps
    for i in (0, 1, 2, h.size - 9, h.size - 3):  # the definition (h = k = −7 among them)
        ref = float(relu_cross_covariance_ref(h[i], k[i], 1.0, 1.0, r[i], dps=30))
        assert abs(c[i] - ref) <= BAR[torch.float64] * eps * abs(ref), i
    # outside: ρ ≥ 0, h + k > 0, B < 8(1 + ρ), ρ ≤ −0.99
    c, ok = _neg_tail([-2.0, 1.0, -0.5, -3.0], [-2.0, 0.5, -0.5, -3.0], [0.3, -0.5, -0.5, -0.995])
    assert not ok.any() and (c == 0).all()


def test_float32_cancelling_pairs_evaluated_in_float64_match_mpmath():
    """float32 pairs whose ρΦ(h)Φ(k) + J cancels (ρ < 0, h, k < 0) are evaluated again in
    float64 arithmetic (``wide``): with float64's rule sizes their accepted values are within
    rounding of the truth (measured ≤ 1.2 float32 eps on these points); the float32 sizes
    gave 30.7 float32 eps at h = k = −6, ρ = −0.4999 (quadrature error magnified by the
    cancellation, up to 2¹⁶). Also the float32 group 0.925 ≤ |ρ| < 0.99 (``_DIRECT_WIDE32``)."""
    rng = np.random.default_rng(31)
    n = 80
    h = rng.uniform(-6.0, -1.0, n)
    k = rng.uniform(-6.0, -1.0, n)
    r = -rng.uniform(0.2, 0.92, n)
    r[:16] = rng.uniform(0.925, 0.99, 16) * np.resize([1.0, -1.0], 16)  # float32 high group
    # the domain's corner, where the float32 sizes' error peaked (h = k = −6, ρ → −0.5)
    h[16:24] = [-6.0, -6.0, -5.9, -6.0, -5.7, -6.0, -5.95, -5.8]
    k[16:24] = [-6.0, -5.8, -6.0, -5.6, -6.0, -6.0, -5.9, -5.8]
    r[16:24] = [-0.4999, -0.47, -0.45, -0.49, -0.42, -0.38, -0.3, -0.44]
    c, ok, (hd, kd, rd) = _direct(h, k, r, torch.float32)
    assert ok.mean() > 0.8
    cancelling = 0
    worst = []
    for i in np.nonzero(ok)[0]:
        ref = _swapped_ref(hd[i], kd[i], rd[i])
        base = abs(rd[i]) * float(mp.ncdf(hd[i]) * mp.ncdf(kd[i]))
        cancelling += base > 8 * abs(ref)
        worst.append((abs(c[i] - ref) / abs(ref) / EPS[torch.float32], hd[i], kd[i], rd[i]))
    worst.sort(reverse=True)
    assert cancelling >= 20  # the float64 re-evaluation is exercised
    assert worst[0][0] <= 2.0, f"worst (rel/eps, h, k, rho): {worst[:3]}"


def _rule_errors(h, k, rho_values, n, eps, wide=False, form="t"):
    """Max over ``rho_values`` of the n-point rule's quadrature error relative to |C| (in
    ``eps``) on the elements the route's rounding test (``_direct_accept`` for the target
    ``eps``, ``wide`` or not) accepts, against NumPy's 512-point rule of the same integral
    (float64, in t). It checks the rule sizes; the integral itself is checked against mpmath
    above. ``form``: "t" (``_direct_integral``) or "s" (``_direct_s_integral``: the rule in s,
    against the same reference in t)."""
    x, w = np.polynomial.legendre.leggauss(512)  # NumPy's nodes, not the generated rules
    big = (0.5 * (1.0 + x), w * (1.0 - 0.5 * (1.0 + x)))
    o = po.numpy_ops()
    worst = 0.0
    for r0 in rho_values:
        r = np.full_like(h, r0)
        jref = pd._direct_integral(h, k, r, big)
        c, ok = pd._direct_accept(o, h, k, r, jref, eps, wide)
        if ok.any():
            rule = pd._direct_rule(n, np.zeros(0))
            j = (pd._direct_s_integral if form == "s" else pd._direct_integral)(h, k, r, rule)
            worst = max(worst, float((np.abs(j - jref)[ok] / np.abs(c[ok])).max() / eps))
    return worst


@pytest.mark.slow
def test_rule_sizes_hold_on_the_extended_domain():
    """The sizes chosen on [−6, 6]² hold on the ring 6 < max(|h|, |k|) ≤ 7 (``_DIRECT_HK``),
    each for its use: float64 (32-eps rounding test) within 50 eps of C, float32 (8-eps test)
    and float32's float64 re-evaluation with float64's sizes (2¹⁶) within 0.01 float32 eps;
    and ``_DIRECT_WIDE32``'s rule on every |ρ| < 0.99 over [−7, 7]² within 0.01 float32 eps
    (session 21 measured 38 eps, 0.0074, 6.7e-4 and 0.0024 on a finer grid; 5e-5 below
    0.925)."""
    g = np.arange(-7.0, 7.0001, 0.25)
    hh, kk = (v.ravel() for v in np.meshgrid(g, g, indexing="ij"))
    ring = np.maximum(np.abs(hh), np.abs(kk)) > 6.0
    e64, e32 = 2.0**-52, 2.0**-23
    lo = 0.0
    for hi, n64, n32 in pd._DIRECT_GROUPS:
        rhos = [s * v for s in (1, -1) for v in np.linspace(max(lo, 1e-3), hi - 1e-12, 6)]
        assert _rule_errors(hh[ring], kk[ring], rhos, n64, e64) <= 50.0, hi
        assert _rule_errors(hh[ring], kk[ring], rhos, n32, e32) <= 0.01, hi
        assert _rule_errors(hh[ring], kk[ring], rhos, n64, e32, wide=True) <= 0.01, hi
        lo = hi
    top, n = pd._DIRECT_WIDE32  # its range, and the groups' (the masked path uses it there)
    rhos = [s * v for s in (1, -1) for v in np.linspace(1e-3, top - 1e-12, 16)]
    assert _rule_errors(hh, kk, rhos, n, e32, wide=True) <= 0.01
    top, n = pd._DIRECT_WIDE64  # float64's group 0.925 ≤ |ρ| < 0.99 (session 22: 38.6 eps)
    rhos = [s * v for s in (1, -1) for v in np.linspace(pd._DIRECT_GROUPS[-1][0], top - 1e-12, 12)]
    assert _rule_errors(hh, kk, rhos, n, e64) <= 50.0


@pytest.mark.slow
def test_larger_rules_hold_on_every_group():
    """Every group with the rule of any group after it in its column (``_direct_bands``
    evaluates a band of groups by its last group's rule): float64 within 50 eps of C,
    float32 and float32's float64 re-evaluation within 0.01 float32 eps, on the elements each
    rounding test accepts, over [−7, 7]² (step 0.5) at 6 ρ per group and sign."""
    g = np.arange(-7.0, 7.0001, 0.5)
    hh, kk = (v.ravel() for v in np.meshgrid(g, g, indexing="ij"))
    e64, e32 = 2.0**-52, 2.0**-23
    lo = 0.0
    for i, (hi, _, _) in enumerate(pd._DIRECT_GROUPS):
        rhos = [s * v for s in (1, -1) for v in np.linspace(max(lo, 1e-3), hi - 1e-12, 6)]
        later = pd._DIRECT_GROUPS[i + 1 :]
        for n in sorted({g[1] for g in later}):
            assert _rule_errors(hh, kk, rhos, n, e64) <= 50.0, (hi, n)
            assert _rule_errors(hh, kk, rhos, n, e32, wide=True) <= 0.01, (hi, n)
        for n in sorted({g[2] for g in later}):
            assert _rule_errors(hh, kk, rhos, n, e32) <= 0.01, (hi, n)
        lo = hi


@pytest.mark.slow
def test_one_pass_rule_holds_on_the_groups_it_covers():
    """The rules of the compiled bulk's passes in pair order (``direct_passes``) on every |ρ|
    group each keeps, over its domain (the bars of
    ``test_rule_sizes_hold_on_the_extended_domain``; float32's one pass within a quarter
    float32 eps): ``DIRECT_ONE_PASS`` on |h|, |k| ≤ ``DIRECT_ONE_PASS_HK`` (float64: 14 points
    on [−4, 4]², session 42 measured ≤ 49.9 eps; session 37, float32: ≤ 0.19 float32 eps with
    15 points on |ρ| < 0.925 over [−7, 7]²), and float64's second pass (``DIRECT_S_GROUPS``
    points in s) on every group, |ρ| < 0.925, over [−7, 7]²: it also takes the one pass's
    groups beyond that bound (there checked on the ring beyond it: inside, every rule from
    20 points in s to 32 in t is at the rounding floor, 48–52 eps at 0.5 ≤ |ρ| < 0.6); and
    the wide pass's rule in s (``DIRECT_S_WIDE``) on float64's
    0.925 ≤ |ρ| < 0.99 and, for float32 in float64 arithmetic, on every |ρ| < 0.99. The
    s-rules are checked against the 512-point rule in t. Each rule with fewer points fails
    its bar: float64's one pass with 13 points (371 eps on [−4, 4]²) or on [−7, 7]² (3,620
    eps), the second pass with 20 points (903 eps), the wide one with 28."""
    g = np.arange(-7.0, 7.0001, 0.25)
    hh, kk = (v.ravel() for v in np.meshgrid(g, g, indexing="ij"))
    rules = [(f64, 0, *pd.DIRECT_ONE_PASS[f64], "t") for f64 in (True, False)]
    rules.append((True, 0, pd.DIRECT_GROUPS_PASS[0], pd.DIRECT_S_GROUPS, "s"))
    for f64, first, top, n, form in rules:
        bar, eps = (50.0, 2.0**-52) if f64 else (0.25, 2.0**-23)
        lo = pd._DIRECT_GROUPS[first - 1][0] if first else 0.0
        for i, (hi, _, _) in enumerate(pd._DIRECT_GROUPS[first:top], first):
            hk = pd.DIRECT_ONE_PASS_HK[f64]
            inside = (np.abs(hh) <= hk) & (np.abs(kk) <= hk)
            if form == "s" and i < pd.DIRECT_ONE_PASS[f64][0]:
                inside = ~inside  # the one pass's groups: the second pass takes the rest
            elif form == "s":
                inside = np.ones_like(inside)
            rhos = [s * v for s in (1, -1) for v in np.linspace(max(lo, 1e-3), hi - 1e-12, 6)]
            err = _rule_errors(hh[inside], kk[inside], rhos, n, eps, form=form)
            assert err <= bar, (f64, n, hi)
            lo = hi
    n, lo, top = pd.DIRECT_S_WIDE, pd._DIRECT_GROUPS[-1][0], pd._DIRECT_WIDE64[0]
    rhos = [s * v for s in (1, -1) for v in np.linspace(lo, top - 1e-12, 12)]
    assert _rule_errors(hh, kk, rhos, n, 2.0**-52, form="s") <= 50.0
    rhos = [s * v for s in (1, -1) for v in np.linspace(1e-3, top - 1e-12, 16)]
    assert _rule_errors(hh, kk, rhos, n, 2.0**-23, wide=True, form="s") <= 0.01


def test_one_pass_keeps_only_its_domain():
    """The float64 one pass keeps (``DirectPass.keep``) only pairs with |ρ| below its groups'
    bound and |h|, |k| ≤ ``DIRECT_ONE_PASS_HK``; the second pass keeps those it leaves with
    |ρ| < 0.7 (every |ρ| < 0.925 with |h|, |k| ≤ 7; ρ = 0.7 is in its groups); float32's one
    pass keeps |h|, |k| up to 7."""
    one, second = pd.direct_passes(True)[:2]
    hk = pd.DIRECT_ONE_PASS_HK[True]
    top = pd._DIRECT_GROUPS[pd.DIRECT_ONE_PASS[True][0] - 1][0]
    h = torch.tensor([0.0, hk, -hk, np.nextafter(hk, 9.0), 0.0, 6.9, 0.0], dtype=torch.float64)
    k = torch.tensor([0.0, 1.0, -hk, 0.0, -np.nextafter(hk, 9.0), 0.0, 0.0], dtype=torch.float64)
    r = torch.tensor([0.3, -0.6, 0.69, 0.3, -0.3, 0.5, top], dtype=torch.float64)
    assert one.keep(h, k, r).tolist() == [True, True, True, False, False, False, False]
    assert second.keep(h, k, r).tolist() == [True] * 7
    beyond = torch.tensor([7.5, 0.0], dtype=torch.float64), torch.tensor([0.0, 0.0]).double()
    assert second.keep(*beyond, torch.tensor([0.3, 0.925]).double()).tolist() == [False] * 2
    one32 = pd.direct_passes(False)[0]
    assert one32.keep(h.float(), k.float(), r.float()).tolist() == [True] * 7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_moments_one_pass_matches_mpmath(dtype):
    """``relu_moments(..., compiled=True)`` on one unbatched problem takes the one pass
    (``torchbridge.moments._one_pass_bulk``; float32 also its second pass in float64): its
    entries against mpmath (``_swapped_ref`` scaled by σiσj) on pairs the first pass keeps
    and on pairs it leaves; the same values when the pairs come in several blocks
    (``chunk``); exactly symmetric."""
    from torchbridge.experiments.bench_kernels import random_problem
    from torchbridge.moments import relu_moments

    p = 96
    mean, cov = random_problem(p, 11)
    mean, cov = mean.to(dtype), cov.to(dtype)
    got = relu_moments(mean, cov, "exact", check_psd=False, compiled=True)[1]
    ran = [
        k
        for k, v in torch_support._COMPILED.items()
        if isinstance(v, torch_support._Graphs) and v.runs
    ]
    assert any(name.startswith("graph:one_pass") for name in ran)  # it ran
    if dtype == torch.float32:  # and float32's second pass, in float64 arithmetic
        assert any(name.startswith("graph:wide_pass") for name in ran)
    blocks = relu_moments(mean, cov, "exact", check_psd=False, compiled=True, chunk=16 * p)[1]
    assert torch.equal(got, blocks) and torch.equal(got, got.T)
    m, c = mean.double(), cov.double()
    s = c.diagonal().sqrt()
    rho = c / (s[:, None] * s[None, :])
    top = pd._DIRECT_GROUPS[pd.DIRECT_ONE_PASS[dtype == torch.float64][0] - 1][0]
    rng = np.random.default_rng(12)
    iu = np.array(np.triu_indices(p, 1))
    kept = np.abs(rho.numpy()[iu[0], iu[1]]) < top
    assert kept.mean() > 0.5 and (~kept).sum() >= 12  # 12 picked from each
    picks = [rng.choice(np.flatnonzero(sel), 12, replace=False) for sel in (kept, ~kept)]
    eps = EPS[dtype]
    for q in np.concatenate(picks):
        i, j = iu[:, q]
        h, k = float(m[i] / s[i]), float(m[j] / s[j])
        ref = float(s[i] * s[j]) * _swapped_ref(h, k, float(rho[i, j]))
        assert abs(float(got[i, j]) - ref) <= BAR[dtype] * eps * abs(ref), (i, j)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_relu_moments_passes_leave_the_rest_to_the_other_routes(dtype, monkeypatch):
    """The pairs the direct route's passes leave: the ρ < 0 tail route's pass
    (``neg_tail_pass``) on the cancelling ones, the general path (``_pair_covariances``) on
    the others (here |μ/σ| > 7 and a duplicated variable, ρ = 1). Each route is taken (the tail
    route in float64: float32's wide pass in float64 arithmetic accepts these pairs); its
    entries match mpmath, the matrix is exactly symmetric, the duplicate's covariance is its
    variance, one block or several give the same matrix."""
    from torchbridge import moments
    from torchbridge.experiments.bench_kernels import random_problem

    p = 64
    mean, cov = random_problem(p, 5)
    cov[0], cov[:, 0] = cov[1], cov[:, 1]  # variable 0 duplicates variable 1: ρ = 1
    cov[0, 0] = cov[1, 1]
    mean[0] = mean[1]
    sd = cov.diagonal().sqrt()
    mean[2] = 8.5 * sd[2]  # outside the direct route's |h| ≤ 7
    mean[3:24] = -3.0 * sd[3:24]  # both units mostly off: ρ < 0 pairs cancel
    mean, cov = mean.to(dtype), cov.to(dtype)
    seen = {"tail": [], "general": []}

    def general(*args):
        seen["general"].append(torch.stack(args[6:8], 1))
        return pair_covariances(*args)

    def recorded(like):  # the tail pass records the pairs it takes
        runs = pass_kernels(like)
        names = [rule.name for rule in pd.direct_passes(like.dtype == torch.float64)]
        assert names[-1] == "neg_tail_pass" and len(runs.pairs) == len(names)

        def tail(up, li, lj, *args):
            left = runs.pairs[-1](up, li, lj, *args)
            seen["tail"].append(torch.stack([li[left == 0], lj[left == 0]], 1))
            return left

        return runs._replace(pairs=[*runs.pairs[:-1], tail])

    pair_covariances, pass_kernels = moments._pair_covariances, moments._pass_kernels
    monkeypatch.setattr(moments, "_pass_kernels", recorded)
    monkeypatch.setattr(moments, "_pair_covariances", general)
    got = moments.relu_moments(mean, cov, check_psd=False, compiled=True)[1]
    blocks = moments.relu_moments(mean, cov, check_psd=False, compiled=True, chunk=8 * p)[1]
    assert torch.equal(got, blocks) and torch.equal(got, got.T)
    assert got[0, 1] == got[1, 1]  # the duplicate
    m, c = mean.double(), cov.double()
    s = c.diagonal().sqrt()
    rng = np.random.default_rng(3)
    for name in ("tail", "general") if dtype == torch.float64 else ("general",):
        pairs = torch.cat(seen[name][:1]).numpy()
        # strict pairs (the general path gets the diagonal too), not the duplicate
        pairs = pairs[pairs[:, 0] != pairs[:, 1]]
        pairs = pairs[(pairs[:, 0] > 1) | (pairs[:, 1] > 1)]
        assert len(pairs) >= 8, name
        for i, j in pairs[rng.choice(len(pairs), 8, replace=False)]:
            h, k = float(m[i] / s[i]), float(m[j] / s[j])
            ref = float(s[i] * s[j]) * _swapped_ref(h, k, float(c[i, j] / (s[i] * s[j])))
            assert abs(float(got[i, j]) - ref) <= BAR[dtype] * EPS[dtype] * abs(ref), (name, i, j)


def test_compiled_bulk_failing_mid_call_falls_back_to_eager(monkeypatch):
    """A compile that fails once a call has started (dynamo's recompile limit, say) turns the
    compiled bulk off for the process; the rest of that call then runs eagerly, the eager
    call's values to a few eps relative, entry by entry (measured 4.3 eps; before: the next
    |ρ| group's kernel was None, TypeError).
    Simulated on the general path (a batch of two problems) by a failing compile of the
    direct route's front."""
    from torchbridge.experiments.bench_kernels import random_problem
    from torchbridge.moments import relu_moments

    real = torch_support.compiled
    monkeypatch.setattr(torch_support, "_COMPILE_FAILED", [None])

    def failing(*args):
        raise RuntimeError("simulated compile failure")

    def flaky(x, name, fn, *args, **kwargs):  # where the compiled bulk applies
        run = real(x, name, fn, *args, **kwargs)
        if run is not None and name.startswith("front"):
            return torch_support._eager_on_failure(failing, fn)
        return run

    monkeypatch.setattr(torch_support, "compiled", flaky)
    mean, cov = random_problem(40, 6)
    batch = torch.stack([mean, mean - 0.5])
    with pytest.warns(RuntimeWarning, match="compiled bulk is off"):
        got = relu_moments(batch, cov, check_psd=False, compiled=True)[1]
    assert isinstance(torch_support._COMPILE_FAILED[0], RuntimeError)
    monkeypatch.setattr(torch_support, "compiled", real)
    monkeypatch.setattr(torch_support, "_COMPILE_FAILED", [None])
    want = relu_moments(batch, cov, check_psd=False)[1]
    assert bool(((got - want).abs() <= 16 * EPS[torch.float64] * want.abs()).all())
