"""Projected sign-gradient descent (PGD) on the real network: a feasibility reference.

Not a method of the paper. It answers "can the box |mu| <= beta, within the valid pixel range,
flip this image to the target at all?" for the noise-free real network, so that a failed Eq. 7
solve can be told apart from an infeasible (image, target) pair.
"""

from __future__ import annotations

import torch
from torch import nn

from torchbridge.attacks.box import DEFAULT_BOUNDS, PixelBox

__all__ = ["pgd_targeted"]


def pgd_targeted(
    model: nn.Module,
    image: torch.Tensor,
    target: int,
    beta: float,
    *,
    bounds: tuple[float, float] | None = DEFAULT_BOUNDS,
    steps: int = 100,
    restarts: int = 2,
    seed: int = 0,
) -> tuple[torch.Tensor, float]:
    """Minimize the real margin ``max_{k!=j} f_k(M + mu) - f_j(M + mu)`` over ``|mu| <= beta``
    and ``lo <= M + mu <= hi`` (``bounds``; ``None``: unconstrained, invalid images possible).

    ``image`` (C, H, W) without batch dim, model input units. Sign-gradient steps of size
    about ``0.17 beta`` decaying linearly to ``0.017 beta``, projected on the box; restart 0 starts at
    ``mu = 0``, the others uniformly in the box (seeded). Stops at the first restart that ends
    with a negative margin. Returns ``(mu, margin)``: the best ``mu`` (image-shaped, float64)
    and its margin (negative = the image + mu is classified as ``target``).
    """
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps}, {restarts}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    p = next(model.parameters())
    box = PixelBox.build(image, bounds, beta)
    lower, upper = box.lower.reshape(image.shape)[None], box.upper.reshape(image.shape)[None]
    x = image.detach().to(torch.float64)[None]
    gen = torch.Generator().manual_seed(seed)
    best_mu, best = torch.zeros_like(x), float("inf")

    def margin(out: torch.Tensor) -> torch.Tensor:
        others = torch.cat([out[:target], out[target + 1 :]])
        return others.max() - out[target]

    for r in range(restarts):
        mu = torch.zeros_like(x)
        if r > 0:
            u = torch.rand(x.shape, generator=gen, dtype=x.dtype)
            mu = lower + u * (upper - lower)
        for k in range(steps):
            mu.requires_grad_(True)
            m = margin(model((x + mu).to(p.dtype))[0].double())
            if float(m.detach()) < best:
                best, best_mu = float(m.detach()), mu.detach().clone()
            (g,) = torch.autograd.grad(m, mu)
            lr = beta * (0.15 * (1 - k / steps) + 0.017)
            mu = torch.minimum(torch.maximum(mu.detach() - lr * g.sign(), lower), upper)
        with torch.no_grad():
            m = float(margin(model((x + mu).to(p.dtype))[0].double()))
        if m < best:
            best, best_mu = m, mu.detach().clone()
        if best < 0:
            break
    return box.project(best_mu[0]), best
