"""A cheap *approximate* ReLU covariance, for benchmarks only (the cost of exactness).

Deterministic variational inference (Wu et al. 2019, "DVI") propagates a full covariance with
an approximate closed form of Cov[relu(z_i), relu(z_j)]. As a stand-in of that kind (not DVI's
own formula) we use the Hermite (Mehler) expansion of the bivariate normal in the correlation
ρ, truncated after two terms: with h = μ_i/σ_i, k = μ_j/σ_j,

    Cov[relu(z_i), relu(z_j)] = σ_i σ_j Σ_{n≥1} ρⁿ/n! a_n(h) a_n(k),
    a_1(h) = Φ(h), a_2(h) = φ(h)            (E of the first and second derivative of relu)

so ``≈ σ_i σ_j [ρ Φ(h) Φ(k) + ρ²/2 φ(h) φ(k)]``; its error is O(ρ³). The diagonal is the exact
ReLU variance (Lemma 1), the mean is Theorem 1. No bivariate normal CDF is evaluated.
"""

from __future__ import annotations

import math

import torch
from nmgen.generated import torch_kernels as K


def approx_relu_moments(mean: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean (q,), approximate covariance (q, q)) of relu(z), z ~ N(mean (q,), cov (q, q))."""
    var = cov.diagonal()
    pos = var > 0
    sigma = torch.where(pos, var.clamp_min(0).sqrt(), 0.0)
    safe = torch.where(pos, sigma, torch.ones_like(sigma))
    h = torch.where(pos, mean / safe, 0.0)
    rmean, rvar = K.relu_mean_variance(mean, sigma)
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
