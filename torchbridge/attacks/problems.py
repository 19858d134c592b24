"""One problem object per equation of Section 4.3 (Eqs. 7, 8, 9/10), for :func:`run_slsqp`.

Each object maps a batch of SLSQP variable vectors ``x`` (batch, nvar) float64 to
``(objective (batch,), constraints (batch, m))`` (feasible when ``>= 0``), and knows its
variable bounds, a start point from a mean ``mu`` and how to read ``mu`` back. ``E`` are the
expected logits of a two-stage linearization (Theorem 1, :class:`ExpectedLogits`); ``mu`` is
flat, in input units, and lies in a :class:`PixelBox` (valid pixel range and +-beta).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from torchbridge.attacks.box import PixelBox
from torchbridge.attacks.expected import ExpectedLogits

__all__ = [
    "PixelSupportProblem",
    "SparseSmoothProblem",
    "TargetedProblem",
    "lse_lower_max",
    "targeted_margin",
    "untargeted_margin",
]

_F64 = torch.float64


def targeted_margin(e: torch.Tensor, j: int) -> torch.Tensor:
    """``max_{k != j} e_k - e_j`` over the last dim (negative = class ``j`` wins)."""
    others = torch.cat([e[..., :j], e[..., j + 1 :]], dim=-1)
    return others.max(dim=-1).values - e[..., j]


def untargeted_margin(e: torch.Tensor, i: int) -> torch.Tensor:
    """``e_i - max_{k != i} e_k`` (negative = some class beats the source ``i``)."""
    return -targeted_margin(e, i)


def lse_lower_max(e: torch.Tensor, i: int, tau: float) -> torch.Tensor:
    """``tau logsumexp(e_k / tau) - tau log(d - 1)`` over k != i: a smooth LOWER bound of
    ``max_{k != i} e_k`` (within ``tau log(d - 1)``), so a point feasible with it is feasible
    for the exact max."""
    others = torch.cat([e[..., :i], e[..., i + 1 :]], dim=-1)
    return tau * torch.logsumexp(others / tau, dim=-1) - tau * math.log(others.shape[-1])


def smoothed_tv(mu: torch.Tensor, eps: float) -> torch.Tensor:
    """Isotropic TV ``sum sqrt(dx^2 + dy^2 + eps^2) - eps`` of ``mu`` (batch, H, W) -> (batch,).

    Forward differences, zero across the last row/column (as :func:`total_variation`)."""
    dx = torch.nn.functional.pad(mu[..., :, 1:] - mu[..., :, :-1], (0, 1))
    dy = torch.nn.functional.pad(mu[..., 1:, :] - mu[..., :-1, :], (0, 0, 0, 1))
    return (torch.sqrt(dx**2 + dy**2 + eps**2) - eps).sum(dim=(-2, -1))


class TargetedProblem:
    """Eq. 7: ``min_{mu, sigma} max_{k != j} E_k - E_j`` s.t. ``mu`` in the box,
    ``sigma_min <= sigma <= sigma_max``.

    Epigraph form: variables ``x = (mu / scale, sigma, t)``, minimize ``t - E_j`` s.t.
    ``t - E_k >= 0`` for k != j (d - 1 smooth constraints). ``scale`` (beta, or 1) keeps the
    variables of order one.
    """

    def __init__(
        self,
        f: ExpectedLogits,
        box: PixelBox,
        target: int,
        sigma_range: tuple[float, float],
    ) -> None:
        self.f, self.box, self.j = f, box, target
        self.n = f.n
        self.sigma_range = sigma_range
        self.scale = box.beta if box.beta is not None else 1.0
        self.others = [k for k in range(f.d) if k != target]

    @property
    def nvar(self) -> int:
        return self.n + 2

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.f(self.scale * x[..., : self.n], x[..., self.n])
        t = x[..., self.n + 1]
        return t - e[..., self.j], t[..., None] - e[..., self.others]

    def bounds(self, lower: torch.Tensor | None = None, upper: torch.Tensor | None = None) -> list:
        """SLSQP bounds; ``lower``/``upper`` (flat, input units) narrow the box (trust region)."""
        lo = self.box.lower if lower is None else torch.maximum(self.box.lower, lower)
        hi = self.box.upper if upper is None else torch.minimum(self.box.upper, upper)
        inf = float("inf")
        pix = [
            (None if a == -inf else a / self.scale, None if b == inf else b / self.scale)
            for a, b in zip(lo.tolist(), hi.tolist(), strict=True)
        ]
        return [*pix, self.sigma_range, (None, None)]

    def x0(self, mu: torch.Tensor, sigma: float) -> np.ndarray:
        """Start point at ``mu`` (projected into the box) with the tightest ``t``."""
        m = self.box.project(mu.reshape(-1))
        with torch.no_grad():
            e = self.f(m, sigma)
        t = float(e[self.others].max())
        return np.concatenate([(m / self.scale).numpy(), [sigma, t]])

    def mu(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.scale * torch.as_tensor(x, dtype=_F64)[..., : self.n]

    def repair(self, x: np.ndarray) -> np.ndarray:
        """``x`` with the epigraph variable set to ``max_{k != j} E_k`` (feasible; the
        objective is then the exact margin of ``(mu, sigma)``)."""
        xt = torch.as_tensor(x, dtype=_F64)
        with torch.no_grad():
            e = self.f(self.mu(xt), xt[self.n])
        out = np.array(x, dtype=float, copy=True)
        out[self.n + 1] = float(e[self.others].max())
        return out

    def sigma(self, x: np.ndarray | torch.Tensor) -> float:
        return float(torch.as_tensor(x, dtype=_F64)[self.n])


class PixelSupportProblem:
    """Eq. 8: ``min_{mu, sigma} E_i - max_{k != i} E_k`` with ``mu`` zero off a fixed support.

    Variables ``x = (mu[support] / scale, sigma)``. ``competitor`` = a class k (objective
    ``E_i - E_k``: solving it for every k != i and keeping the best is exact) or ``None``
    (log-sum-exp lower bound of the max, temperature ``tau``). No constraints.
    """

    def __init__(
        self,
        f: ExpectedLogits,
        box: PixelBox,
        source: int,
        support: torch.Tensor,
        sigma_range: tuple[float, float],
        competitor: int | None,
        tau: float = 0.1,
    ) -> None:
        self.f, self.box, self.i, self.idx = f, box, source, support
        self.sigma_range, self.k, self.tau = sigma_range, competitor, tau
        self.scale = box.beta if box.beta is not None else 1.0

    @property
    def nvar(self) -> int:
        return self.idx.numel() + 1

    def mu(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=_F64)
        flat = x.new_zeros((*x.shape[:-1], self.f.n))
        return flat.index_add(-1, self.idx, self.scale * x[..., :-1])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        e = self.f(self.mu(x), x[..., -1])
        comp = lse_lower_max(e, self.i, self.tau) if self.k is None else e[..., self.k]
        return e[..., self.i] - comp, x.new_zeros((x.shape[0], 0))

    def bounds(self) -> list:
        return [*self.box.scipy_bounds(self.idx, self.scale), self.sigma_range]

    def x0(self) -> np.ndarray:
        return np.concatenate([np.zeros(self.idx.numel()), [self.sigma_range[1]]])


class SparseSmoothProblem:
    """Eqs. 9 / 10 restricted to a support: ``min ||mu||_1 + w TV_eps(mu)`` s.t. the margin
    constraint, ``mu`` zero off ``support`` and in the box.

    Exact l1 by splitting ``mu = u - v`` with ``u, v >= 0`` as SLSQP bounds; a pixel gets a
    ``u`` only if the box lets it rise and a ``v`` only if it lets it fall (``u <= upper``,
    ``v <= -lower``), so on an MNIST background pixel (value 0) only ``u`` exists. TV is the
    smoothed isotropic TV (``eps``). Constraint, ``gamma >= 0``: targeted (Eq. 10)
    ``E_j - E_k - gamma >= 0`` for every k != j; non-targeted (Eq. 9)
    ``comp - E_i - gamma >= 0`` with ``comp`` = ``E_k`` for a given competitor k or the
    log-sum-exp lower bound of ``max_{k != i} E_k`` (``competitor=None``).
    """

    def __init__(
        self,
        f: ExpectedLogits,
        box: PixelBox,
        support: torch.Tensor,
        shape: tuple[int, int],
        constraint: MarginConstraint,
        smoothing: tuple[float, float] = (1.0, 1e-3),
    ) -> None:
        self.f, self.box, self.shape, self.cons = f, box, shape, constraint
        self.tv_weight, self.eps = smoothing
        idx = support.sort().values
        self.pos = idx[box.upper[idx] > 0]
        self.neg = idx[box.lower[idx] < 0]
        self.n_pos = self.pos.numel()

    @property
    def nvar(self) -> int:
        return self.n_pos + self.neg.numel()

    def mu(self, x: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(x, dtype=_F64)
        flat = x.new_zeros((*x.shape[:-1], self.f.n))
        flat = flat.index_add(-1, self.pos, x[..., : self.n_pos])
        return flat.index_add(-1, self.neg, -x[..., self.n_pos :])

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu = self.mu(x)
        l1 = x.sum(-1)  # = ||mu||_1 at a solution (u, v not both positive there)
        tv = smoothed_tv(mu.reshape(*mu.shape[:-1], *self.shape), self.eps)
        return l1 + self.tv_weight * tv, self.cons(self.f(mu, self.cons.sigma))

    def bounds(self) -> list:
        inf = float("inf")
        up = [(0.0, None if b == inf else b) for b in self.box.upper[self.pos].tolist()]
        dn = [(0.0, None if a == -inf else -a) for a in self.box.lower[self.neg].tolist()]
        return up + dn

    def x0(self, mu: torch.Tensor) -> np.ndarray:
        m = self.box.project(mu.reshape(-1))
        return np.concatenate(
            [m[self.pos].clamp(min=0).numpy(), (-m[self.neg]).clamp(min=0).numpy()]
        )


class MarginConstraint:
    """The margin constraint of Eq. 9 (``target=None``) or Eq. 10, as ``>= 0`` rows.

    ``margin(e)`` is the exact margin (targeted: ``max_{k!=j} e_k - e_j``; non-targeted:
    ``e_i - max_{k!=i} e_k``), feasible when ``<= -gamma``; ``__call__(e)`` the smooth rows
    SLSQP sees (see :class:`SparseSmoothProblem`). ``sigma``: the fixed noise std.
    """

    def __init__(
        self,
        source: int,
        target: int | None,
        gamma: float,
        sigma: float,
        competitor: int | None = None,
        tau: float = 0.1,
    ) -> None:
        self.i, self.j, self.gamma, self.sigma = source, target, gamma, sigma
        self.k, self.tau = competitor, tau

    def margin(self, e: torch.Tensor) -> torch.Tensor:
        return targeted_margin(e, self.j) if self.j is not None else untargeted_margin(e, self.i)

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        if self.j is not None:
            others = torch.cat([e[..., : self.j], e[..., self.j + 1 :]], dim=-1)
            return e[..., self.j, None] - others - self.gamma
        comp = lse_lower_max(e, self.i, self.tau) if self.k is None else e[..., self.k]
        return (comp - e[..., self.i] - self.gamma)[..., None]

    def with_gamma(self, gamma: float) -> MarginConstraint:
        return MarginConstraint(self.i, self.j, gamma, self.sigma, self.k, self.tau)
