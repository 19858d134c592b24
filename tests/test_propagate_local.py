"""Local residual covariances of the diagonal-plus-low-rank form (``propagate.residual``)."""

from __future__ import annotations

import torch
from torch import nn

import torchbridge as tb
from torchbridge.propagate.residual import LocalResidual, Pairs, materialize, window_pair_cross

D = torch.float64


def _mc_variance(
    model: nn.Module, x: torch.Tensor, sigma: float, seed: int, n: int = 400_000
) -> tuple[torch.Tensor, torch.Tensor]:
    """(variance, its standard error) of ``model``'s outputs over n Monte Carlo samples of
    x + σ·N(0, I) (generator seeded ``seed``): the unbiased variance and
    √((m4 − var²)/n) from the fourth central moment."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        y = model(x + sigma * torch.randn(n, *x.shape[1:], generator=gen, dtype=D))
    c = y - y.mean(0)
    var = c.square().mean(0) * n / (n - 1)
    se = ((c**4).mean(0) - var.square()).clamp_min(0).div(n).sqrt()
    return var, se


def _pool_net() -> nn.Module:
    torch.manual_seed(0)
    return (
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(3, 3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(12, 3),
        )
        .to(D)
        .eval()
    )


def test_every_pair_kept_equals_the_full_covariance():
    """With every pair kept at every layer (tol = rho = 0, max_density = 1) the factor form
    carries the same re-fitted Gaussian as the full covariance: max-pool window pairs through
    the joint tree, ReLU pairs by the exact kernel, both turned into noise directions. Output
    mean and variance agree to 1e-10 (rounding), while dropping the residuals does not
    (``window_relu="tree"``: the full form has no numerical window moments)."""
    model = _pool_net()
    x = torch.rand(1, 1, 8, 8, dtype=D)
    full = tb.output_moments(model, x, 0.2, options=tb.PropagateOptions(covariance="full"))
    every = LocalResidual(tol=0.0, rho=0.0, max_density=1.0)
    opts = tb.PropagateOptions(covariance="lowrank", local=every, window_relu="tree")
    local = tb.output_moments(model, x, 0.2, options=opts)
    drop = tb.output_moments(
        model, x, 0.2, options=tb.PropagateOptions(covariance="lowrank", residual="drop")
    )
    torch.testing.assert_close(local.mean, full.mean, rtol=1e-10, atol=0)
    torch.testing.assert_close(local.var, full.var, rtol=1e-10, atol=0)
    assert ((drop.var - full.var).abs() / full.var).max() > 1e-3


def _relu_net() -> nn.Module:
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(108, 3))
    return net.to(D).eval()


def test_one_conv_relu_stage_matches_monte_carlo_and_dropping_does_not():
    """Conv → ReLU → Linear under N(x, 0.1 I): no re-fit is involved, so with the local
    residuals (default thresholds) the output variance must match Monte Carlo (4·10⁵
    samples) within 5 standard errors on every output; the residual-dropping factor form
    misses the ReLU residual correlations of overlapping receptive fields by more."""
    model = _relu_net()
    torch.manual_seed(2)
    x = torch.rand(1, 1, 6, 6, dtype=D) - 0.5
    got = tb.output_moments(model, x, 0.1, options=tb.PropagateOptions(covariance="lowrank"))
    drop = tb.output_moments(
        model, x, 0.1, options=tb.PropagateOptions(covariance="lowrank", residual="drop")
    )
    var, se = _mc_variance(model, x, 0.1**0.5, seed=0)
    z_local = ((got.var[0] - var) / se).abs()
    z_drop = ((drop.var[0] - var) / se).abs()
    assert (z_local <= 5).all(), z_local
    assert z_drop.max() > 5 and z_drop.max() > 3 * z_local.max(), (z_drop, z_local)


def test_window_pair_cross_of_independent_windows_is_zero_and_matches_single_windows():
    """Two windows with no cross-covariance: Cov(max a, max b) = 0; the joint tree's
    marginal variance equals the single-window factor-form max-pool's."""
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=D)
    Sa = A @ A.T / 4 + 0.1 * torch.eye(4, dtype=D)
    S = torch.block_diag(Sa, Sa)[None]
    mu = torch.tensor([[[0.1, -0.2, 0.3, 0.0], [0.1, -0.2, 0.3, 0.0]]], dtype=D)
    assert window_pair_cross(mu, S, "exact").abs().item() < 1e-15
    S2 = S.clone()
    S2[0, :4, 4:] = Sa  # window b is a copy of window a: Cov(max a, max b) = Var(max a)
    S2[0, 4:, :4] = Sa
    cross = window_pair_cross(mu, S2, "exact").item()
    model = nn.Sequential(nn.MaxPool1d(4)).to(D).eval()
    single = tb.output_moments(
        model, mu[:, :1], Sa, options=tb.PropagateOptions(pool_pairing="fixed")
    )
    assert abs(cross - single.var.item()) <= 1e-12 * single.var.item()


def test_materialize_reproduces_the_pair_covariance():
    """G Gᵀ + diag(D'') equals R + diag(D) exactly on a positive definite pair matrix."""
    D0 = torch.tensor([1.0, 2.0, 0.5, 0.0], dtype=D)
    pairs = Pairs(torch.tensor([0, 1]), torch.tensor([1, 2]), torch.tensor([0.3, -0.2], dtype=D))
    G, Dn = materialize(4, pairs, D0, 1e-12)
    got = G @ G.T + torch.diag(Dn)
    want = torch.diag(D0)
    want[0, 1] = want[1, 0] = 0.3
    want[1, 2] = want[2, 1] = -0.2
    torch.testing.assert_close(got, want, rtol=0, atol=1e-15)


