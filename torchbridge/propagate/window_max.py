"""Moments of relu(max of a window of jointly Gaussian units) by randomized quasi-Monte Carlo.

On LeNet the re-fitted Gaussian of ReLU1 = relu(max-pool1(conv1)) is the layer-wise
propagation's largest error (issue #11 oracle experiment, ``experiments/oracle_propagate``):
with Monte Carlo's mean and variance of ReLU1 (correlations as propagated) the output
variance reaches the Monte Carlo noise; with the tree of pairwise maxima — a Gaussian re-fit
after each level, then a ReLU of the re-fitted maximum — the ReLU1 variances are 3–5% off.
The window's elements are the exact Gaussian there (conv1 is linear in the input), so the
mean and variance of

    y = max(0, z_1, ..., z_K),   z ~ N(μ, S)  (one 2 × 2 window: K = 4),

are a K-dimensional Gaussian integral of a piecewise-linear function. Their closed form
needs K-variate orthant probabilities; here they are integrated numerically, the same
scrambled Sobol' points (with their antithetic −e, whitened so that their second moments are
exactly the identity) for every window: z = μ + e Lᵀ with L Lᵀ = S. The integration error is measured (``window_relu_max_moments(..., replicates=R)``
returns it from R independent scramblings; tests: against the closed form for K = 1 and
against plain Monte Carlo for K = 4) and is far below the Monte Carlo noise of the
benchmarks; the Gaussian re-fit of y stays the approximation of the propagation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from scipy.stats import qmc

#: Sobol' points per window (2^m; with the antithetic points 2 × this many evaluations).
QMC_POINTS = 1 << 12
#: A window's numerical moments are used where the standard error of its variance (two
#: scramblings) is at most this fraction of it (else the tree's re-fitted moments stay).
MAX_REL_SE = 2e-3
#: Windows evaluated at once (memory: chunk × points × K doubles).
_CHUNK = 256


def _sobol_normal(points: int, dim: int, seed: int, dtype, device) -> torch.Tensor:
    """(points, dim) standard normal quasi-random points (scrambled Sobol', inverse CDF)."""
    u = qmc.Sobol(d=dim, scramble=True, seed=seed).random(points)
    u = torch.as_tensor(u, dtype=dtype, device=device).clamp(1e-12, 1 - 1e-12)
    return torch.special.ndtri(u)


def _points(points: int, dim: int, seed: int, dtype, device) -> torch.Tensor:
    """(2·points, dim) integration points: ``_sobol_normal``'s and their antithetic −e (every
    odd moment of the set is 0), whitened so that the set's second moments are exactly I
    (moment matching: a linear function of z then has its exact mean and variance)."""
    e = _sobol_normal(points, dim, seed, dtype, device)
    e = torch.cat([e, -e])
    lam, V = torch.linalg.eigh(e.T @ e / e.shape[0])
    return e @ (V * lam.rsqrt()) @ V.T


def _sqrt_psd(S: torch.Tensor) -> torch.Tensor:
    """L (q, K, K) with L Lᵀ = S (q, K, K), S symmetric positive semidefinite: Cholesky
    (differentiable also at repeated eigenvalues), eigh for the windows where it fails."""
    L, info = torch.linalg.cholesky_ex(S)
    bad = info != 0
    if bool(bad.any()):
        lam, V = torch.linalg.eigh(S[bad])
        L = L.clone()
        L[bad] = V * lam.clamp_min(0).sqrt()[:, None, :]
    return L


def _at_points(mu: torch.Tensor, L: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """z = mu + L e_p for every window and point: (c, D, points), from ``mu`` (c, D),
    ``L`` (c, D, D) and the points ``e`` (points, D), as one matrix product (each window's
    elements contiguous along the points: the maxima over D then read whole rows)."""
    c, D = mu.shape
    return torch.addmm(mu.reshape(-1, 1), L.reshape(c * D, D), e.T).view(c, D, -1)


@dataclass(frozen=True)
class WindowMoments:
    """Numerical moments of y = max(0, z_1, ..., z_K) for q windows (float64).

    Attributes:
        mean: (q,) E[y].
        var: (q,) Var(y).
        se: (q, 2) standard errors of ``mean`` and ``var`` across the scramblings (NaN for
            one scrambling).
        gain: (q, K) g_i = P(z_i > 0 and z_i = max_k z_k): y is piecewise linear with
            gradient e_i on that region, so by Stein's lemma Cov(y, w) = Σ_i g_i Cov(z_i, w)
            for every w jointly Gaussian with z — the exact cross-covariance of the window's
            output with the input noise.
    """

    mean: torch.Tensor
    var: torch.Tensor
    se: torch.Tensor
    gain: torch.Tensor


def window_moments(
    mu: torch.Tensor,
    S: torch.Tensor,
    points: int = QMC_POINTS,
    seed: int = 0,
    replicates: int = 1,
) -> WindowMoments:
    """Mean, variance, their integration standard errors and the Stein gains of
    max(0, z_1, ..., z_K), z ~ N(``mu``, ``S``) per window.

    ``mu`` (q, K), ``S`` (q, K, K): each window's Gaussian (float64). ``points``: Sobol'
    points per replicate (a power of 2); ``replicates``: independent scramblings, averaged
    (seeds ``seed``, ``seed`` + 1, ...).
    """
    if mu.ndim != 2 or S.shape != (*mu.shape, mu.shape[1]):
        raise ValueError(f"mu must be (q, K) and S (q, K, K); got {mu.shape} and {S.shape}")
    q, K = mu.shape
    L = _sqrt_psd((S + S.transpose(1, 2)) / 2)
    means, vars_, gains = [], [], []
    for r in range(replicates):
        e = _points(points, K, seed + r, mu.dtype, mu.device)
        m1 = mu.new_empty(q)
        m2 = mu.new_empty(q)
        g = mu.new_empty(q, K)
        ks = torch.arange(K, device=mu.device)[None, :, None]
        for a in range(0, q, _CHUNK):
            sl = slice(a, a + _CHUNK)
            top, arg = _at_points(mu[sl], L[sl], e).max(1)  # (c, points)
            y = top.clamp_min(0)
            m1[sl] = y.mean(1)
            m2[sl] = (y - m1[sl, None]).square().mean(1)
            g[sl] = ((arg[:, None, :] == ks) & (top > 0)[:, None, :]).to(mu.dtype).mean(2)
        means.append(m1)
        vars_.append(m2)
        gains.append(g)
    m = torch.stack(means)
    v = torch.stack(vars_)
    if replicates > 1:
        se = torch.stack([m.std(0), v.std(0)], 1) / replicates**0.5
    else:
        se = torch.full((q, 2), float("nan"), dtype=mu.dtype, device=mu.device)
    return WindowMoments(m.mean(0), v.mean(0), se, torch.stack(gains).mean(0))


def window_relu_max_moments(
    mu: torch.Tensor,
    S: torch.Tensor,
    points: int = QMC_POINTS,
    seed: int = 0,
    replicates: int = 1,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and their integration standard error of max(0, z_1, ..., z_K).

    ``mu`` (q, K), ``S`` (q, K, K): each window's Gaussian (float64). ``points``: Sobol'
    points per replicate (a power of 2); ``replicates``: independent scramblings, averaged
    (seeds ``seed``, ``seed`` + 1, ...). Returns (mean (q,), var (q,), se (q, 2)): the
    standard error of the mean and of the variance across replicates (NaN for one).
    """
    w = window_moments(mu, S, points, seed, replicates)
    return w.mean, w.var, w.se


#: Sobol' points per window pair (``window_pair_covariance``; with antithetic: 2 × this).
#: LeNet's ReLU1 has ≈ 10⁶ local pairs: 2⁹ points keep them to about 35 s per image.
PAIR_POINTS = 1 << 9
#: Window pairs per scrambling of the points (and per evaluation).
_PAIR_CHUNK = 256


def window_pair_covariance(
    mu: torch.Tensor, S: torch.Tensor, points: int | None = None, seed: int = 0
) -> torch.Tensor:
    """Cov(max(0, z_a), max(0, z_b)) for pairs of windows, by the same randomized QMC.

    ``mu`` (P, 2, K): the elements of windows a and b; ``S`` (P, 2K, 2K): their joint
    covariance, window a's elements first (float64). The points are antithetic and
    moment-matched as in ``window_moments``; ``points``: Sobol' points per pair (default
    ``PAIR_POINTS``, read at the call). Returns (P,).
    """
    points = PAIR_POINTS if points is None else points
    if (
        mu.ndim != 3
        or mu.shape[1] != 2
        or S.shape != (mu.shape[0], 2 * mu.shape[2], 2 * mu.shape[2])
    ):
        raise ValueError(f"mu must be (P, 2, K) and S (P, 2K, 2K); got {mu.shape} and {S.shape}")
    P, _, K = mu.shape
    out = mu.new_empty(P)
    chunk = _PAIR_CHUNK
    for a in range(0, P, chunk):
        sl = slice(a, a + chunk)
        # a scrambling of its own per chunk: the integration errors of the pairs, summed by
        # the layers after this one, are then independent instead of sharing one sign
        e = _points(points, 2 * K, seed + a // chunk, mu.dtype, mu.device)
        L = _sqrt_psd((S[sl] + S[sl].transpose(1, 2)) / 2)
        z = _at_points(mu[sl].reshape(-1, 2 * K), L, e).view(-1, 2, K, e.shape[0])
        y = z.amax(2).clamp_min_(0)  # (c, 2, points): max(0, window a), max(0, window b)
        y -= y.mean(2, keepdim=True)
        out[sl] = (y[:, 0] * y[:, 1]).mean(1)
    return out
