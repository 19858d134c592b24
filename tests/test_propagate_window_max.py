"""Numerical moments of relu(max-pool window) (``propagate.window_max``) and their use at a
ReLU of a max-pooling output in the factor form (``PropagateOptions(window_relu="qmc")``)."""

from __future__ import annotations

import torch
from nmgen.generated import torch_kernels as K
from torch import nn

import torchbridge as tb
from torchbridge.propagate.window_max import window_relu_max_moments

D = torch.float64


def test_one_element_window_is_the_relu_closed_form():
    """K = 1: max(0, z) = relu(z); mean and variance vs the closed form, relative error
    ≤ 2e-3 for μ/σ ≥ −1 (the integration error; the propagation only uses a window's
    moments where its estimated standard error is ≤ 2e-3 of the variance)."""
    mu = torch.linspace(-1.0, 3.0, 40, dtype=D)[:, None]
    sd = torch.linspace(0.3, 2.0, 40, dtype=D)
    m, v, se = window_relu_max_moments(mu * sd[:, None], sd.square()[:, None, None], replicates=2)
    rm, rv = K.relu_mean_variance(mu[:, 0] * sd, sd)
    assert ((m - rm).abs() / rm).max() <= 2e-3
    assert ((v - rv).abs() / rv).max() <= 2e-3
    assert (se[:, 1] > 0).all()


def test_four_element_windows_match_monte_carlo():
    """K = 4, correlated windows: numerical mean and variance within 5 standard errors of
    plain Monte Carlo (4·10⁵ pseudo-random samples per window, independent generator)."""
    g = torch.Generator().manual_seed(3)
    q, n = 12, 400_000
    A = torch.randn(q, 4, 4, generator=g, dtype=D)
    S = A @ A.transpose(1, 2) / 4 + 0.8 * torch.ones(4, 4, dtype=D)
    mu = 0.7 * torch.randn(q, 4, generator=g, dtype=D)
    m, v, _ = window_relu_max_moments(mu, S, replicates=2)
    L = torch.linalg.cholesky(S)
    e = torch.randn(n, 4, generator=g, dtype=D)
    y = (mu[:, None, :] + torch.einsum("pk,qlk->qpl", e, L)).amax(2).clamp_min(0)
    mc_m, mc_v = y.mean(1), y.var(1)
    c = y - mc_m[:, None]
    se_m = (mc_v / n).sqrt()
    se_v = ((c**4).mean(1) - mc_v.square()).clamp_min(0).div(n).sqrt()
    assert (((m - mc_m) / se_m).abs() <= 5).all()
    assert (((v - mc_v) / se_v).abs() <= 5).all()