def test_dense_max_pool_window_pairs_match_monte_carlo_and_dropping_does_not():
    """Conv → MaxPool (1 × 2 windows) → Linear on a 3 × 4 input: every conv unit sees most
    of the input, so the factor entering the max-pool is dense (no local pairs before
    ``LocalResidual.pool_units``). A 2-element maximum b + relu(a − b) of the exact Gaussian
    conv output has exact moments, and so has the covariance of two windows' maxima (joint
    tree), so with every pair kept (``pool_rho=0``) the output variance is exact: it equals
    the full covariance to rounding and Monte Carlo (4·10⁵ samples) within 5 standard errors;
    without the pairs (the earlier behaviour, ``pool_units=0``) the between-window residual
    covariances are dropped and the variance is off by many standard errors. Checked in the
    full-from-the-pool form (``auto``) and the factor form throughout (``lowrank``: the pairs
    become new noise directions)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(24, 3)
    )
    model = model.to(D).eval()
    x = torch.rand(1, 1, 3, 4, dtype=D)
    sigma = 0.5
    var, se = _mc_variance(model, x, sigma, seed=1)
    full = tb.output_moments(model, x, sigma**2, options=tb.PropagateOptions(covariance="full"))
    for cov in ("auto", "lowrank"):
        res = {}
        for units in (0, 100):
            local = LocalResidual(pool_units=units, pool_rho=0.0)
            opts = tb.PropagateOptions(covariance=cov, max_full=30, local=local)
            res[units] = tb.output_moments(model, x, sigma**2, options=opts).var[0]
        torch.testing.assert_close(res[100], full.var[0], rtol=1e-10, atol=0)
        z_new = ((res[100] - var) / se).abs()
        z_old = ((res[0] - var) / se).abs()
        assert (z_new <= 5).all(), (cov, z_new)
        assert z_old.max() > 20, (cov, z_old)


def test_relu_of_dense_max_pool_window_pairs_match_monte_carlo(monkeypatch):
    """Conv → MaxPool (2 × 2) → ReLU → Linear on a 4 × 4 input (dense factor at the pool):
    with the window pairs of the pool (``pool_units``, every pair) and ``window_pairs``,
    Cov(relu(max a), relu(max b)) is integrated over the two windows' exact joint Gaussian
    (2¹² Sobol' points per pair here, so that the integration error is below the Monte
    Carlo noise of a single pair), the variances likewise: the output variance matches
    Monte Carlo (4·10⁵ samples) within 5 standard errors, in the full-from-the-pool form
    (``auto``) and in the factor form (``lowrank``). Without the pairs, or with them taken
    by the exact kernel on the re-fitted maxima (``window_pairs=False``), it does not."""
    from torchbridge.propagate import window_max

    monkeypatch.setattr(window_max, "PAIR_POINTS", 1 << 12)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(16, 3)
    )
    model = model.to(D).eval()
    x = torch.rand(1, 1, 4, 4, dtype=D) - 0.3
    sigma = 0.5
    var, se = _mc_variance(model, x, sigma, seed=1)
    every = LocalResidual(pool_units=100, pool_rho=0.0)
    for cov in ("auto", "lowrank"):
        z = {}
        for name, local, pairs in (
            ("new", every, True),
            ("no pairs", LocalResidual(pool_units=0), True),
            ("kernel pairs", every, False),
        ):
            opts = tb.PropagateOptions(covariance=cov, max_full=30, local=local, window_pairs=pairs)
            got = tb.output_moments(model, x, sigma**2, options=opts).var[0]
            z[name] = ((got - var) / se).abs()
        assert (z["new"] <= 5).all(), (cov, z)
        assert z["no pairs"].max() > 20 and z["kernel pairs"].max() > 20, (cov, z)


def test_window_cross_blocks_read_the_covariance(monkeypatch):
    """``window_cross_blocks`` (blocked Gram) equals Cov(z_a, z_b) read off F Fᵀ + diag(D)
    directly, overlapping windows (shared elements: + D) included, across Gram blocks."""
    from torchbridge.propagate import residual

    monkeypatch.setattr(residual, "_GRAM_ELEMENTS", 3 * 4 * 10)  # 3 windows per Gram block
    torch.manual_seed(0)
    F = torch.randn(10, 6, dtype=D)
    Dv = torch.rand(10, dtype=D)
    idx = torch.randint(0, 10, (7, 4))
    i = torch.tensor([0, 0, 1, 3, 4, 4, 6])
    j = torch.tensor([1, 5, 2, 6, 5, 6, 6])
    got = residual.window_cross_blocks(F, Dv, idx, i, j)
    C = F @ F.T + torch.diag(Dv)
    want = C[idx[i][:, :, None], idx[j][:, None, :]]
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


def test_index_set_is_torch_unique_with_inverse():
    """``index_set`` (a flag table) returns what ``torch.unique(..., return_inverse=True)``
    returns: random indices with repeats, one index, none, every index of the range."""
    from torchbridge.propagate.residual import index_set

    g = torch.Generator().manual_seed(3)
    cases = [
        torch.randint(0, 50, (400,), generator=g),
        torch.randint(0, 10_000, (300,), generator=g),
        torch.tensor([7]),
        torch.zeros(0, dtype=torch.long),
        torch.randperm(64, generator=g),
    ]
    for idx in cases:
        n = 10_000 if idx.numel() == 300 else 64
        units, inv = index_set(idx, n)
        want_u, want_inv = torch.unique(idx, return_inverse=True)
        assert torch.equal(units, want_u) and torch.equal(inv, want_inv)
        assert torch.equal(units[inv], idx)
