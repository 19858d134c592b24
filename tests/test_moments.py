"""torchbridge moments: Theorems 1-2 and the general p×p ReLU covariance vs Monte Carlo.

Monte Carlo tolerances come from the sample itself: |analytic − MC| ≤ 5 empirical standard
errors, where the SE of a mean, second moment or covariance entry is the sample standard
deviation of the per-sample quantity (y_i, y_i², (y_i − ȳ_i)(y_j − ȳ_j)) over √N. ReLU outputs
are skewed, so Gaussian SE formulas would be too small. 5 SE keeps false alarms negligible
with fixed seeds, while a wrong formula (e.g. the printed Theorem 2's "+ c2") misses by many.
"""

from __future__ import annotations

import pytest
import torch

from torchbridge.moments import relu_moments
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.network import AffineReLUAffine

D = torch.float64
N_MC = 100_000


def _net(n=6, p=9, d=4, seed=0, c1=True):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(p, n, generator=g, dtype=D) / n**0.5
    B = torch.randn(d, p, generator=g, dtype=D) / p**0.5
    c1v = 0.5 * torch.randn(p, generator=g, dtype=D) if c1 else torch.zeros(p, dtype=D)
    return AffineReLUAffine(A, c1v, B, torch.randn(d, generator=g, dtype=D))


def _spd(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, dtype=D)
    return W @ W.T / n + 0.1 * torch.eye(n, dtype=D)


def _samples(fn, mean, cov, n, seed):
    g = torch.Generator().manual_seed(seed)
    L = torch.linalg.cholesky(cov)
    x = mean + torch.randn(n, mean.shape[-1], generator=g, dtype=D) @ L.T
    return fn(x)


def _mc(y):
    """(mean, SE of mean, cov, SE of cov entries, second moment, its SE) from samples y (N, d)."""
    n = y.shape[0]
    m = y.mean(0)
    c = y - m
    prod = c[:, :, None] * c[:, None, :]
    return (
        m,
        y.std(0) / n**0.5,
        prod.sum(0) / (n - 1),
        prod.std(0) / n**0.5,
        (y**2).mean(0),
        (y**2).std(0) / n**0.5,
    )


def _assert_within(analytic, mc, se, what):
    z = (analytic - mc).abs() / se
    assert (z <= 5).all(), (what, z.max().item())


@pytest.mark.parametrize("seed", [0, 1])
def test_theorem1_mean_vs_monte_carlo(seed):
    net = _net(seed=seed)
    g = torch.Generator().manual_seed(seed + 10)
    mean = torch.randn(6, generator=g, dtype=D)
    cov = _spd(6, seed)
    m, v = net.moments(mean, cov, method="exact")
    mc_m, se_m, mc_c, se_c, *_ = _mc(_samples(net, mean, cov, N_MC, seed))
    _assert_within(m, mc_m, se_m, "Theorem 1 mean")
    _assert_within(v, mc_c.diagonal(), se_c.diagonal(), "variance")
    # the package's own Monte Carlo estimator agrees with the same reference
    pm, _ = monte_carlo_moments(net, mean, cov, samples=N_MC, seed=seed)
    _assert_within(m, pm, se_m, "monte_carlo_moments mean")


def test_theorem2_second_moment_and_variance_vs_monte_carlo():
    net = _net(c1=False, seed=3)
    cov = _spd(6, 3)
    second, var = net.theorem2_moments(cov)
    zero = torch.zeros(6, dtype=D)
    mc_m, _, mc_c, se_c, mc_second, se_second = _mc(_samples(net, zero, cov, N_MC, 5))
    _assert_within(var, mc_c.diagonal(), se_c.diagonal(), "Theorem 2 variance")
    _assert_within(second, mc_second, se_second, "Theorem 2 second moment")
    # the printed theorem ("+ c2") is measurably wrong whenever c2 ≠ 0
    mean_relu_part = mc_m - net.c2
    printed = second - 2 * net.c2 * mean_relu_part - net.c2**2 + net.c2
    assert ((printed - mc_second).abs() / se_second > 5).any()
    # zero-mean method of .moments agrees with Theorem 2 at zero mean, c1 = 0
    _, v0 = net.moments(zero, cov, method="zero_mean")
    _, ve = net.moments(zero, cov, method="exact")
    assert torch.allclose(v0, var, rtol=1e-12, atol=1e-14)
    assert torch.allclose(ve, var, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["exact", "series"])
def test_general_variance_and_full_covariance_vs_monte_carlo(method):
    net = _net(seed=4)
    g = torch.Generator().manual_seed(7)
    mean = 0.7 * torch.randn(6, generator=g, dtype=D)
    cov = _spd(6, 7)
    _, C = net.moments(mean, cov, method=method, terms=20, full=True)
    _, v = net.moments(mean, cov, method=method, terms=20)
    assert torch.allclose(C.diagonal(), v, rtol=1e-12)
    assert torch.equal(C, C.T)
    _, _, mc_c, se_c, *_ = _mc(_samples(net, mean, cov, N_MC, 9))
    _assert_within(C, mc_c, se_c, f"{method} output covariance")


