"""Generated kernels vs mpmath oracles at held-out points, gradients, limits and bad input.

The points here are not in nmgen.verify's grids (random, seeded, drawn over DESIGN.md's stress
ranges). References come from derivations/reference.py and derivations/bvn.py (quadrature of
the definition), never from a kernel.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nmgen.derivations.bvn import bvn_cdf_mp
from nmgen.derivations.reference import (
    relu_cross_moment_ref,
    relu_cross_moment_zero_mean_ref,
    relu_mean_ref,
    relu_second_moment_ref,
    relu_variance_ref,
    to_float,
)
from nmgen.generated import numpy_kernels as NK
from nmgen.generated import torch_kernels as TK

RNG = np.random.default_rng(20261124)
TOL = {np.float64: 1e-14, np.float32: 1e-5}


def _single_points(n: int) -> list[tuple[float, float]]:
    sig = 10.0 ** RNG.uniform(-3, 3, n)
    h = RNG.uniform(-10, 10, n)
    return [(float(a * b), float(b)) for a, b in zip(h, sig, strict=True)]


def _pair_points(n: int) -> list[tuple[float, ...]]:
    rhos = [
        0.0,
        0.3,
        -0.3,
        1 / math.sqrt(2),
        -1 / math.sqrt(2),
        0.9,
        -0.9,
        0.999999,
        -0.999999,
        1.0,
        -1.0,
    ]
    out = []
    for i in range(n):
        s1, s2 = 10.0 ** RNG.uniform(-3, 3, 2)
        h, k = RNG.uniform(-10, 10, 2)
        out.append((float(h * s1), float(k * s2), float(s1), float(s2), rhos[i % len(rhos)]))
    return out


def _run(kernel_np, kernel_t, pts, dtype):
    cols = np.array(pts, dtype=np.float64).astype(dtype).T
    got_np = np.asarray(kernel_np(*cols), dtype=np.float64)
    got_t = kernel_t(*[torch.tensor(c) for c in cols]).double().numpy()
    return cols.astype(np.float64), got_np, got_t


SINGLE = [
    ("relu_mean", relu_mean_ref, 1),
    ("relu_second_moment", relu_second_moment_ref, 2),
    ("relu_variance", relu_variance_ref, 2),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize(("name", "ref", "power"), SINGLE)
def test_single_variable_kernels_vs_mpmath(name, ref, power, dtype):
    pts = _single_points(12) + [(0.7, 0.0), (-0.7, 0.0)]
    cols, got_np, got_t = _run(getattr(NK, name), getattr(TK, name), pts, dtype)
    for i, (m, s) in enumerate(cols.T):
        want = to_float(ref(m, s))
        scale = (abs(m) + s) ** power
        for got in (got_np[i], got_t[i]):
            assert np.isfinite(got)
            assert abs(got - want) <= TOL[dtype] * scale, (name, m, s, got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cross_moment_vs_mpmath(dtype):
    pts = _pair_points(14)
    cols, got_np, got_t = _run(NK.relu_cross_moment, TK.relu_cross_moment, pts, dtype)
    for i, (m1, m2, s1, s2, r) in enumerate(cols.T):
        want = to_float(relu_cross_moment_ref(m1, m2, s1, s2, r))
        scale = (abs(m1) + s1) * (abs(m2) + s2)
        for got in (got_np[i], got_t[i]):
            assert abs(got - want) <= TOL[dtype] * scale, (m1, m2, s1, s2, r, got, want)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_zero_mean_cross_moment_vs_mpmath(dtype):
    pts = [(p[2], p[3], p[4]) for p in _pair_points(11)]
    cols, got_np, got_t = _run(
        NK.relu_cross_moment_zero_mean, TK.relu_cross_moment_zero_mean, pts, dtype
    )
    for i, (s1, s2, r) in enumerate(cols.T):
        want = to_float(relu_cross_moment_zero_mean_ref(s1, s2, r))
        for got in (got_np[i], got_t[i]):
            assert abs(got - want) <= TOL[dtype] * s1 * s2, (s1, s2, r, got, want)


def test_lemma3_check_value():
    """DESIGN.md: μ = 0, σ1 = σ2 = 1, ρ = 0.3 → 0.241372141917743807…"""
    want = 0.241372141917743807
    assert abs(float(NK.relu_cross_moment_zero_mean(1.0, 1.0, 0.3)) - want) < 1e-16
    assert abs(float(NK.relu_cross_moment(0.0, 0.0, 1.0, 1.0, 0.3)) - want) < 1e-16
    assert abs(to_float(relu_cross_moment_zero_mean_ref(1, 1, 0.3)) - want) < 1e-16


def test_bivariate_normal_cdf_vs_mpmath():
    pts = [
        (-2.3, 0.4, 0.6),
        (1.1, 1.7, -0.95),
        (0.0, -0.2, 0.999999),
        (3.3, -3.1, -0.2),
        (-8.0, -7.5, 0.5),
        (0.4, 0.4, -1.0),
        (0.4, 0.45, 1.0),
        (math.inf, 0.3, 0.2),
    ]
    for h, k, r in pts:
        want = to_float(bvn_cdf_mp(h, k, r))
        assert abs(float(NK.bivariate_normal_cdf(h, k, r)) - want) <= 1e-15
        assert abs(TK.bivariate_normal_cdf(h, k, r).item() - want) <= 1e-15


def test_zero_mean_kernel_matches_exact_kernel():
    s1, s2 = np.meshgrid(np.linspace(0.1, 3, 7), np.linspace(0.2, 2, 5))
    r = np.linspace(-1, 1, s1.size).reshape(s1.shape)
    a = NK.relu_cross_moment_zero_mean(s1, s2, r)
    b = NK.relu_cross_moment(0 * s1, 0 * s1, s1, s2, r)
    assert np.max(np.abs(a - b) / (s1 * s2)) < 1e-15


def test_deterministic_limits():
    assert float(NK.relu_mean(1.5, 0.0)) == 1.5 and float(NK.relu_mean(-1.5, 0.0)) == 0.0
    assert float(NK.relu_second_moment(2.0, 0.0)) == 4.0
    assert float(NK.relu_variance(2.0, 0.0)) == 0.0
    assert float(NK.relu_cross_moment(2.0, 3.0, 0.0, 0.0, 0.5)) == 6.0
    want = 3.0 * to_float(relu_mean_ref(0.5, 2.0))
    assert abs(float(NK.relu_cross_moment(0.5, 3.0, 2.0, 0.0, -0.7)) - want) < 1e-15
    for terms in (1, 5, 10, 20, 50):
        assert float(NK.relu_cross_moment_series(2.0, 3.0, 0.0, 0.0, 0.5, terms)) == 6.0


def test_continuity_through_the_limits():
    """σ → 0 and ρ → ±1 approach the limit branches smoothly."""
    for eps in (1e-6, 1e-9):
        assert abs(float(NK.relu_mean(0.3, eps)) - 0.3) < 1e-12
        v1 = float(NK.relu_cross_moment(0.4, -0.2, 1.1, 0.9, 1 - eps))
        v2 = float(NK.relu_cross_moment(0.4, -0.2, 1.1, 0.9, 1.0))
        assert abs(v1 - v2) < 10 * eps
        w1 = float(NK.relu_cross_moment(0.4, -0.2, 1.1, 0.9, -1 + eps))
        w2 = float(NK.relu_cross_moment(0.4, -0.2, 1.1, 0.9, -1.0))
        assert abs(w1 - w2) < 10 * eps
    a = float(NK.relu_cross_moment(0.3, 0.2, 1.0, 1.0, 1 / math.sqrt(2) - 1e-12))
    b = float(NK.relu_cross_moment(0.3, 0.2, 1.0, 1.0, 1 / math.sqrt(2) + 1e-12))
    assert abs(a - b) < 1e-11


GRAD_KERNELS = [
    ("relu_mean", 2, (0.3, 1.2)),
    ("relu_second_moment", 2, (-0.4, 0.7)),
    ("relu_variance", 2, (0.8, 0.5)),
    ("relu_cross_moment_zero_mean", 3, (1.1, 0.6, 0.4)),
    ("relu_cross_moment", 5, (0.3, -0.5, 1.2, 0.8, -0.6)),
    ("bivariate_normal_cdf", 3, (0.2, -0.7, 0.5)),
]


@pytest.mark.parametrize(("name", "nargs", "point"), GRAD_KERNELS)
def test_gradcheck(name, nargs, point):
    fn = getattr(TK, name)
    gen = torch.Generator().manual_seed(1)
    args = [
        (
            torch.tensor(v, dtype=torch.float64)
            + 0.05 * torch.rand(3, generator=gen, dtype=torch.float64)
        ).requires_grad_()
        for v in point
    ]
    assert torch.autograd.gradcheck(fn, args)


def test_gradcheck_series_and_mean_variance():
    args = [
        torch.tensor([v, v + 0.1], dtype=torch.float64, requires_grad=True)
        for v in (0.3, -0.5, 1.2, 0.8, 0.4)
    ]
    assert torch.autograd.gradcheck(lambda *a: TK.relu_cross_moment_series(*a, 5), args)
    mv = [
        torch.tensor([0.4, -1.0], dtype=torch.float64, requires_grad=True),
        torch.tensor([0.9, 2.0], dtype=torch.float64, requires_grad=True),
    ]
    assert torch.autograd.gradcheck(TK.relu_mean_variance, mv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_the_edges(dtype):
    m = torch.tensor([0.0, 1.0, -1.0, 0.0, 2.0, -3.0], dtype=dtype, requires_grad=True)
    s = torch.tensor([0.0, 0.0, 0.0, 1.0, 1e-3, 0.5], dtype=dtype, requires_grad=True)
    for f in (TK.relu_mean, TK.relu_second_moment, TK.relu_variance):
        (g_m, g_s) = torch.autograd.grad(f(m, s).sum(), (m, s))
        assert torch.isfinite(g_m).all() and torch.isfinite(g_s).all()
    r = torch.tensor([1.0, -1.0, 1.0, -1.0, 0.0, 0.999999], dtype=dtype, requires_grad=True)
    m2 = torch.tensor([0.5, 0.5, -0.2, 0.3, 0.0, 1.0], dtype=dtype, requires_grad=True)
    for f in (
        lambda: TK.relu_cross_moment(m, m2, s, s.detach() + 1.0, r),
        lambda: TK.relu_cross_moment(m, m2, s, s, r),
        lambda: TK.relu_cross_moment_zero_mean(s, s + 1.0, r),
        lambda: TK.relu_cross_moment_series(m, m2, s, s.detach() + 1.0, r, 5),
    ):
        grads = torch.autograd.grad(f().sum(), (m, s, r), allow_unused=True)
        assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_rho_gradient_at_plus_minus_one_is_the_one_sided_derivative():
    """∂E/∂ρ = σ1σ2Φ2(h, k; ρ) (Lemma 2); at ρ = 1 this is σ1σ2Φ(min(h, k))."""
    r = torch.tensor([1.0, -1.0], dtype=torch.float64, requires_grad=True)
    m1, m2, s1, s2 = (torch.tensor(v, dtype=torch.float64) for v in (0.4, 0.9, 1.0, 2.0))
    (g,) = torch.autograd.grad(TK.relu_cross_moment(m1, m2, s1, s2, r).sum(), r)
    h, k = 0.4, 0.45
    phi = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    assert abs(g[0].item() - 2.0 * phi(min(h, k))) < 1e-12
    assert abs(g[1].item() - 2.0 * (phi(h) + phi(k) - 1)) < 1e-12


def test_dtypes_broadcasting_and_device():
    x32 = torch.linspace(-1, 1, 5, dtype=torch.float32)
    out = TK.relu_mean(x32[:, None], torch.ones(3, dtype=torch.float32))
    assert out.shape == (5, 3) and out.dtype == torch.float32
    assert NK.relu_mean(np.float32([1.0, 2.0]), 1.0).dtype == np.float32
    assert NK.relu_mean(np.ones((2, 1)), np.ones(4)).shape == (2, 4)
    assert TK.relu_mean(0.3, 1.0).dtype == torch.float64


@pytest.mark.parametrize("mod", [NK, TK])
def test_bad_input_gives_clear_errors(mod):
    arr = np.array if mod is NK else torch.tensor
    with pytest.raises(ValueError, match="NaN"):
        mod.relu_mean(arr([float("nan")]), arr([1.0]))
    with pytest.raises(ValueError, match="standard deviation"):
        mod.relu_mean(arr([0.0]), arr([-1.0]))
    with pytest.raises(ValueError, match="correlation"):
        mod.relu_cross_moment_zero_mean(arr([1.0]), arr([1.0]), arr([1.5]))
    with pytest.raises(ValueError, match="broadcast"):
        mod.relu_mean(arr([0.0, 1.0]), arr([1.0, 2.0, 3.0]))
    for bad_terms in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="terms must be an int >= 1"):
            mod.relu_cross_moment_series(0.0, 0.0, 1.0, 1.0, 0.1, bad_terms)
    with pytest.raises(TypeError, match="dtype"):
        bad = (
            np.array([1], dtype=np.complex64) if mod is NK else torch.tensor([1], dtype=torch.int64)
        )
        mod.relu_mean(bad, 1.0)


def test_series_kernel_at_50_terms_equals_eq5_quadrature():
    """Issue bar: the printed 50-term series equals quadrature of Eq. 5 to 1e-12 (|ρ| ≤ 0.5)."""
    from nmgen.derivations.lemma4_series import eq5_integral_mp

    for pt in ((1.0, -0.5, 0.5, 1.5, 0.4), (-2.0, 0.6, 0.2, 2.0, -0.5), (1.8, 1.4, 1.2, 0.4, 0.1)):
        want = to_float(eq5_integral_mp(*pt))
        assert abs(float(NK.relu_cross_moment_series(*pt, 50)) - want) <= 1e-12
        t = TK.relu_cross_moment_series(*[torch.tensor(v, dtype=torch.float64) for v in pt], 50)
        assert abs(t.item() - want) <= 1e-12
