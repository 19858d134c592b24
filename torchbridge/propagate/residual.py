"""Local residual covariances of the diagonal-plus-low-rank state (``FactorState``).

After a ReLU or a max-pooling window, the re-fitted Gaussian of a unit y_i is its exact
cross-covariance with the noise directions (Stein: the factor row F_i) plus a residual. The
factor form keeps each residual's variance (D_i) and drops the covariance of the residuals
*between* units,

    R_ij = Cov(y_i, y_j) − F_i · F_j        (i ≠ j),

which is large where receptive fields overlap: on LeNet, dropping R after conv1's max-pool and
ReLU leaves an output-variance error of 7–30%, while the exact covariance there (estimated by
Monte Carlo) brings it to the Monte Carlo noise. This module computes R on the *local* pairs
that matter, with the exact kernels:

* ``select_pairs``: pairs (i < j) of *active* units (residual variance ≥ ``tol`` × the
  largest) whose correlation |ρ_ij| under F Fᵀ + diag(D) + R exceeds ``rho``: R_ij is
  O(ρ²) × the residual standard deviations (Mehler expansion), so the rest is negligible.
* ``window_pair_cross``: for two max-pooling windows a, b, Cov(max a, max b) from the joint
  2K × 2K covariance of their elements, through the same tree of pairwise maxima as the
  single window (``FactorState.max_pool``): exact up to the Gaussian re-fit after each level.
* ``relu_pair_cross``: Cov(relu(z_i), relu(z_j)) by the exact bivariate kernel.
* ``materialize``: R (sparse pairs) + diag(D) on the units it touches is decomposed
  (``torch.linalg.eigh``) into G Gᵀ + diag(D''), G's columns appended to the factor as new
  independent noise directions, so every later affine map, Stein factor and max-pool carries
  the residual correlations exactly (the re-fit stays the one approximation).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from nmgen.generated import torch_kernels as K

from torchbridge.moments import relu_moments

#: Pairs (rows of a chunk) evaluated at once.
_PAIR_CHUNK = 1 << 14
#: Entries of one Gram block of ``window_cross_blocks`` (2²⁴ doubles: 128 MiB).
_GRAM_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class Pairs:
    """Off-diagonal residual covariance on index pairs: ``i < j`` (long, (P,)), ``v`` (P,)."""

    i: torch.Tensor
    j: torch.Tensor
    v: torch.Tensor


def sparse_rows(F: torch.Tensor) -> sp.csr_matrix:
    """F (q, r) as a SciPy CSR matrix (CPU, float64)."""
    return sp.csr_matrix(F.detach().cpu().double().numpy())


def density(F: torch.Tensor) -> float:
    """Fraction of nonzero entries of F (1.0 for an empty F)."""
    return float((F != 0).sum()) / F.numel() if F.numel() else 1.0


def index_set(idx: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.unique(idx, return_inverse=True)`` for indices in [0, ``n``): the sorted
    distinct values (U,) and each entry's position among them (like ``idx``), by a table of
    n flags instead of a sort (O(n + idx.numel()))."""
    seen = torch.zeros(n, dtype=torch.bool, device=idx.device)
    seen[idx] = True
    units = torch.nonzero(seen).flatten()
    pos = torch.empty(n, dtype=torch.long, device=idx.device)
    pos[units] = torch.arange(units.numel(), device=idx.device)
    return units, pos[idx]