def test_relu_of_max_pool_matches_monte_carlo_where_the_tree_does_not():
    """max-pool 2×2 → ReLU → Linear under N(x, Σ), Σ block diagonal with strongly correlated
    2×2 blocks (one per window): the windows are independent, so the output variance is a sum
    over windows of Var(relu(max)) and only the window moments matter. With
    ``window_relu="qmc"`` it matches Monte Carlo (4·10⁵ samples) within 5 standard errors on
    every output; the re-fitted tree (``"tree"``) does not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(9, 2)).to(D).eval()
    x = 0.3 * torch.randn(1, 1, 6, 6, dtype=D)
    blocks = []
    for _ in range(9):
        A = torch.randn(4, 4, dtype=D)
        blocks.append(0.05 * (A @ A.T / 4 + 0.9 * torch.ones(4, 4, dtype=D)))
    B = torch.block_diag(*blocks)  # in window order: reorder to pixel order
    win = torch.arange(36).reshape(3, 2, 3, 2).permute(0, 2, 1, 3).reshape(-1)
    Sigma = torch.zeros(36, 36, dtype=D)
    Sigma[win[:, None], win[None, :]] = B
    opts = {w: tb.PropagateOptions(covariance="lowrank", window_relu=w) for w in ("qmc", "tree")}
    got = {w: tb.output_moments(model, x, Sigma, options=o) for w, o in opts.items()}
    n = 400_000
    gen = torch.Generator().manual_seed(1)
    L = torch.linalg.cholesky(Sigma)
    with torch.no_grad():
        eps = torch.randn(n, 36, generator=gen, dtype=D) @ L.T
        y = model(x + eps.reshape(n, 1, 6, 6))
    c = y - y.mean(0)
    var = c.square().mean(0) * n / (n - 1)
    se = ((c**4).mean(0) - var.square()).clamp_min(0).div(n).sqrt()
    z = {w: ((r.var[0] - var) / se).abs() for w, r in got.items()}
    assert (z["qmc"] <= 5).all(), z
    assert z["tree"].max() > 5, z


def test_window_moments_are_differentiable_with_iid_windows():
    """Independent identically distributed window elements (S = σ²I: repeated eigenvalues):
    the gradient of the output variance with respect to the parameters (before the output
    layer's bias, which the variance does not depend on) is finite and nonzero."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten())
    model = nn.Sequential(*model, nn.Linear(8, 2)).to(D)
    x = torch.rand(1, 1, 4, 4, dtype=D)
    opts = tb.PropagateOptions(covariance="lowrank", differentiable=True)
    tb.output_moments(model, x, 0.1, options=opts).var.sum().backward()
    grads = [p.grad for p in model[:-1].parameters()]  # the last bias: no effect on var
    assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
    assert model[0].weight.grad.abs().min() > 0


class _PoolAndInput(nn.Module):
    """conv → max-pool 2×2 → ReLU, returned beside the input itself, so that the output
    covariance holds Cov(relu(max-pool), input) — the window's Stein gains."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(nn.functional.max_pool2d(self.conv(x), 2))
        return torch.cat([y.flatten(1), x.flatten(1)], 1)


def _mc_cross(model: nn.Module, x: torch.Tensor, sigma: float, n: int, ny: int):
    """Monte Carlo Cov(y, x) (ny, n_in) and its standard errors (independent generator)."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        eps = sigma * torch.randn(n, *x.shape[1:], generator=gen, dtype=D)
        out = model(x + eps)
    y = out[:, :ny] - out[:, :ny].mean(0)
    e = eps.reshape(n, -1)
    prod = y[:, :, None] * e[:, None, :]  # (n, ny, n_in)
    cov = prod.mean(0)
    se = prod.std(0) / n**0.5
    return cov, se


def test_stein_gains_give_the_cross_covariance_with_the_input():
    """relu(max-pool(conv(x))) under x ~ N(M, σ²I), factor form: with
    ``window_gain="stein"`` its cross-covariance with the input (the factor row Σ_i g_i
    F_{z_i}) matches Monte Carlo (2·10⁵ samples) within 5 standard errors everywhere; the
    re-fitted tree's rescaled row (``"tree"``) does not."""
    torch.manual_seed(2)
    model = _PoolAndInput().to(D).eval()
    x = torch.rand(1, 1, 6, 6, dtype=D)
    sigma, ny = 0.3, 18
    mc, se = _mc_cross(model, x, sigma, 200_000, ny)
    z = {}
    for gain in ("stein", "tree"):
        opts = tb.PropagateOptions(covariance="lowrank", window_gain=gain)
        got = tb.output_moments(model, x, sigma**2, full=True, options=opts)
        cross = got.cov[0, :ny, ny:]
        z[gain] = ((cross - mc) / se.clamp_min(1e-12)).abs()
    assert z["stein"].max() <= 5, z["stein"].max()
    assert z["tree"].max() > 5, z["tree"].max()


def test_window_moments_in_full_covariance_match_monte_carlo():
    """conv → max-pool → ReLU → linear with ``covariance="auto"`` and a ``max_full`` that
    puts the ReLU in full covariance: with ``window_full=True`` the output variance matches
    Monte Carlo (4·10⁵ samples) within 5 standard errors; without it (the re-fitted tree) it
    does not."""
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(9, 3)
    )
    model = model.to(D).eval()
    x = torch.rand(1, 1, 6, 6, dtype=D)
    sigma, n = 0.3, 400_000
    got = {
        f: tb.output_moments(
            model, x, sigma**2, options=tb.PropagateOptions(max_full=20, window_full=f)
        )
        for f in (True, False)
    }
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        y = model(x + sigma * torch.randn(n, 1, 6, 6, generator=gen, dtype=D))
    c = y - y.mean(0)
    var = c.square().mean(0)
    se = ((c**4).mean(0) - var.square()).clamp_min(0).div(n).sqrt()
    z = {f: ((r.var[0] - var) / se).abs() for f, r in got.items()}
    assert (z[True] <= 5).all(), z
    assert z[False].max() > 5, z


def test_window_pair_covariance_matches_monte_carlo():
    """Cov(max(0, z_a), max(0, z_b)) of two correlated 2×2 windows (8 jointly Gaussian
    elements), 2¹² points: within 5 standard errors of plain Monte Carlo (4·10⁵ samples per
    pair). (The propagation's default, 2⁹ points with a scrambling per 256 pairs, has
    per-pair errors of ≈ 2%, independent between chunks of pairs: they average out in the
    later layers' sums, as the next test checks.)"""
    from torchbridge.propagate.window_max import window_pair_covariance

    g = torch.Generator().manual_seed(8)
    P, n = 6, 400_000
    A = torch.randn(P, 8, 8, generator=g, dtype=D)
    S = A @ A.transpose(1, 2) / 8 + 0.7 * torch.ones(8, 8, dtype=D)
    mu = 0.5 * torch.randn(P, 2, 4, generator=g, dtype=D)
    got = window_pair_covariance(mu, S, points=1 << 12)
    L = torch.linalg.cholesky(S)
    z = mu.reshape(P, 1, 8) + torch.einsum(
        "pk,qlk->qpl", torch.randn(n, 8, generator=g, dtype=D), L
    )
    ya = z[:, :, :4].amax(2).clamp_min(0)
    yb = z[:, :, 4:].amax(2).clamp_min(0)
    prod = (ya - ya.mean(1, keepdim=True)) * (yb - yb.mean(1, keepdim=True))
    mc, se = prod.mean(1), prod.std(1) / n**0.5
    assert (((got - mc) / se).abs() <= 5).all(), (got, mc, se)


