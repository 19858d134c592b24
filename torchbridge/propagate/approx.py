"""Cheap *approximate* ReLU covariances, for benchmarks only (the cost of exactness).

``dvi_relu_moments``: the approximation of deterministic variational inference (A. Wu et al.,
"Deterministic Variational Inference for Robust Bayesian Neural Networks", ICLR 2019, Table 1,
ReLU row), re-implemented here from its formula. With h = μ_i/σ_i, k = μ_j/σ_j, ρ their
correlation, ρ̂ = √(1 − ρ²) and g = asin ρ − ρ/(1 + ρ̂):

    Cov[relu(z_i), relu(z_j)] ≈ σ_i σ_j ρ [Φ(h)Φ(k) + g/(2π) · e^{−Q}],
    Q = ρ (h² + k²)/(2 g (1 + ρ̂)) − (asin ρ − ρ) h k/(ρ g).

It is exact at h = k = 0 (then it is Lemma 3's covariance) and at ρ = 0; elsewhere it is an
approximation (errors of order 1e-2 of σ_i σ_j on ``nm bench floor``'s problem).

``approx_relu_moments`` (the stand-in the benchmark used before DVI's formula was
implemented; ``nm propagate``'s "approx" method): the Hermite (Mehler) expansion of the
bivariate normal in the correlation ρ, truncated after two terms:

    Cov[relu(z_i), relu(z_j)] = σ_i σ_j Σ_{n≥1} ρⁿ/n! a_n(h) a_n(k),
    a_1(h) = Φ(h), a_2(h) = φ(h)            (E of the first and second derivative of relu)

so ``≈ σ_i σ_j [ρ Φ(h) Φ(k) + ρ²/2 φ(h) φ(k)]``; its error is O(ρ³). The diagonal is the exact
ReLU variance (Lemma 1), the mean is Theorem 1. No bivariate normal CDF is evaluated.
"""

from __future__ import annotations

import math

import torch
from nmgen.generated import torch_kernels as K


def _standardized(mean: torch.Tensor, cov: torch.Tensor):
    """(σ > 0 mask, σ with 1 where σ = 0, h = μ/σ (0 there), exact ReLU mean, exact variance)."""
    var = cov.diagonal()
    pos = var > 0
    sigma = torch.where(pos, var.clamp_min(0).sqrt(), 0.0)
    safe = torch.where(pos, sigma, torch.ones_like(sigma))
    h = torch.where(pos, mean / safe, 0.0)
    # the argument checks branch on values: eager only (under ``torch.compile`` they would
    # break the graph, e.g. `nm bench floor --compiled`'s "DVI, torch.compile" row)
    check = not torch.compiler.is_compiling()
    rmean, rvar = K.relu_mean_variance(mean, sigma, validate=check)
    return pos, safe, h, rmean, rvar


def approx_relu_moments(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (q,), approximate covariance (q, q)) of relu(z), z ~ N(mean (q,), cov (q, q))."""
    pos, safe, h, rmean, rvar = _standardized(mean, cov)
    a1 = torch.where(pos, torch.special.ndtr(h), (mean > 0).to(mean.dtype))
    a2 = torch.where(pos, torch.exp(-0.5 * h * h) / math.sqrt(2 * math.pi), 0.0)
    denom = safe[:, None] * safe[None, :]
    rho = (cov / denom).clamp(-1.0, 1.0)
    c = denom * (
        rho * (a1[:, None] * a1[None, :]) + 0.5 * rho.square() * (a2[:, None] * a2[None, :])
    )
    c = torch.where(pos[:, None] & pos[None, :], c, 0.0)
    c = (c + c.T) / 2
    c.diagonal().copy_(rvar)
    return rmean, c


def dvi_relu_moments(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (q,), DVI's approximate covariance (q, q)) of relu(z), z ~ N(mean (q,), cov (q, q)).

    Wu et al. 2019's closed form off the diagonal (module docstring), the exact ReLU variance
    (Lemma 1) on it, Theorem 1's mean; units with σ = 0 have no covariance. At ρ = 0 the
    Q-term is 0 (its limit: g ~ ρ³/6 sends Q to +∞ unless h = k = 0, where it is ρ-free).
    """
    pos, safe, h, rmean, rvar = _standardized(mean, cov)
    cdf = torch.special.ndtr(h)
    denom = safe[:, None] * safe[None, :]
    rho = (cov / denom).clamp(-1.0, 1.0)
    nz = rho != 0
    r = torch.where(nz, rho, 1.0)  # a finite stand-in where ρ = 0 (masked below)
    rhat = torch.sqrt((1.0 - r) * (1.0 + r))
    asr = torch.asin(r)
    g = asr - r / (1.0 + rhat)
    hh = h[:, None] * h[:, None] + h[None, :] * h[None, :]
    hk = h[:, None] * h[None, :]
    q = r * hh / (2.0 * g * (1.0 + rhat)) - (asr - r) * hk / (r * g)
    corr = torch.where(nz, g / (2.0 * math.pi) * torch.exp(-q), 0.0)
    c = denom * rho * (cdf[:, None] * cdf[None, :] + corr)
    c = torch.where(pos[:, None] & pos[None, :], c, 0.0)
    c = (c + c.T) / 2
    c.diagonal().copy_(rvar)
    return rmean, c