def pair_dots(F: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """F_i · F_j for each pair, F (q, r): (P,) (``pair_dots_many`` with one list)."""
    return pair_dots_many(F, [(i, j)])[0]


def pair_dots_many(
    F: torch.Tensor, lists: list[tuple[torch.Tensor, torch.Tensor]]
) -> list[torch.Tensor]:
    """F_i · F_j for each pair of each (i, j) list, F (q, r). A sparse F (local receptive
    fields, density ≤ 0.25) goes through one SciPy Gram of the rows involved, read at the
    pairs; a dense one in chunks of gathered rows."""
    if density(F) > 0.25:
        outs = []
        step = max(1, (1 << 22) // max(F.shape[1], 1))
        for i, j in lists:
            out = F.new_empty(i.numel())
            for a in range(0, i.numel(), step):
                out[a : a + step] = (F[i[a : a + step]] * F[j[a : a + step]]).sum(1)
            outs.append(out)
        return outs
    units, inv = index_set(torch.cat([t for ij in lists for t in ij]), F.shape[0])
    Fs = sparse_rows(F[units])
    gram = (Fs @ Fs.T).tocsr()
    gram.sort_indices()
    n = units.numel()
    # the Gram's entries by sorted key row·n + col, read by binary search
    keys = torch.from_numpy(
        np.repeat(np.arange(n, dtype=np.int64) * n, np.diff(gram.indptr)) + gram.indices
    )
    vals = torch.from_numpy(gram.data)
    del gram
    inv = inv.cpu()
    outs, at = [], 0
    for i, _ in lists:
        m = i.numel()
        want = inv[at : at + m] * n + inv[at + m : at + 2 * m]
        at += 2 * m
        pos = torch.searchsorted(keys, want).clamp_max(max(keys.numel() - 1, 0))
        hit = keys[pos] == want if keys.numel() else torch.zeros(m, dtype=torch.bool)
        out = torch.where(hit, vals[pos] if vals.numel() else 0.0, 0.0)
        outs.append(out.to(F.device, F.dtype))
    return outs


def select_pairs(
    F: torch.Tensor, var: torch.Tensor, active: torch.Tensor, rho: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs i < j of ``active`` units (long (A,)) with |F_i·F_j| > ``rho`` σ_i σ_j, where
    σ² = ``var`` (q,): the Gram of the active rows (SciPy sparse for a sparse F, dense
    BLAS for a dense one: ``LocalResidual.pool_units``), thresholded, upper triangle."""
    if density(F) > 0.25:  # a dense factor: the dense Gram (BLAS), thresholded
        s = var[active].clamp_min(0).sqrt()
        Fa = F[active]
        gram = Fa @ Fa.T
        keep = torch.triu(gram.abs() > rho * s[:, None] * s[None, :], diagonal=1)
        r, c = torch.nonzero(keep, as_tuple=True)
        i, j = active[r], active[c]
        order = torch.argsort(i * F.shape[0] + j)
        return i[order], j[order]
    s = var[active].clamp_min(0).sqrt().cpu().numpy()
    Fs = sparse_rows(F[active])
    gram = sp.triu(Fs @ Fs.T, k=1).tocoo()
    keep = np.abs(gram.data) > rho * s[gram.row] * s[gram.col]
    r = torch.from_numpy(gram.row[keep].astype(np.int64)).to(active.device)
    c = torch.from_numpy(gram.col[keep].astype(np.int64)).to(active.device)
    i, j = active[r], active[c]
    order = torch.argsort(i * F.shape[0] + j)
    return i[order], j[order]


def window_cross_blocks(
    F: torch.Tensor, D: torch.Tensor, idx: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Cov(z_a, z_b) (P, K, K) of the elements of window pairs (a, b) = (``i``, ``j``) (long
    (P,), ``i`` sorted ascending), z ~ N(·, F Fᵀ + diag(D)), F (q, r) dense, window elements
    ``idx`` (q_out, K). Blocks of windows a at a time, their element rows' Gram with every
    row of F their partners' windows hold (one BLAS product of at most ``_GRAM_ELEMENTS``
    entries; LeNet's pool2 with the partners' rows alone: about a third of the products of
    all q rows), read at the pairs — gathering r-long rows per pair would move P·K²·r
    numbers instead."""
    P, K = i.numel(), idx.shape[1]
    q = F.shape[0]
    out = F.new_empty(P, K, K)
    per = max(1, _GRAM_ELEMENTS // (K * q))
    for w0 in range(0, idx.shape[0], per):
        w1 = min(w0 + per, idx.shape[0])
        lo, hi = (int(v) for v in torch.searchsorted(i, torch.tensor([w0, w1], device=i.device)))
        if lo == hi:
            continue
        rows = idx[w0:w1].reshape(-1)  # (n_w K,) element rows of windows w0 .. w1 − 1
        eb = idx[j[lo:hi]]  # (p, K) elements of b
        cols, at = index_set(eb.reshape(-1), q)  # the elements of b these pairs read
        G = F[rows] @ F[cols].T  # (n_w K, |cols|)
        a = (i[lo:hi] - w0)[:, None] * K + torch.arange(K, device=i.device)  # (p, K) rows
        ea = idx[i[lo:hi]]  # (p, K) elements of a
        blk = G[a[:, :, None], at.view(-1, 1, K)]
        shared = ea[:, :, None] == eb[:, None, :]
        out[lo:hi] = blk + shared * D[ea][:, :, None]
    return out


def merge_pairs(q: int, *pairs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Sorted unique keys i·q + j of the union of pair lists (each with i < j)."""
    keys = torch.cat([i * q + j for i, j in pairs])
    return torch.unique(keys)


def relu_pair_cross(
    mean: torch.Tensor, sigma: torch.Tensor, cov_ij: torch.Tensor, i: torch.Tensor, j: torch.Tensor
) -> torch.Tensor:
    """Cov(relu(z_i), relu(z_j)) for the pairs, z_i ~ N(mean_i, σ_i²), Cov(z_i, z_j) =
    ``cov_ij`` (P,), by the exact bivariate kernel (``relu_cross_covariance``)."""
    s1, s2 = sigma[i], sigma[j]
    den = s1 * s2
    pos = den > 0
    r = torch.where(pos, cov_ij / torch.where(pos, den, 1.0), 0.0).clamp(-1.0, 1.0)
    out = cov_ij.new_empty(i.numel())
    step = 1 << 16
    for a in range(0, i.numel(), step):
        sl = slice(a, a + step)
        out[sl] = K.relu_cross_covariance(
            mean[i[sl]], mean[j[sl]], s1[sl], s2[sl], r[sl], validate=False
        )
    return out


def _level_maps(K_: int, dtype, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the pairwise-max tree of a K-window: Ld (half, K) with d_i = e_2i − e_2i+1,
    Me (K − half, K) and Mr (K − half, half) with y = Me e + Mr relu(d)."""
    half = K_ // 2
    ar = torch.arange(half, device=device)
    Ld = torch.zeros(half, K_, dtype=dtype, device=device)
    Ld[ar, 2 * ar] = 1.0
    Ld[ar, 2 * ar + 1] = -1.0
    Me = torch.zeros(K_ - half, K_, dtype=dtype, device=device)
    Me[ar, 2 * ar + 1] = 1.0
    if K_ % 2:
        Me[half, K_ - 1] = 1.0
    Mr = torch.zeros(K_ - half, half, dtype=dtype, device=device)
    Mr[ar, ar] = 1.0
    return Ld, Me, Mr


def window_pair_cross(mu: torch.Tensor, S: torch.Tensor, method: str) -> torch.Tensor:
    """Cov(max of window a, max of window b) for a batch of window pairs.

    ``mu`` (P, 2, K): the (already paired/ordered) elements of the two windows; ``S``
    (P, 2K, 2K): their joint covariance, window a's elements first. Each level applies the
    single window's pairing to both windows at once (block-diagonal maps), all differences of
    the level in one joint ReLU (exact bivariate covariances, Stein cross-covariances), then
    the Gaussian re-fit: the same computation as ``FactorState.max_pool`` for each window,
    on the joint Gaussian. Returns (P,).
    """
    P, _, K_ = mu.shape
    m = mu.reshape(P, 2 * K_)
    from torchbridge.propagate.state import stein_factor

    while K_ > 1:
        Ld1, Me1, Mr1 = _level_maps(K_, mu.dtype, mu.device)
        Ld, Me, Mr = (torch.block_diag(x, x) for x in (Ld1, Me1, Mr1))
        mu_d = m @ Ld.T
        C_ed = S @ Ld.T
        S_d = Ld @ C_ed
        S_d = (S_d + S_d.transpose(1, 2)) / 2
        S_d = S_d - torch.diag_embed(S_d.diagonal(dim1=1, dim2=2).clamp_max(0))
        rm, C_r = relu_moments(mu_d, S_d, method, check_psd=False)
        phi = stein_factor(mu_d, S_d.diagonal(dim1=1, dim2=2))
        C_er = C_ed * phi[:, None, :]
        M = torch.cat([Me, Mr], dim=1)
        J = torch.cat(
            [torch.cat([S, C_er], dim=2), torch.cat([C_er.transpose(1, 2), C_r], dim=2)], dim=1
        )
        S = M @ J @ M.T
        S = (S + S.transpose(1, 2)) / 2
        m = m @ Me.T + rm @ Mr.T
        K_ = K_ - K_ // 2
    return S[:, 0, 1]


def materialize(
    q: int, pairs: Pairs, resid: torch.Tensor, eig_tol: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """G (q, m) and the new residual variance D'' (q,) with G Gᵀ + diag(D'') ≈ R + diag(D).

    R + diag(D) on the units the pairs touch is decomposed by ``torch.linalg.eigh``; the
    eigenvalues above ``eig_tol`` × the largest give G = V √Λ (the rest, and the negative
    ones of a pair-truncated R, are dropped), D'' = D − diag(G Gᵀ), clamped at 0.
    """
    units, at = index_set(torch.cat([pairs.i, pairs.j]), q)
    A = units.numel()
    R = resid.new_zeros(A, A)
    a, b = at[: pairs.i.numel()], at[pairs.i.numel() :]
    R[a, b] = pairs.v
    R[b, a] = pairs.v
    R.diagonal().copy_(resid[units])
    L, info = torch.linalg.cholesky_ex(R)
    if int(info) == 0:
        Gu = L
    else:  # a pair-truncated R that is not positive definite: its positive spectrum
        lam, V = torch.linalg.eigh(R)
        keep = lam > eig_tol * lam[-1].clamp_min(0)
        Gu = V[:, keep] * lam[keep].sqrt()
    G = resid.new_zeros(q, Gu.shape[1])
    G[units] = Gu
    return G, (resid - G.square().sum(1)).clamp_min(0)


@dataclass(frozen=True)
class LocalResidual:
    """Settings of the local residual covariances (``PropagateOptions.residual = "local"``).

    Attributes:
        tol: a unit is active when its nonlinear residual variance is ≥ ``tol`` × the layer's
            largest (default 1e-4).
        rho: a pair of active units is kept when |ρ_ij| > ``rho`` (default 1e-3).
        eig_tol: when R + diag(D) is not positive definite, its eigenvalues kept as new noise
            directions, relative to the largest (default 1e-9).
        max_density: local residuals are computed at a ReLU or max-pooling whose input
            factor has at most this fraction of nonzero entries (default 0.25): local
            receptive fields, where the residual correlations are local and the pairs few.
            After the first such layer the new noise directions make the factor dense, so
            later layers keep only their residual variances.
        pool_units: a max-pooling with a dense input factor still gets its window pairs
            (joint tree of the two windows, ``window_pair_cross``) when its output has at
            most this many units (default 4096; 0: never, the earlier behaviour). LeNet's
            pool2 (3136 windows, ≈ 5·10⁵ pairs at σ = 0.3, +1 min per image) feeds ReLU2
            and fc1, whose variances its between-window residual correlations drive.
        pool_rho: the |ρ| threshold of those pairs (under F Fᵀ + diag(D) of the output;
            default 0.1).
    """

    tol: float = 1e-3
    rho: float = 1e-2
    eig_tol: float = 1e-9
    max_density: float = 0.25
    pool_units: int = 4096
    pool_rho: float = 0.1
