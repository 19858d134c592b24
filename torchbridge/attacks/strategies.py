"""Composable pieces the solvers combine around one SLSQP solve; each works on a toy problem.

* :func:`relinearize` - a new two-stage linearization at ``image + mu`` (the paper linearizes
  once, at the clean image; far from it the linearization is inaccurate).
* :func:`greedy_support` - pick the pixels an Eq. 9/10 solve may use: rank pixels by the
  first-order gain of pushing them to their box limit, find by bisection the fewest whose
  push satisfies the margin constraint, widen that set (``expand``) for the optimizer.
* :func:`prune` - zero entries below a threshold while the constraint still holds.
* :func:`clipped_check` - the real network on noisy images CLIPPED to the valid range: the
  fooling rate and the expected margin (feasibility decisions on the real network).
* :func:`restore_on_support` - feasibility restoration on the real network: projected
  gradient steps on the noise-free real margin over the solve's support only.
* :func:`single_thread` - run a solve on one intra-op thread, so ``mu`` does not depend on
  the caller's thread count.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from threadpoolctl import threadpool_limits
from torch import nn

from torchbridge.attacks.box import PixelBox
from torchbridge.attacks.expected import ExpectedLogits
from torchbridge.linearize import two_stage_linearize
from torchbridge.network import AffineReLUAffine

__all__ = [
    "clipped_check",
    "greedy_support",
    "prune",
    "relinearize",
    "restore_on_support",
    "single_thread",
]

_F64 = torch.float64


@contextmanager
def single_thread() -> Iterator[None]:
    """Pin torch and BLAS to one thread inside the block (reduction order, hence every
    rounding of a solve, then no longer depends on the thread count); restores them after."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(prev)


def relinearize(
    model: nn.Sequential, box: PixelBox, mu: torch.Tensor, relu_index: int = -1
) -> ExpectedLogits:
    """Expected logits of ``model`` linearized at the (valid) image ``box.image + mu``."""
    p = next(iter(model.parameters()))
    shape = box.shape
    point = (box.image + box.project(mu).reshape(-1)).reshape(shape)
    lin = two_stage_linearize(model, point.to(p.dtype), relu_index=relu_index)
    return ExpectedLogits(lin, box.image.reshape(shape))