def test_conv_pool_relu_with_numerical_window_pairs_matches_monte_carlo():
    """conv 3×3 → max-pool 2×2 → ReLU → linear under N(x, σ²I), factor form: with the
    Stein gains and the numerical window-pair covariances (``window_gain="stein"``,
    ``window_pairs=True``, the defaults) the output variance is within 5 standard errors of
    Monte Carlo (4·10⁵ samples) on every output; with the re-fitted trees' pairs and rows
    (``window_gain="tree"``, ``window_pairs=False``) it is not."""
    torch.manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    )
    model = model.to(D).eval()
    x = torch.rand(1, 1, 8, 8, dtype=D)
    sigma, n = 0.3, 400_000
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        y = model(x + sigma * torch.randn(n, 1, 8, 8, generator=gen, dtype=D))
    c = y - y.mean(0)
    var = c.square().mean(0)
    se = ((c**4).mean(0) - var.square()).clamp_min(0).div(n).sqrt()
    z = {}
    old = {"window_gain": "tree", "window_pairs": False}
    for name, kw in {"new": {"window_gain": "stein", "window_pairs": True}, "old": old}.items():
        got = tb.output_moments(
            model, x, sigma**2, options=tb.PropagateOptions(covariance="lowrank", **kw)
        )
        z[name] = ((got.var[0] - var) / se).abs()
    assert (z["new"] <= 5).all(), z
    assert z["old"].max() > 5, z


def test_window_integrals_read_each_window_at_its_own_points():
    """The batched products of ``window_moments`` and ``window_pair_covariance`` (more
    windows than one chunk, K = 3 and 4) equal each window's own sums over its points
    z = μ + L e, written window by window: mean, variance and gains to 1e-14, the pair
    covariances to 1e-14 (one scrambling per chunk of pairs). A transposed L, or the 2K
    elements split into a and b another way, fails it (both tried)."""
    from torchbridge.propagate.window_max import (
        _CHUNK,
        _PAIR_CHUNK,
        _points,
        window_moments,
        window_pair_covariance,
    )

    g = torch.Generator().manual_seed(11)
    for k in (3, 4):
        q = _CHUNK + 7
        A = torch.randn(q, k, k, generator=g, dtype=D)
        S = A @ A.transpose(1, 2) / k + 0.1 * torch.eye(k, dtype=D)
        mu = torch.randn(q, k, generator=g, dtype=D)
        w = window_moments(mu, S, points=256)
        e = _points(256, k, 0, D, "cpu")
        L = torch.linalg.cholesky(S)
        for a in (0, 5, _CHUNK + 3):
            z = mu[a] + e @ L[a].T
            top, arg = z.max(1)
            y = top.clamp_min(0)
            gain = torch.stack([((arg == c) & (top > 0)).double().mean() for c in range(k)])
            assert abs(w.mean[a] - y.mean()) <= 1e-14
            assert abs(w.var[a] - (y - y.mean()).square().mean()) <= 1e-14
            assert (w.gain[a] - gain).abs().max() <= 1e-14

        P = _PAIR_CHUNK + 5
        A = torch.randn(P, 2 * k, 2 * k, generator=g, dtype=D)
        S2 = A @ A.transpose(1, 2) / (2 * k) + 0.1 * torch.eye(2 * k, dtype=D)
        mu2 = torch.randn(P, 2, k, generator=g, dtype=D)
        got = window_pair_covariance(mu2, S2, points=128)
        L2 = torch.linalg.cholesky(S2)
        for a in (0, 9, _PAIR_CHUNK + 2):
            e = _points(128, 2 * k, a // _PAIR_CHUNK, D, "cpu")
            z = mu2[a].reshape(-1) + e @ L2[a].T
            ya = z[:, :k].max(1).values.clamp_min(0)
            yb = z[:, k:].max(1).values.clamp_min(0)
            want = ((ya - ya.mean()) * (yb - yb.mean())).mean()
            assert abs(got[a] - want) <= 1e-14, (k, a, got[a], want)