def test_cov_forms_agree_and_never_need_nxn():
    net = _net(seed=5)
    mean = torch.linspace(-1, 1, 6, dtype=D)
    iso = net.moments(mean, 0.3)
    diag = net.moments(mean, torch.full((6,), 0.3, dtype=D))
    full = net.moments(mean, 0.3 * torch.eye(6, dtype=D))
    for a, b in zip(iso, full, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)
    for a, b in zip(diag, full, strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_batched_means_match_single_calls():
    net = _net(seed=6)
    means = torch.randn(3, 6, dtype=D)
    bm, bv = net.moments(means, 0.2)
    for i in range(3):
        m, v = net.moments(means[i], 0.2)
        assert torch.allclose(bm[i], m) and torch.allclose(bv[i], v)


def test_relu_moments_exact_is_symmetric_psd_and_matches_monte_carlo():
    g = torch.Generator().manual_seed(11)
    p = 12
    mean = torch.randn(p, generator=g, dtype=D)
    cov = _spd(p, 11)
    m, C = relu_moments(mean, cov, "exact", chunk=17)  # several blocks
    assert torch.equal(C, C.T)
    assert torch.linalg.eigvalsh(C).min() >= -1e-12 * C.trace()
    mc_m, se_m, mc_c, se_c, *_ = _mc(_samples(torch.relu, mean, cov, N_MC, 2))
    _assert_within(m, mc_m, se_m, "relu mean")
    _assert_within(C, mc_c, se_c, "relu covariance")
    _, Cs = relu_moments(mean, cov, "series", terms=50)
    assert torch.allclose(C.diagonal(), Cs.diagonal(), rtol=0, atol=0)


def test_relu_moments_gradcheck_exact_p4():
    g = torch.Generator().manual_seed(12)
    mean = torch.randn(4, generator=g, dtype=D, requires_grad=True)
    L = torch.randn(4, 4, generator=g, dtype=D)
    cov0 = L @ L.T + 0.5 * torch.eye(4, dtype=D)

    def f(mu, c):
        c = (c + c.T) / 2  # perturb the full matrix, evaluate its symmetric part
        m, C = relu_moments(mu, c, "exact")
        return m, C

    cov = cov0.clone().requires_grad_()
    assert torch.autograd.gradcheck(f, (mean, cov))


def test_relu_moments_batched_and_zero_variance_unit():
    mean = torch.tensor([[0.5, -0.2, 1.0], [0.0, 0.3, -1.0]], dtype=D)
    cov = torch.tensor([[1.0, 0.3, 0.0], [0.3, 0.5, 0.0], [0.0, 0.0, 0.0]], dtype=D)
    m, C = relu_moments(mean, cov.expand(2, 3, 3))
    assert torch.isfinite(C).all() and C.shape == (2, 3, 3)
    assert C[0, 2].abs().max() == 0 and m[0, 2] == 1.0 and m[1, 2] == 0.0
    mean1 = mean[0].clone().requires_grad_()
    cov1 = cov.clone().requires_grad_()
    mm, CC = relu_moments(mean1, cov1)
    gm, gc = torch.autograd.grad(CC.sum() + mm.sum(), (mean1, cov1))
    assert torch.isfinite(gm).all() and torch.isfinite(gc).all()


def test_bad_inputs_give_clear_errors():
    mean = torch.zeros(3, dtype=D)
    with pytest.raises(ValueError, match="positive semi-definite"):
        relu_moments(mean, torch.tensor([[1.0, 2.0, 0], [2.0, 1.0, 0], [0, 0, 1.0]], dtype=D))
    with pytest.raises(ValueError, match="symmetric"):
        relu_moments(mean, torch.tensor([[1.0, 0.5, 0], [0.0, 1.0, 0], [0, 0, 1.0]], dtype=D))
    with pytest.raises(ValueError, match="NaN"):
        relu_moments(torch.tensor([0.0, float("nan"), 0.0], dtype=D), torch.eye(3, dtype=D))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\)"):
        relu_moments(mean, torch.eye(4, dtype=D))
    with pytest.raises(ValueError, match="method"):
        relu_moments(mean, torch.eye(3, dtype=D), method="magic")
    with pytest.raises(ValueError, match="terms must be an int >= 1"):
        relu_moments(
            mean,
            0.5 * torch.ones(3, 3, dtype=D) + 0.5 * torch.eye(3, dtype=D),
            method="series",
            terms=0,
        )
    net = _net()
    with pytest.raises(ValueError, match="expected"):
        net.moments(torch.zeros(5, dtype=D), 1.0)
    with pytest.raises(ValueError, match="Theorem 2 assumes c1 = 0"):
        net.theorem2_moments(1.0)
    with pytest.raises(ValueError, match=r"shape mismatch|expects"):
        AffineReLUAffine(torch.zeros(3, 2), torch.zeros(4), torch.zeros(1, 3), torch.zeros(1))


