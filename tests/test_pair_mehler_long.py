"""The long Mehler pass (issue #13: eager CPU, 401 terms, |ρ| ≤ 0.95, Cramér's tail bound) and
the opt-in compiled bulk (``nmruntime.torch_support.compiled_bulk``) against independent
references: mpmath for the values, mpmath's Hermite polynomials for Cramér's constant."""

from __future__ import annotations

import mpmath as mp
import numpy as np
import pytest
import torch
from nmgen.derivations.cross_covariance import relu_cross_covariance_ref
from nmgen.derivations.reference import to_float
from nmgen.generated import torch_kernels as TK

from nmruntime import pair_ops as po
from nmruntime import relu_pair as rp
from nmruntime.torch_support import compiled_bulk

EPS = 2.0**-52


def test_cramer_constant_bounds_the_scaled_hermite_functions():
    """|He_n(x)| e^{−x²/4}/√(n!) ≤ K on a grid of n ≤ 400 and |x| ≤ 40 (mpmath, 30 digits)."""
    worst = mp.mpf(0)
    with mp.workdps(30):
        for n in (0, 1, 2, 3, 5, 8, 13, 40, 100, 250, 400):
            for x in np.linspace(-40.0, 40.0, 161):
                he = mp.hermite(n, mp.mpf(x) / mp.sqrt(2)) / mp.mpf(2) ** (mp.mpf(n) / 2)
                v = abs(he) * mp.exp(-(mp.mpf(x) ** 2) / 4) / mp.sqrt(mp.factorial(n))
                worst = max(worst, v)
    assert worst <= rp._CRAMER_K
    assert worst > 0.9 * rp._CRAMER_K  # the constant is not wildly loose on this grid


def _long_only(n: int, seed: int):
    """Held-out standardized pairs the 81-term pass rejects and the long pass accepts."""
    rng = np.random.default_rng(seed)
    h = torch.tensor(rng.normal(0.0, 3.0, n))
    k = torch.tensor(rng.normal(0.0, 3.0, n))
    r = torch.tensor(rng.uniform(-0.95, 0.95, n))
    o = po.torch_ops()
    _, short_ok = rp._cov_mehler(o, h, k, r, 256.0, EPS)
    c, ok = rp._cov_mehler(o, h, k, r, 256.0, EPS, rp._MEHLER_LONG_TERMS, rp._MEHLER_LONG_RHO)
    ok = ok & rp._cramer_tail_ok(o, h, k, r, c, rp._MEHLER_LONG_TERMS, EPS)
    return h, k, r, c, ok & ~short_ok


def test_long_mehler_pass_matches_mpmath():
    h, k, r, c, new = _long_only(6000, seed=11)
    assert int(new.sum()) > 100  # the pass takes a real share of these pairs
    idx = torch.nonzero(new).squeeze(1)
    for i in idx[:: max(1, idx.numel() // 3)][:3].tolist():  # mpmath: ~1.5 s per entry
        want = to_float(relu_cross_covariance_ref(float(h[i]), float(k[i]), 1.0, 1.0, float(r[i])))
        # the route's own acceptance bar: 256 eps relative (5.7e-14)
        assert abs(float(c[i]) - want) <= 256 * EPS * abs(want), (h[i], k[i], r[i])
        got = TK.relu_cross_covariance(h[i : i + 1], k[i : i + 1], 1.0, 1.0, r[i : i + 1])
        assert abs(float(got) - want) <= 256 * EPS * abs(want)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_compiled_bulk_matches_the_eager_path(dtype):
    """Held-out random problems: the compiled bulk gives the eager covariance within the
    routes' relative bar (256 eps float64, 32 eps float32, each route vs the truth, so twice
    that between the two paths) and matches mpmath on sampled entries (float64)."""
    from torchbridge.experiments.bench_kernels import random_problem
    from torchbridge.moments import relu_moments

    for seed in (101, 102):
        mean, cov = random_problem(160, seed)
        mean, cov = mean.to(dtype), cov.to(dtype)
        ref = relu_moments(mean, cov, "exact", check_psd=False)[1]
        with compiled_bulk():
            got = relu_moments(mean, cov, "exact", check_psd=False)[1]
        eps = torch.finfo(dtype).eps
        bar = 2 * rp._FAST_RATIO[torch.finfo(dtype).bits // 8] * eps
        assert ((got - ref).abs() <= bar * ref.abs() + 1e-300).all()
    if dtype == torch.float64:
        s = cov.diagonal().sqrt()
        for i, j in ((0, 1), (3, 77), (10, 150), (42, 43)):
            want = to_float(
                relu_cross_covariance_ref(
                    float(mean[i]),
                    float(mean[j]),
                    float(s[i]),
                    float(s[j]),
                    float(cov[i, j] / (s[i] * s[j])),
                )
            )
            assert abs(float(got[i, j]) - want) <= 1e-15 + 1e-13 * abs(want)
