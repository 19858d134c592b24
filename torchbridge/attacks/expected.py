"""Expected logits of a two-stage linearization under isotropic Gaussian input noise.

For ``g(y) = B relu(A y + c1) + c2`` and ``y = M + x`` with ``x ~ N(mu, sigma^2 I)``,
Theorem 1 gives ``E[g_k] = B_k . relu_mean(zbar, sbar) + c2_k`` with
``zbar = A (M + mu) + c1`` and ``sbar_v = sigma ||A_v||_2``.
Everything is float64 and differentiable by autograd through the generated kernel.
"""

from __future__ import annotations

import torch
from nmgen.generated.torch_kernels import relu_mean

from torchbridge.network import AffineReLUAffine

__all__ = ["ExpectedLogits", "expected_logits", "total_variation"]


class ExpectedLogits:
    """``(mu, sigma) -> E[g(M + x)]``, x ~ N(mu, sigma^2 I), for a fixed image ``M``.

    ``A M + c1`` and the row norms ``||A_v||`` are precomputed once (float64).
    """

    def __init__(self, net: AffineReLUAffine, image: torch.Tensor) -> None:
        n = net.in_features
        if image.numel() != n:
            raise ValueError(
                f"image has {image.numel()} elements (shape {tuple(image.shape)}) but the "
                f"linearization expects {n} inputs"
            )
        dt = torch.float64
        self.A = net.A.detach().to(dt)
        self.B = net.B.detach().to(dt)
        self.c2 = net.c2.detach().to(dt)
        flat = image.detach().to(dt).reshape(n)
        self.base = self.A @ flat + net.c1.detach().to(dt)
        self.row_norm = self.A.norm(dim=1)
        self.n = n
        self.d = net.out_features

    def __call__(self, mu: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
        """Expected logits (..., d) for ``mu`` (..., n) (flat, input units) and std ``sigma``."""
        zbar = self.base + mu @ self.A.T
        sigma = torch.as_tensor(sigma, dtype=zbar.dtype)
        sbar = sigma[..., None] * self.row_norm if sigma.ndim else sigma * self.row_norm
        return relu_mean(zbar, sbar) @ self.B.T + self.c2


def expected_logits(
    net: AffineReLUAffine, image: torch.Tensor, mu: torch.Tensor, sigma: torch.Tensor | float
) -> torch.Tensor:
    """``E[net(image + x)]``, ``x ~ N(mu, sigma^2 I)`` (Theorem 1); ``mu`` image-shaped or flat."""
    f = ExpectedLogits(net, image)
    return f(torch.as_tensor(mu, dtype=torch.float64).reshape(-1), sigma)


def total_variation(mu: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Isotropic TV ``sum sqrt(dx^2 + dy^2 + eps^2) - eps`` of ``mu`` (..., H, W).

    Forward differences; the difference across the last row/column is zero (Neumann boundary).
    ``eps = 0`` gives the exact (non-smooth) TV.
    """
    dx = torch.zeros_like(mu)
    dy = torch.zeros_like(mu)
    dx[..., :, :-1] = mu[..., :, 1:] - mu[..., :, :-1]
    dy[..., :-1, :] = mu[..., 1:, :] - mu[..., :-1, :]
    if eps == 0.0:
        return torch.sqrt(dx**2 + dy**2).sum()
    return (torch.sqrt(dx**2 + dy**2 + eps**2) - eps).sum()