def test_psd_check_accepts_rank_deficient_and_zero_covariances():
    """AΣAᵀ with rank < p (as after linearizing a conv net) and Σ = 0 are PSD within rounding."""
    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.float64):
        A = torch.randn(40, 8, generator=g, dtype=dtype)
        cov = A @ A.T  # rank 8 < 40
        m, C = relu_moments(torch.zeros(40, dtype=dtype), cov)
        assert torch.isfinite(C).all()
    m, C = relu_moments(torch.tensor([1.0, -1.0], dtype=D), torch.zeros(2, 2, dtype=D))
    assert torch.equal(m, torch.tensor([1.0, 0.0], dtype=D)) and torch.equal(
        C, torch.zeros(2, 2, dtype=D)
    )


def test_float32_mirror_through_contiguous_copies(monkeypatch) -> None:
    """One float32 matrix's bands go through two contiguous copies (``moments.MIRROR_STAGED``;
    bands of 2 rows here): row ranges written one after another, as the compiled bulk's
    threads write them, give the upper triangle's transpose bit for bit (the lower
    triangle's old values gone), and the gradient of a weighted sum reaches each upper entry
    from both its places."""
    import torchbridge.moments as M

    monkeypatch.setattr(M, "MIRROR_STAGED", 2)
    monkeypatch.setattr(M, "MIRROR_BAND", 0)  # the strided path would raise (range step 0)
    gen = torch.Generator().manual_seed(12)
    p = 7
    x = torch.randn(p, p, generator=gen)
    ref = torch.triu(x) + torch.triu(x, 1).T
    y = x.clone()
    for a, b in ((0, 3), (3, 4), (4, 7)):
        M._mirror_rows(y, a, b)
    assert y.dtype == torch.float32 and torch.equal(y, ref)
    w = torch.randn(p, p, generator=gen)
    leaf = x.clone().requires_grad_(True)
    z = leaf.clone()
    M._mirror_rows(z, 0, p)
    (z * w).sum().backward()
    assert torch.allclose(leaf.grad, torch.triu(w) + torch.triu(w.T, 1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("p", [1, 2, 3, 40, 129, 130, 131, 300])
def test_compiled_mirror_in_bands(p) -> None:
    """The compiled bulk's mirror (``moments._mirror_upper``: a compiled pass per band of
    ``MIRROR_BAND`` rows, the last band's block eagerly) keeps the upper triangle and the
    diagonal bit for bit and writes the lower one as their transpose (its old values gone),
    in both dtypes; past one band (p > 130) the compiled passes ran."""
    import torchbridge.moments as M
    from nmruntime import torch_support
    from nmruntime.torch_support import compiled_bulk

    gen = torch.Generator().manual_seed(p)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(p, p, generator=gen, dtype=dtype)
        ref = torch.triu(x) + torch.triu(x, 1).T
        with compiled_bulk():
            M._mirror_upper(x)
        assert torch.equal(x, ref), dtype
    if p > M.MIRROR_BAND + 2:
        graphs = torch_support._COMPILED["graph:mirror_band"]
        assert graphs.failed is None and graphs.runs
        assert all(run is not graphs.fallback for run in graphs.runs.values())


def test_eager_mirror_in_bands_keeps_values_and_gradients(monkeypatch) -> None:
    """The eager covariance's lower triangle is copied from the upper one in place, in bands
    (``moments._mirror_rows``; bands of 2 rows here, so a p = 7 problem crosses several): the
    output is exactly symmetric and its gradient passes torch.autograd.gradcheck (finite
    differences), for one problem and a batch."""
    import torchbridge.moments as M

    monkeypatch.setattr(M, "MIRROR_BAND", 2)
    gen = torch.Generator().manual_seed(11)
    p = 7
    w = torch.randn(2, p, p, generator=gen, dtype=torch.float64)
    cov = w @ w.mT / p + 0.3 * torch.eye(p, dtype=torch.float64)
    cov = 0.5 * (cov + cov.mT)
    mean = torch.randn(2, p, generator=gen, dtype=torch.float64)
    _, c = relu_moments(mean, cov)
    assert torch.equal(c, c.mT)
    weights = torch.randn(p, p, generator=gen, dtype=torch.float64)

    def loss(m, s):  # a non-symmetric weighting, so both triangles' gradients count
        s = 0.5 * (s + s.mT)
        return (relu_moments(m, s, check_psd=False)[1] * weights).sum(dim=(-2, -1))

    assert torch.autograd.gradcheck(
        loss, (mean[0].clone().requires_grad_(), cov[0].clone().requires_grad_())
    )
    assert torch.autograd.gradcheck(
        loss, (mean.clone().requires_grad_(), cov.clone().requires_grad_())
    )