def greedy_support(
    box: PixelBox,
    mu: torch.Tensor,
    slack: Callable[[torch.Tensor], torch.Tensor],
    kmax: int,
    expand: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Support for a support-restricted solve, and a start point on it.

    ``slack(mu_flat) -> scalar`` is >= 0 where the margin constraint holds (under ``f``).
    Gains ``max(g_p * up_p, -g_p * down_p)`` with ``g = d slack / d mu`` at ``mu`` and the room
    ``up/down`` left in the box (infinite sides count as 1). ``corner(k)`` pushes the ``k``
    best pixels to their limit; ``k_min`` = smallest ``k <= kmax`` (bisection) with
    ``slack(corner(k)) >= 0`` (``kmax`` if none). Returns ``(support, start, k_min)``: the
    current non-zeros plus the best new pixels, ``ceil(expand * k_min)`` pixels in all but at
    most ``kmax`` (sorted indices), and ``start = corner(k_min)``.
    """
    flat = box.project(mu.reshape(-1)).detach()
    x = flat.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(slack(x), x)
    up = (box.upper - flat).clamp(min=0, max=1.0)
    down = (flat - box.lower).clamp(min=0, max=1.0)
    gain = torch.maximum(g * up, -g * down)
    order = gain.argsort(descending=True, stable=True)
    step = torch.where(g * up >= -g * down, up, -down)

    def corner(k: int) -> torch.Tensor:
        out = flat.clone()
        out[order[:k]] += step[order[:k]]
        return box.project(out)

    def ok(k: int) -> bool:
        with torch.no_grad():
            return bool(slack(corner(k)) >= 0)

    kmax = max(1, min(kmax, box.n))
    lo, hi = 0, kmax
    if ok(hi):
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if ok(mid) else (mid, hi)
    k_min = hi
    keep = (flat != 0).nonzero().flatten().tolist()[:kmax]
    taken = set(keep)
    fresh = [p for p in order.tolist() if p not in taken]
    want = min(kmax - len(keep), max(k_min, math.ceil(expand * k_min)))
    chosen = keep + fresh[: max(0, want)]
    support = torch.tensor(sorted(chosen), dtype=torch.long)
    start = flat.clone()
    ck = corner(k_min)
    start[support] = ck[support]
    return support, start, k_min


def prune(
    mu: torch.Tensor,
    feasible: Callable[[torch.Tensor], bool],
    thresholds: tuple[float, ...],
) -> tuple[torch.Tensor, float]:
    """Zero ``|mu| <= t`` for the largest ``t`` in ``thresholds`` that keeps ``feasible``.

    Returns ``(mu, t)``; ``t = 0`` and ``mu`` unchanged when none does (or ``mu`` is not
    feasible to begin with)."""
    if not feasible(mu):
        return mu, 0.0
    for t in sorted(thresholds, reverse=True):
        cand = torch.where(mu.abs() <= t, torch.zeros_like(mu), mu)
        if feasible(cand):
            return cand, float(t)
    return mu, 0.0


def clipped_check(
    model: nn.Module,
    box: PixelBox,
    mu: torch.Tensor,
    sigma: float,
    margin: Callable[[torch.Tensor], torch.Tensor],
    samples: int = 128,
    seed: int = 0,
) -> tuple[float, float]:
    """Real network on ``clip(M + mu + sigma z)`` (``samples`` draws, ``seed``).

    Returns ``(rate, expected_margin)``: the fraction of samples with ``margin(logits) < 0``
    and ``margin`` of the mean logits (feasible in expectation when ``<= -gamma``)."""
    lin = isinstance(model, AffineReLUAffine)
    dtype = model.A.dtype if lin else next(iter(model.parameters())).dtype
    shape = (box.n,) if lin else box.shape
    g = torch.Generator().manual_seed(seed)
    x = box.image + box.project(mu).reshape(-1)
    noise = torch.randn((samples, box.n), generator=g, dtype=_F64) * sigma
    batch = x + noise
    if box.bounds is not None:
        batch = batch.clamp(*box.bounds)
    with torch.no_grad():
        out = model(batch.reshape(samples, *shape).to(dtype)).double()
    m = margin(out)
    return float((m < 0).double().mean()), float(margin(out.mean(0)))


def restore_on_support(
    model: nn.Module,
    box: PixelBox,
    mu: torch.Tensor,
    support: torch.Tensor,
    margin: Callable[[torch.Tensor], torch.Tensor],
    target_margin: float,
    steps: int = 40,
) -> tuple[torch.Tensor, float]:
    """Feasibility restoration on the real network, sparsity kept.

    Projected gradient descent on the noise-free real margin ``margin(model(M + mu))`` over
    the pixels of ``support`` only (all others stay exactly as in ``mu``), within the box;
    step ``0.25`` (input units) times the normalized gradient, halved every ``steps / 4``
    steps; stops once the margin is ``<= target_margin``. Returns ``(mu, margin)`` of the best
    point visited (flat float64).
    """
    lin = isinstance(model, AffineReLUAffine)
    dtype = model.A.dtype if lin else next(iter(model.parameters())).dtype
    shape = (box.n,) if lin else box.shape
    flat = box.project(mu.reshape(-1)).detach()
    mask = torch.zeros(box.n, dtype=torch.bool)
    mask[support] = True

    def real(m: torch.Tensor) -> torch.Tensor:
        x = (box.image + m).reshape(1, *shape).to(dtype)
        return margin(model(x)[0].double())

    best_mu, best = flat.clone(), float(real(flat).detach())
    cur, lr = flat.clone(), 0.25
    for k in range(steps):
        if best <= target_margin:
            break
        x = cur.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(real(x), x)
        g = torch.where(mask, g, torch.zeros_like(g))
        norm = float(g.abs().max())
        if norm == 0.0:
            break
        if k and k % max(1, steps // 4) == 0:
            lr /= 2
        cur = box.project(cur - lr * g / norm)
        with torch.no_grad():
            val = float(real(cur))
        if val < best:
            best, best_mu = val, cur.clone()
    return best_mu, best
