"""Moments of relu(z), z ~ N(mean, cov), and of g(x) = B relu(Ax + c1) + c2.

Built only on the generated kernels (``nmgen.generated.torch_kernels``). The p×p ReLU
covariance is evaluated pair by pair on the upper triangle only (so the result is exactly
symmetric and costs half), in row blocks of at most ``chunk`` pairs, so a call that needs only
the output variance of g never holds more than O(p · block) temporaries.

Methods for the off-diagonal covariances Cov[relu(z_i), relu(z_j)]:
- ``"exact"``: ``relu_cross_covariance`` (σiσj ∫_0^ρ Φ2 dr in positive-term form; ours): no
  E[xy] − E[x]E[y] cancellation, so every entry keeps its relative accuracy, e.g. at
  |μ|/σ = 1e8 or in float32 with small σ.
- ``"series"``: ``relu_cross_moment_series`` (Lemma 4 truncated to ``terms`` terms; the paper).
- ``"zero_mean"``: ``relu_cross_moment_zero_mean`` (Lemma 3 / Theorem 2: exact only when the
  mean is 0; for a non-zero mean it reproduces the paper's "old" variance, which ignores the
  mean: the covariance is that of relu(z − mean)).
The diagonal is always the exact ReLU variance (Lemma 1), and the output mean is always
Theorem 1 (exact for any mean).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import functools
import itertools
import sys
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from nmgen.generated import torch_kernels as K

from nmruntime.pair_direct import DirectFront, DirectPass, direct_front, direct_passes
from nmruntime.pair_ops import normal_cdf_torch, renamed
from nmruntime.torch_support import compiled, compiled_bulk, compiled_graph, sync_free
from torchbridge.covariance import (
    all_finite,
    check_full_covariance,
    exactly_symmetric,
    require_tensor,
)
from torchbridge.pair_split import Team, ranges

METHODS = ("exact", "series", "zero_mean")
DEFAULT_CHUNK = 1 << 20
_KERNEL_SLICE = 1 << 20  # pairs per "exact" kernel call (the kernel slices its own bulk)
_SERIES_SLICE = 1 << 16  # pairs per series kernel call (cache-sized temporaries)
#: Intra-op threads of ``relu_moments`` (issue #13 thread policy). Its work is many short
#: elementwise passes over cache-sized slices, which OpenMP threads cannot amortise: on the
#: loaded 2-core machine `nm bench floor --p 1024 --threads 1,2` measured the exact p = 1024
#: covariance at 0.87 s with 1 thread and 9.5 s with 2 (float32: 0.79 s vs 25 s). So the whole
#: call runs single-threaded whatever torch's setting, and more threads are never slower. The
#: argument checks are inside the cap too: left at torch's 2 threads they took 0.134 s vs
#: 0.033 s at 1 (p = 1024, loaded machine), which made the 2-thread call 1.19x the 1-thread
#: one (0.842 s vs 0.710 s, medians of 7 interleaved repeats); with the checks inside the
#: cap, 0.546 s (2 threads) vs 0.603 s (1 thread) in the same kind of run. With
#: ``compiled=True`` the bulk uses torch's thread count in another way: each of its steps (a
#: band of rows' first pass; the other passes and the mirror image) on torch's OpenMP team at
#: the threads the load leaves (``torchbridge.pair_split.Team``).
PAIR_THREADS = 1


@contextlib.contextmanager
def _pair_threads() -> Iterator[int]:
    """torch's intra-op thread count capped at ``PAIR_THREADS`` inside, restored after;
    yields the count before the cap (the threads the caller allows)."""
    old = torch.get_num_threads()
    if old > PAIR_THREADS:
        torch.set_num_threads(PAIR_THREADS)
    try:
        yield old
    finally:
        if old > PAIR_THREADS:
            torch.set_num_threads(old)


def _check_method(method: str, terms: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "series" and (not isinstance(terms, int) or isinstance(terms, bool)):
        raise TypeError(f"terms must be an int; got {type(terms).__name__}")
    if method == "series" and terms < 1:
        raise ValueError(f"terms must be an int >= 1; got {terms}")


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), 0.0)


def _validate(mean: torch.Tensor, cov: torch.Tensor, check_psd: bool) -> bool:
    """Check the arguments of ``relu_moments``; TypeError / ValueError naming the bad one.

    cov must be symmetric and PSD within the tolerances of ``torchbridge.covariance``
    (``check_full_covariance``); nothing is symmetrised or cast silently. Returns whether cov
    is exactly symmetric (False: not known).
    """
    require_tensor(mean, "mean")
    require_tensor(cov, "cov")
    if cov.dtype != mean.dtype:
        raise TypeError(f"cov has dtype {cov.dtype} but mean has {mean.dtype}")
    if cov.device != mean.device:
        raise ValueError(f"cov is on {cov.device} but mean is on {mean.device}")
    if mean.ndim == 0 or mean.shape[-1] == 0:
        raise ValueError(
            f"mean has shape {tuple(mean.shape)}: it needs a last dimension of p >= 1 variables"
        )
    p = mean.shape[-1]
    if cov.ndim < 2 or cov.shape[-2:] != (p, p):
        raise ValueError(f"cov must be (..., {p}, {p}) for mean (..., {p}); got {tuple(cov.shape)}")
    try:
        torch.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
    except RuntimeError:
        raise ValueError(
            f"the batch shapes of mean {tuple(mean.shape[:-1])} and cov {tuple(cov.shape[:-2])} "
            "do not broadcast"
        ) from None
    if not all_finite(mean):
        raise ValueError("mean contains NaN or Inf")
    return check_full_covariance(cov, check_psd, check_finite=True)


def _pair_blocks_nd(p: int, chunk: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """(i, j, nd): upper-triangle index pairs (i <= j) in row blocks of about ``chunk`` pairs,
    the strict pairs first (row-major), then the block's ``nd`` diagonal pairs (i == j).
    One block (p rows of ``chunk``): the same tensors on every call for the last two (p,
    device) (cached, never written: 3.6 ms of index generation per p = 1024 call)."""
    if max(1, chunk // max(p, 1)) >= p:
        yield _one_pair_block(p, torch.device(device))
        return
    yield from _pair_blocks_gen(p, chunk, device)


@functools.lru_cache(maxsize=2)
def _one_pair_block(p: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    return next(_pair_blocks_gen(p, max(p * p, 1), device))


def _flat_places(i: torch.Tensor, j: torch.Tensor, p: int) -> torch.Tensor:
    """i·p + j: the places of the pairs (i, j) in a flattened p×p matrix; cached for
    ``_one_pair_block``'s pairs (1.1 ms per p = 1024 call otherwise)."""
    one = _one_pair_block(p, i.device)
    if i is one[0] and j is one[1]:
        return _one_block_places(p, i.device)
    return i * p + j


@functools.lru_cache(maxsize=2)
def _one_block_places(p: int, device: torch.device) -> torch.Tensor:
    i, j, _ = _one_pair_block(p, device)
    return i * p + j


def _mirror(x: torch.Tensor) -> torch.Tensor:
    """``batch_shape x p x p``: each matrix's upper triangle (diagonal included) copied to its
    lower triangle (the lower is read only through the transpose). One tiled pass when
    compiled: 0.53 ms at p = 1024 in float64, where scattering the pairs to their places
    (j, i) took 3.2 ms (strided writes, one cache line each)."""
    idx = torch.arange(x.shape[-1], device=x.device)
    return torch.where(idx[:, None] <= idx[None, :], x, x.mT)


def _mirror_band(rows: torch.Tensor, below: torch.Tensor) -> torch.Tensor:
    """For the compiled mirror (``_mirror_upper``): a band's values right of it (``rows``,
    the rows [a, b) of a p×p matrix, whole rows; b = p − ``below``'s rows) copied to their
    places in ``below`` (rows [b, p), whole rows), columns [a, b); then the band's own
    diagonal block, its upper triangle to its lower one. In place; returns a tensor (a
    compiled graph returns one)."""
    b = rows.shape[1] - below.shape[0]
    a = b - rows.shape[0]
    below[:, a:b].copy_(rows[:, b:].mT)
    block = rows[:, a:b]
    i = torch.arange(b - a, device=rows.device)
    block.copy_(torch.where(i[:, None] <= i[None, :], block, block.mT))
    return rows[0, :1]


def _mirror_upper(full: torch.Tensor) -> None:
    """The upper triangle of ``full`` (p×p, contiguous) copied to its lower triangle, in place:
    where the compiled bulk applies, a compiled pass per band of ``MIRROR_BAND`` rows
    (``_mirror_band``, inductor's tiled transpose; the last band's block eagerly), else
    ``_mirror_rows``. The whole p = 1024 mirror on the 2-core EPYC, medians of 31 alternating
    (session 42, scratch ``/tmp/s42/mir4.py``), 1 | 2 threads: float64 0.90 | 0.54 ms against
    1.91 | 1.32 ms for ``_mirror_rows``; float32 0.41 | 0.40 ms against 0.97 | 1.06 ms for the
    compiled whole-matrix ``where`` before it; bands of 32, 64 and 256 rows took 1.30, 0.98
    and 1.04 ms (float64, 1 thread). Inside a p = 1024 ``relu_moments`` call, where the lower
    triangle is not in cache (medians of 31, freed memory kept, ``/tmp/s42/abmir.py``):
    float64 1.64 vs 2.13 ms at 1 thread, 1.23 vs 1.57 at 2; float32 0.89 vs 1.26, 0.72 vs
    0.89 ms."""
    p = full.shape[-1]
    run = compiled_graph(full, "mirror_band", _mirror_band)
    if run is None:
        _mirror_rows(full, 0, p)
        return
    for a, b in _split(0, p, MIRROR_BAND):  # the last band: none or at least 3 rows below
        if b < p:
            run(full[a:b], full[b:])
        else:
            _mirror_rows(full, a, b)


def _symmetrised(cov: torch.Tensor) -> torch.Tensor:
    """(Σ + Σᵀ)/2 of one p×p matrix, a new contiguous tensor: each entry (Σ_ji + Σ_ij)·0.5,
    bit for bit the general path's (Σ_ij + Σ_ji)/2 on the pairs (``_pair_covariances``). For
    the compiled passes, which read Σ_ij as is: with the symmetrised read inside them (a
    strided read of Σ_ji per pair), a p = 1024 call with cov not exactly symmetric took 81.0
    vs 15.9 ms in float32 and 78.8 vs 33.1 ms in float64 (1 thread, medians of 15, scratch
    ``/tmp/s41/inexact.py``), and each pass was a second kernel to compile."""
    out = cov.mT.contiguous()
    return out.add_(cov).mul_(0.5)


def _mirrored(x: torch.Tensor) -> torch.Tensor:
    """``_mirror(x)`` for a fresh ``x`` of the caller's: compiled where the compiled bulk is
    on; else on eager CPU in place, in bands (``_mirror_rows``: the transpose read in blocks of
    whole cache lines; p = 1024, float64, 1.1 vs 7.4 ms at 1 thread, 0.8 vs 3.5 ms at 2);
    else ``_mirror``'s one ``where``. Autograd records the in-place copies."""
    run = compiled(x, "mirror", _mirror)
    if run is not None:
        return run(x)
    if sync_free(x):
        return _mirror(x)
    _mirror_rows(x, 0, x.shape[-1])
    return x


def _pair_blocks_gen(
    p: int, chunk: int, device
) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
    """``_pair_blocks_nd``, generated."""
    rows = max(1, chunk // max(p, 1))
    for r0 in range(0, p, rows):
        nr = min(p, r0 + rows) - r0
        i, j = _row_pairs(p, r0, r0 + nr, device)
        d = torch.arange(r0, r0 + nr, device=device)
        yield torch.cat([i, d]), torch.cat([j, d]), nr


def _row_pairs(p: int, a: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, j): the strict upper-triangle pairs of rows [a, b) of a p×p matrix, row-major."""
    ij = torch.triu_indices(b - a, p, offset=a + 1, device=device)
    return ij[0] + a, ij[1]


def _cross_kernel(method: str, terms: int) -> Callable:
    """The general-mean kernel of ``method``: the covariance ("exact") or the cross moment."""
    if method == "exact":
        return lambda m1, m2, s1, s2, r: K.relu_cross_covariance(m1, m2, s1, s2, r, validate=False)
    return lambda m1, m2, s1, s2, r: K.relu_cross_moment_series(
        m1, m2, s1, s2, r, terms, validate=False
    )


@dataclasses.dataclass(frozen=True)
class _Shared:
    """Per-call quantities of the pair loop, computed once (not once per block of pairs).

    rmean, var: E[relu(z)] and Var[relu(z)] (``batch_shape x p``); symmetric: ``cov`` is
    exactly symmetric (eager CPU, no autograd: one gather per pair instead of two and the
    average); direct: the "exact" kernel's runtime may be called without the generated
    wrapper (``_covariance_direct``: eager CPU, no autograd, every σ > 0, one batch shape)."""

    rmean: torch.Tensor
    var: torch.Tensor
    symmetric: bool
    direct: bool
    h: torch.Tensor | None = None  # μ/σ per variable where ``direct``
    cdf: torch.Tensor | None = None  # Φ(μ/σ) per variable where ``direct``


def _shared(
    mean: torch.Tensor, cov: torch.Tensor, sigma: torch.Tensor, symmetric: bool | None = None
) -> _Shared:
    """``_Shared`` for ``mean`` (``batch_shape x p``), ``cov`` (``batch_shape x p x p``) and
    σ = √diag(cov); ``symmetric``: whether cov is exactly symmetric (None: tested here)."""
    return _Shared(*_relu_mean_variance(mean, sigma), *_pair_inputs(mean, cov, sigma, symmetric))


def _pair_inputs(
    mean: torch.Tensor, cov: torch.Tensor, sigma: torch.Tensor, symmetric: bool | None
) -> tuple[bool, bool, torch.Tensor | None, torch.Tensor | None]:
    """``_Shared``'s (symmetric, direct, h, cdf) (see ``_shared``)."""
    eager = not sync_free(cov) and not (
        torch.is_grad_enabled() and (mean.requires_grad or cov.requires_grad)
    )
    if symmetric is None:
        symmetric = eager and exactly_symmetric(cov)
    symmetric = eager and symmetric
    same = mean.shape[:-1] == cov.shape[:-2]  # the pairs' tensors share one shape
    direct = eager and same and bool((sigma > 0).all())
    if not direct:
        return symmetric, direct, None, None
    h = mean / sigma
    return symmetric, direct, h, normal_cdf_torch(h)


def _relu_mean_variance(mean: torch.Tensor, sigma: torch.Tensor):
    """(E[relu(z)], Var[relu(z)]) per variable: the generated kernel (Theorem 1)."""
    return K.relu_mean_variance(mean, sigma, validate=False)


def _covariance_direct(h, k, s1, s2, rho, ph, pk):
    """``relu_cross_covariance(m1, m2, s1, s2, rho, validate=False)`` from h = μ1/σ1, k = μ2/σ2
    and Φ(h), Φ(k) (evaluated once per variable, gathered per pair) for σ1, σ2 > 0 (every
    element) and tensors of one shape, dtype and device, without the generated wrapper's
    broadcast and case masks: σ1σ2 C(h, k, ρ) by the same runtime call (bit for bit the
    wrapper's value there)."""
    return s1 * s2 * K._relu_cov(h, k, rho, cdf=(ph, pk))


def _correlation(cij: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """ρ = cij/(σiσj) in [−1, 1]; within 4 eps of ±1 it is ±1 (σ = √Σii rounds, so a
    duplicated variable gives 1 − 2⁻⁵² instead of 1); 0 where σiσj = 0."""
    denom = s1 * s2
    if not (torch.is_grad_enabled() and cij.requires_grad) and not sync_free(cij):
        # eager CPU without autograd: the same values in fewer passes over the pairs
        rho = cij.div(denom).clamp_(-1.0, 1.0)
        pos = denom > 0
        if not bool(pos.all()):
            rho.masked_fill_(~pos, 0.0)
        near = rho.abs() >= 1.0 - 4.0 * torch.finfo(rho.dtype).eps
        return torch.where(near, rho.sign(), rho) if bool(near.any()) else rho
    pos = denom > 0
    rho = torch.where(pos, cij / torch.where(pos, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    near = rho.detach().abs() >= 1.0 - 4.0 * torch.finfo(rho.dtype).eps
    return torch.where(near, rho.detach().sign() + (rho - rho.detach()), rho)


def _pair_rho(si, sj, sigma, cflat, p: int, symmetric: bool):
    """(σiσj, ρ) of the pairs (si, sj) inside a compiled pass: ``_correlation``'s eager
    formula for σ > 0 (the same values); ``symmetric``: Σ_ij read as is, else (Σ_ij + Σ_ji)/2.
    The one formula of ``_pair_front`` and ``_one_pass``."""
    denom = sigma[si] * sigma[sj]
    cij = cflat[si * p + sj] if symmetric else 0.5 * (cflat[si * p + sj] + cflat[sj * p + si])
    return denom, _rho_of(cij, denom)


def _rho_of(cij: torch.Tensor, denom: torch.Tensor) -> torch.Tensor:
    """ρ = cij/denom in [−1, 1], ±1 within 4 eps of it, for denom = σiσj > 0 inside a compiled
    pass (``_correlation``'s eager formula there: the same values)."""
    rho = (cij / denom).clamp(-1.0, 1.0)
    near = rho.abs() >= 1.0 - 4.0 * torch.finfo(rho.dtype).eps
    return torch.where(near, rho.sign(), rho)


def _pair_front(si, sj, sigma, cflat, h, cdf, p: int, symmetric: bool):
    """(σiσj, ρ, h_i, h_j, the direct route's fields, whether some ρ is 1) of the pairs
    (si, sj) in one pass (compiled by ``_fused_front``): the gathers of
    ``_pair_covariances``' direct path and ``_correlation``'s eager formula for σ > 0 (the
    same values), and the direct route's group key and ρΦ(h_i)Φ(h_j) (``direct_front``: one
    pass fewer); ``symmetric``: Σ_ij is read as is, else symmetrised on the pairs,
    (Σ_ij + Σ_ji)/2, as there."""
    denom, rho = _pair_rho(si, sj, sigma, cflat, p, symmetric)
    hi, hj = h[si], h[sj]
    key, base = direct_front(hi, hj, rho, cdf[si], cdf[sj])
    return denom, rho, hi, hj, key, base, (rho == 1.0).any()


def _fused_front(mean: torch.Tensor, cov: torch.Tensor, shared: _Shared, method: str):
    """The compiled ``_pair_front`` where the compiled bulk is on and the direct path applies
    to one (unbatched) problem; else None."""
    if method != "exact" or not shared.direct or mean.ndim != 1:
        return None
    return compiled(mean, f"pair_front{shared.symmetric}", _pair_front)


def _pair_covariances(
    mean: torch.Tensor,
    cov: torch.Tensor,
    sigma: torch.Tensor,
    rmean: torch.Tensor,
    method: str,
    terms: int,
    i: torch.Tensor,
    j: torch.Tensor,
    nd: int,
    shared: _Shared | None = None,
) -> torch.Tensor:
    """Cov[relu(z_i), relu(z_j)] for index pairs i <= j in the ``_pair_blocks_nd`` layout:
    strict pairs first, then the last ``nd`` diagonal pairs (their value is the ReLU variance,
    so the cross kernel runs on the strict pairs only); ``cov`` comes flattened
    (``batch_shape x p·p``). ``shared``: the per-call quantities of ``_shared`` (computed here
    when None).
    """
    if shared is None:
        shared = _shared(mean, cov.unflatten(-1, (sigma.shape[-1],) * 2), sigma)
    ns = i.shape[-1] - nd
    si, sj, dg = i[:ns], j[:ns], i[ns:]
    front = _fused_front(mean, cov, shared, method)
    if front is not None:  # the compiled bulk: gathers and ρ in one pass
        s12, rho, m1, m2, key, base, one = front(
            si, sj, sigma, cov, shared.h, shared.cdf, sigma.shape[-1], shared.symmetric
        )
        # the strict pairs' values and the diagonal written into one buffer (no cat)
        out = s12.new_empty(i.shape[-1])
        c_std = K._relu_cov(m1, m2, rho, cdf=DirectFront(key, base))
        off = torch.mul(s12, c_std, out=out[:ns])
        if bool(one):  # as below: a duplicated variable's Cov is its variance
            s1, s2 = sigma.index_select(-1, si), sigma.index_select(-1, sj)
            dup = (rho == 1.0) & (mean.index_select(-1, si) == mean.index_select(-1, sj))
            off.copy_(torch.where(dup & (s1 == s2), shared.var.index_select(-1, si), off))
        torch.index_select(shared.var, -1, dg, out=out[ns:])
        return out
    # gathers along the last dimension by ``index_select``: ``x[..., si]`` (advanced indexing)
    # took 2.3 ms vs 0.34 ms for p = 1024's 523,776 pairs
    p = sigma.shape[-1]
    s1, s2 = sigma.index_select(-1, si), sigma.index_select(-1, sj)
    upper = cov.index_select(-1, si * p + sj)
    if shared.symmetric:  # Σ_ij = Σ_ji exactly: the symmetrised value is Σ_ij itself
        cij = upper
    else:
        # the symmetrised Σ_ij (so the gradient w.r.t. cov is symmetric; exactly cov for
        # symmetric input), formed on the pairs instead of on the p×p matrix
        cij = 0.5 * (upper + cov.index_select(-1, sj * p + si))
    rho = _correlation(cij, s1, s2)
    if method == "zero_mean":  # Theorem 2: the mean of z is ignored (taken as 0)
        e = K.relu_cross_moment_zero_mean(s1, s2, rho, validate=False)
        m0 = 0.3989422804014327 * sigma  # E[relu(z)] = σ/√(2π) at zero mean (Remark 1)
        off = e - m0.index_select(-1, si) * m0.index_select(-1, sj)
        var = K.relu_variance(torch.zeros_like(sigma), sigma, validate=False)
    else:
        if method == "exact" and shared.direct:
            kern = _covariance_direct
            # h, k: μ/σ gathered, not divided; Φ(h), Φ(k) gathered
            m1, m2 = (shared.h.index_select(-1, v) for v in (si, sj))
            extra = tuple(shared.cdf.index_select(-1, v) for v in (si, sj))
        else:
            kern = _cross_kernel(method, terms)
            m1, m2 = mean.index_select(-1, si), mean.index_select(-1, sj)
            extra = ()
        # "exact" slices its own bulk and runs its later routes once per call (so once per
        # ``chunk``); the series kernels are straight-line passes: cache-sized slices here
        size = _KERNEL_SLICE if method == "exact" else _SERIES_SLICE
        if ns <= size:
            e = kern(m1, m2, s1, s2, rho, *extra)
        else:  # cache-sized slices: the kernel's many elementwise passes stay in cache
            e = torch.cat(
                [
                    kern(*(v[..., a : a + size] for v in (m1, m2, s1, s2, rho, *extra)))
                    for a in range(0, ns, size)
                ],
                dim=-1,
            )
        if method == "exact":
            off = e
        else:
            off = e - rmean.index_select(-1, si) * rmean.index_select(-1, sj)
        var = shared.var
        # a duplicated variable (same mean and variance, ρ = 1) has Cov = its variance exactly
        one = rho.detach() == 1.0
        if sync_free(rho) or bool(one.any()):  # eager CPU: skipped where no ρ is 1
            dup = one & (mean.index_select(-1, si) == mean.index_select(-1, sj)) & (s1 == s2)
            off = torch.where(dup, var.index_select(-1, si), off)
    return torch.cat([off, var.index_select(-1, dg)], dim=-1)


def _one_pass(up, si, sj, sigma, cflat, h, cdf, p: int, rule: DirectPass):
    """One pass of ``_one_pass_bulk`` over the pairs (si, sj) in their own order (cov exactly
    symmetric, ``cflat`` its p·p values: Σ_ij read as is): ρ, h, k and
    ρΦ(h)Φ(k) as ``_pair_front`` forms them, C by ``rule.values`` for every pair (``wide``:
    on h, k, ρ in float64 arithmetic, ρΦ(h)Φ(k) from float64 Φ, as the general path
    re-evaluates float32's rejects), σiσj·C written to the places i·p + j of ``up`` (flat p·p,
    in place); returns where that value is not final (rejected, or outside ``rule.keep``) as
    int32 1. inductor stores a bool mask element by element (2.0 ms more per p = 1024 call in
    float64, 2.3 ms in float32, than uint8), and uint8 too was slower than int32: the whole
    compiled call, p = 1024, 1 thread, three rounds of separate processes alternating
    (medians of 21, CPU time): float32 21.2 / 19.8 / 20.9 → 19.7 / 19.3 / 18.8 ms, float64
    44.5 / 42.9 / 41.6 → 42.0 / 40.3 / 40.6 ms; wall time at 2 threads float32 14.4 / 13.3 /
    14.2 → 14.3 / 12.5 / 14.0 ms, float64 27.1 / 27.6 / 28.6 → 26.2 / 26.6 / 28.9 ms (the same
    values bit for bit; scratch ``/tmp/s30/ab.py``, ``abw.py``)."""
    s12, rho = _pair_rho(si, sj, sigma, cflat, p, True)
    hi, hj = h[si], h[sj]
    if rule.wide:
        hi, hj, rho = hi.double(), hj.double(), rho.double()
        c, ok = rule.values(hi, hj, rho)
    else:  # ρΦ(h)Φ(k) as ``direct_front``'s
        c, ok = rule.values(hi, hj, rho, rho * cdf[si] * cdf[sj])
    up.index_put_((si * p + sj,), s12 * c.to(s12.dtype))
    return (~(ok & rule.keep(hi, hj, rho))).to(torch.int32)


def _band_pass(out, cr, sr, sc, hr, hc, pr, pc, rule: DirectPass):
    """``_one_pass`` by ``rule`` (not ``wide``) on the pairs right of a band of the p×p matrix,
    rows [a, b) × columns [b, p), by broadcasting instead of gathers. ``out`` and ``cr``:
    rows [a, b) of the result and of cov (whole rows: contiguous; b = p − σ's columns; cov
    exactly symmetric, ``_one_pass_bulk``); σ, h and Φ(h) of the rows (sr, hr, pr) and of the
    columns (sc, hc, pc). σiσj·C written to ``out``'s columns [b, p) in place. Returns int32
    (b − a) × (p − b): 1 where that value is not final, as ``_one_pass``'s flags. The same formula in the same
    order as ``_one_pass`` (``_pair_rho``, ρΦ(h_i)Φ(h_j)): the same values bit for bit. Whole
    rows in, not 2-d views of the block: their strides and offsets did not trace."""
    b = out.shape[1] - sc.shape[0]
    s12 = sr[:, None] * sc[None, :]
    rho = _rho_of(cr[:, b:], s12)
    hi, hj = hr[:, None].expand_as(rho), hc[None, :].expand_as(rho)
    c, ok = rule.values(hi, hj, rho, rho * pr[:, None] * pc[None, :])
    out[:, b:].copy_(s12 * c.to(s12.dtype))
    return (~(ok & rule.keep(hi, hj, rho))).to(torch.int32)


def _one_pass_bulk(
    up: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
    chunk: int,
    symmetric: bool,
    team: Team | None = None,
) -> torch.Tensor | None:
    """``relu_moments``' exact covariance written straight into ``up`` (flat p·p: the whole
    matrix) where the compiled bulk applies to one unbatched problem with every
    σ > 0; returns E[relu(z)], or None (nothing written: the caller takes the general path).

    The strict pairs, in ranges of whole bands of ``PASS_BAND`` rows (at most about
    ``chunk`` pairs each), go through the compiled passes of ``direct_passes`` in their own
    order, each on the pairs the ones before left: no sort, no gathers into group order, no
    scatter back, no per-pair arrays. The first evaluates every pair by the rule of
    ``DIRECT_ONE_PASS`` (the pairs right of each band by ``_band_pass``, without gathers;
    those in its diagonal block by ``_one_pass``) and keeps the |ρ| groups that rule covers;
    the next (``_one_pass``) take the other groups, the wide one and the ρ < 0 tail route.
    The pairs still left take the general path (``_pair_covariances``, ``chunk`` pairs at a
    time); the diagonal is the ReLU variances. The passes write the upper triangle, mirrored
    once after all ranges (``_mirror_upper``); the general path writes both places. A cov
    that is not exactly symmetric is read through one symmetrised p×p copy (``_symmetrised``).

    ``team``: each band's first pass, the other passes of each range (``_run_rows``) and the
    mirror run on torch's OpenMP team at its thread count, settled here (default: 1 thread);
    the same values at any thread count."""
    p = mean.shape[-1]
    if mean.ndim != 1 or p < 2:
        return None
    passes = _pass_kernels(mean)
    if passes is None:
        return None
    sigma = _safe_sqrt(cov.diagonal())
    symmetric, direct, h, cdf = _pair_inputs(mean, cov, sigma, symmetric)
    if not direct:
        return None
    team = team or Team(1)
    team.settle()  # the load read again (a task counts where both reads saw it)
    if not symmetric:  # the passes read Σ_ij as is: a symmetrised copy (``_symmetrised``)
        with team.step():
            cov, symmetric = _symmetrised(cov), True
    cflat = cov.reshape(-1)
    args = (up, sigma, cflat, h, cdf, p)
    bands = _bands(p, PASS_BAND)
    run = functools.partial(_run_rows, passes, args, bands, team)
    # ranges of whole bands, at most about ``chunk`` pairs each (a memory bound)
    left = [run(a, b) for a, b in ranges(bands.starts[-1], bands.bounds, chunk)]
    with team.step():  # the upper triangle's mirror image, once all ranges wrote theirs
        _mirror_upper(up.view(p, p))
    # the ReLU means and variances: p elements, one fused kernel (0.9 ms eagerly in float32)
    moments = compiled_graph(mean, "relu_mean_variance", _relu_mean_variance)
    shared = _Shared(*(moments or _relu_mean_variance)(mean, sigma), symmetric, direct, h, cdf)
    up.view(p, p).diagonal().copy_(shared.var)  # the diagonal: the ReLU variances
    none = torch.zeros(0, dtype=torch.int64, device=mean.device)
    li = torch.cat([none, *(a for a, _ in left)])
    lj = torch.cat([none, *(b for _, b in left)])
    for a in range(0, li.numel(), max(chunk, 1)):  # the pairs left: the general path
        si, sj = li[a : a + chunk], lj[a : a + chunk]
        c = _pair_covariances(mean, cflat, sigma, shared.rmean, "exact", 5, si, sj, 0, shared)
        up.index_copy_(0, si * p + sj, c)
        up.index_copy_(0, sj * p + si, c)  # and their mirror image
    return shared.rmean


@functools.lru_cache(maxsize=4)
def _row_starts(p: int) -> tuple[int, ...]:
    """Where each row of the p×p strict upper triangle starts among its pairs, row-major (row
    r has p − 1 − r), then their count."""
    return (0, *itertools.accumulate(p - 1 - r for r in range(p)))


class _Bands(NamedTuple):
    """The strict upper-triangle pairs of a p×p matrix in bands of ``band`` rows, for
    ``_run_rows``: where each row starts among the pairs (``_row_starts``); ``bounds``: where
    each band ends among them (the ranges of ``pair_split.ranges`` end there: whole bands)."""

    p: int
    band: int
    starts: tuple[int, ...]
    bounds: tuple[int, ...]

    def rows(self, start: int, stop: int) -> tuple[int, int]:
        """The rows [a, b) whose strict pairs are [start, stop) (whole bands); the last row
        (no strict pair) with the range that ends the matrix."""
        b = bisect.bisect_left(self.starts, stop)
        return bisect.bisect_left(self.starts, start), self.p if stop == self.starts[-1] else b

    def split(self, a: int, b: int) -> tuple[tuple[int, int], ...]:
        """Rows [a, b) (a whole range) as bands [a2, b2) of ``band`` rows from a, the last
        taking up to two rows after it: the pairs right of a band are none or at least 3
        columns wide (a size 1 is a signature of its own, ``compiled_graph``)."""
        return _split(a, b, self.band)

    def diagonal_blocks(self, a: int, b: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(i, j): the strict pairs inside the diagonal blocks of the bands of rows [a, b)
        (the pairs ``_band_pass`` does not take), cached (a thread count makes the same
        ranges on every call)."""
        return _diagonal_blocks(a, b, self.band, torch.device(device))


@functools.lru_cache(maxsize=64)
def _split(a: int, b: int, band: int) -> tuple[tuple[int, int], ...]:
    """``_Bands.split``, cached by its rows and band."""
    out = []
    for a2 in range(a, b, band):
        out.append((a2, b if b - (a2 + band) <= 2 else a2 + band))
        if out[-1][1] == b:
            break
    return tuple(out)


@functools.lru_cache(maxsize=64)
def _diagonal_blocks(a: int, b: int, band: int, device: torch.device):
    """``_Bands.diagonal_blocks``, cached by its rows, band and device."""
    ij = [
        torch.triu_indices(b2 - a2, b2 - a2, 1, device=device) + a2 for a2, b2 in _split(a, b, band)
    ]
    return torch.cat([x[0] for x in ij]), torch.cat([x[1] for x in ij])


@functools.lru_cache(maxsize=4)
def _bands(p: int, band: int) -> _Bands:
    """``_Bands`` of p rows in bands of ``band``."""
    starts = _row_starts(p)
    ends = (starts[min(p, r)] for r in range(band, p + band, band))
    return _Bands(p, band, starts, tuple(sorted(set(ends))))


#: rows per band of the first compiled pass (``_band_pass``: rows [a, a + PASS_BAND) ×
#: columns [a + PASS_BAND, p); each band's diagonal block by the pass on pairs). The
#: measurements are in the README (session 39).
PASS_BAND = 128


def _run_rows(passes: _Passes, args: tuple, bands: _Bands, team: Team, start: int, stop: int):
    """The pairs [start, stop) (whole bands): the pairs right of each band through the first
    pass on bands (``_band_pass``), those in the bands' diagonal blocks through the first pass
    on pairs, the pairs they leave through the other passes in turn (``_run_passes``), all by
    the calling thread, into the upper triangle (``_one_pass_bulk`` mirrors it after). A pair
    the passes leave is written to both places later, by the general path. Returns the pairs
    left."""
    up, sigma, cflat, h, cdf, p = args
    full, cov = up.view(p, p), cflat.view(p, p)
    a, b = bands.rows(start, stop)
    li, lj = [], []
    with torch.no_grad():  # as ``_run_passes``
        for a2, b2 in bands.split(a, b):
            if b2 == p:
                continue
            rows, cols = slice(a2, b2), slice(b2, p)
            ins = (full[rows], cov[rows], sigma[rows], sigma[cols], h[rows])
            # watched: a load that comes after the team settled slows it down (``Team.step``)
            with team.step(("band pass", up.dtype), (b2 - a2) * (p - b2)):
                flag = passes.band(*ins, h[cols], cdf[rows], cdf[cols])
            # row a2 + r, column b2 + c of the flags' place r·(p − b2) + c (NumPy: one call
            # for what took four torch calls, about 30 µs per band)
            r, c = np.divmod(_left(flag.view(-1)).numpy(), p - b2)
            li.append(torch.from_numpy(r + a2))
            lj.append(torch.from_numpy(c + b2))
    with team.step():
        di, dj = _run_passes(passes.pairs[:1], args, *bands.diagonal_blocks(a, b, up.device))
        left = _run_passes(passes.pairs[1:], args, torch.cat([di, *li]), torch.cat([dj, *lj]))
    return left


def _mirror_rows(full: torch.Tensor, a: int, b: int) -> None:
    """Rows [a, b) of the strict upper triangle of each matrix of ``full`` (``batch_shape x p
    x p``) copied to their places (j, i) in the lower one, in place, in bands of
    ``MIRROR_BAND`` rows: a transposed copy of the band's columns right of it, then its own
    triangle. It writes only in columns [a, b), on rows from a on, and reads only rows
    [a, b): threads with other rows neither write the same places nor read what it writes.
    One float32 matrix goes through two contiguous copies per band instead (``MIRROR_STAGED``:
    the band's rows, then their transpose by torch's blocked transpose of a contiguous
    matrix); the same values, bit for bit."""
    staged = full.ndim == 2 and full.dtype == torch.float32
    band = MIRROR_STAGED if staged else MIRROR_BAND
    for a2 in range(a, b, band):
        b2 = min(b, a2 + band)
        if staged:
            full[b2:, a2:b2].copy_(full[a2:b2, b2:].contiguous().t().contiguous())
        else:
            full[..., b2:, a2:b2].copy_(full[..., a2:b2, b2:].mT)
        tri = full[..., a2:b2, a2:b2]
        tri.copy_(torch.where(_upper(b2 - a2, full.device), tri, tri.mT))


#: rows per band of ``_mirror_rows`` (a transposed copy of the band's columns right of
#: it, then its own triangle). On the 2-core Xeon of issue #13 (p = 1024, float64, 1 | 2
#: threads, means of two separate-process runs): 64 rows 0.0353 | 0.0253 s, 128: 0.0346 |
#: 0.0244 s, 256: 0.0344 | 0.0244 s, 512: 0.0361 | 0.0247 s, a whole range's rows: 0.0420 |
#: 0.0247 s; the compiled mirror after the passes (the general path's ``_mirrored``):
#: 0.0390 | 0.0281 s. Also the band of the compiled bulk's mirror (``_mirror_upper``).
MIRROR_BAND = 128
#: rows per band of ``_mirror_rows`` on one float32 matrix, whose band goes through two
#: contiguous copies (the second by torch's blocked transpose). Session 38, the 2-core AMD
#: EPYC, p = 1024, 1 thread, the whole mirror, medians of 21 (scratch ``/tmp/s38/mir4.py``):
#: float32 2.14 ms by the transposed copy in bands of 128, staged 1.37 ms in bands of 64,
#: 1.49 of 128, 1.96 of 256; float64 staged 2.88 / 2.64 / 3.46 ms against 2.43 (kept as it
#: was). ``relu_moments(..., compiled=True)`` in float32, medians of 41 interleaved calls
#: (``/tmp/s38/abC.py``): 14.39 → 13.63 ms at 1 thread, 10.07 → 9.81 ms at 2.
MIRROR_STAGED = 64


@functools.lru_cache(maxsize=64)
def _upper(n: int, device: torch.device) -> torch.Tensor:
    """n×n bool: the upper triangle, diagonal included."""
    return torch.ones(n, n, dtype=torch.bool, device=device).triu()


def _run_passes(passes: list, args: tuple, li: torch.Tensor, lj: torch.Tensor):
    """The pairs (li, lj) through ``passes`` in turn (``_pass_kernels``; ``args``: their
    arguments after the pairs), each on the pairs the ones before left; returns the pairs
    they all left."""
    up, sigma, cflat, h, cdf, _ = args
    # outside autograd here (``_pass_kernels``): without grad whatever the caller's mode, so
    # that a call under torch.no_grad() finds the same compiled passes (no recompile)
    with torch.no_grad():
        for run in passes:
            n = li.numel()
            # one pair goes in twice (its value written twice): size 1 is a signature of its
            # own (``compiled_graph``, as dynamo's specialization), and that kernel rounded a
            # pair's value 1 ulp off its value among other pairs
            ins = (li.repeat(2), lj.repeat(2)) if n == 1 else (li, lj)
            need = _left(run(up, *ins, sigma, cflat, h, cdf)[:n])
            li, lj = li.index_select(0, need), lj.index_select(0, need)
            if li.numel() == 0:
                break
    return li, lj


def _left(flag: torch.Tensor) -> torch.Tensor:
    """The indices where a pass's int32 flag (0 or 1, CPU, contiguous) is 1, by NumPy's
    nonzero on a bool view of the flags' low bytes (little-endian): NumPy's bool nonzero
    took 0.55 ms on p = 1024's 523,776 flags against 1.23 ms for ``torch.nonzero`` on the
    int32 flags (1 thread; scratch ``/tmp/s31/nz.py``). Elsewhere ``torch.nonzero``."""
    plain = flag.dtype == torch.int32 and flag.is_contiguous() and flag.device.type == "cpu"
    if sys.byteorder != "little" or not plain or flag.numel() == 0:
        return flag.nonzero().squeeze(1)
    low = flag.numpy().view(np.uint8)[::4].view(np.bool_)
    return torch.from_numpy(np.flatnonzero(low))


class _Passes(NamedTuple):
    """The compiled passes of ``direct_passes``: the first on the pairs right of a band
    (``_band_pass``), and each on pairs (``_one_pass``)."""

    band: Callable
    pairs: list


def _pass_kernels(like: torch.Tensor) -> _Passes | None:
    """``_Passes`` for ``like``'s dtype, or None where the compiled bulk does not apply
    (``torch_support.compiled``). Their indices are built by ``_one_pass_bulk`` (in range)."""
    runs = []
    rules = direct_passes(like.dtype == torch.float64)
    for rule, band in ((rules[0], True), *((r, False) for r in rules)):
        name = f"{rule.name}:{like.dtype}:{'band' if band else 'pairs'}"
        fn = _pass_fn(rule, band)
        run = compiled_graph(like, name, fn, indices_in_range=True, releases_gil=True)
        if run is None:
            return None
        runs.append(run)
    return _Passes(runs[0], runs[1:])


@functools.cache  # 7 rules (both dtypes) × on bands or pairs
def _pass_fn(rule: DirectPass, band: bool = False):
    """``_one_pass`` (``band``: ``_band_pass``) with its rule bound, under a code object of
    its own."""
    if band:

        def run(out, cr, sr, sc, hr, hc, pr, pc):  # tensors (``compiled_graph``)
            return _band_pass(out, cr, sr, sc, hr, hc, pr, pc, rule)

        return renamed(run, f"{rule.name}_band")

    def run(up, si, sj, sigma, cflat, h, cdf):  # tensors only (``compiled_graph``); p = σ's size
        return _one_pass(up, si, sj, sigma, cflat, h, cdf, sigma.shape[0], rule)

    return renamed(run, rule.name)


def relu_pair_covariances(
    mean: torch.Tensor,
    cov: torch.Tensor,
    method: str = "exact",
    terms: int = 5,
    chunk: int = DEFAULT_CHUNK,
    *,
    symmetric: bool | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (rmean, i, j, C_ij) over upper-triangle blocks of Cov[relu(z)] (no p×p tensor).

    ``rmean`` is E[relu(z)] (``batch_shape x p``); ``C_ij`` is ``batch_shape x pairs``.
    Inputs must already be validated. ``symmetric``: whether cov is known to be exactly
    symmetric (``check_full_covariance``'s result; None: tested here).
    """
    _check_method(method, terms)
    p = mean.shape[-1]
    sigma = _safe_sqrt(cov.diagonal(dim1=-2, dim2=-1))
    with _pair_threads():
        shared = _shared(mean, cov, sigma, symmetric)
    rmean = shared.rmean
    cflat = cov.flatten(-2)
    for i, j, nd in _pair_blocks_nd(p, chunk, mean.device):
        with _pair_threads():
            c = _pair_covariances(mean, cflat, sigma, rmean, method, terms, i, j, nd, shared)
        yield rmean, i, j, c


def relu_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    method: str = "exact",
    terms: int = 5,
    *,
    chunk: int = DEFAULT_CHUNK,
    check_psd: bool = True,
    compiled: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of relu(z), z ~ N(mean, cov).

    Args:
        mean: ``batch_shape x p`` tensor, float32 or float64, p >= 1.
        cov: ``batch_shape x p x p`` full covariance (always read as a matrix), symmetric and
            PSD within the tolerances of ``torchbridge.covariance``; same dtype and device.
            The batch shapes of mean and cov broadcast.
        method: "exact" | "series" | "zero_mean" (see module docstring).
        terms: number of series terms for "series" (any int >= 1).
            With "zero_mean" the covariance (diagonal included) is Theorem 2's, computed
            as if the mean were 0; the returned mean is still Theorem 1's.
        chunk: pairs evaluated at once (memory bound).
        check_psd: also run a Cholesky PSD check (O(p³); symmetry, finiteness and the
            diagonal are always checked). Nothing passed in is modified.
        compiled: run the exact covariance's bulk through ``torch.compile``
            (``nmruntime.torch_support.compiled_bulk``: for one unbatched problem, the pairs
            in a few fused passes in their own order (``_one_pass_bulk``), the few they
            leave by the other routes) where that
            applies (eager CPU tensors outside autograd; elsewhere, e.g. CUDA or
            ``requires_grad``, the call is the default one). The same values to a few eps
            (within the routes' accuracy: tests/test_pair_direct.py); the first call per
            process and dtype compiles (on a 2-core AMD EPYC: 96–179 s with inductor's
            disk cache empty, 3–6 s with it warm; ``nm bench floor --compiled`` reports
            it); needs a C++ compiler. Its steps (the checks' symmetry pass, each band of
            rows' passes, the mirror image) then run on torch's OpenMP team at torch's
            thread count less the CPUs other processes keep busy (read at the call's start,
            before the passes and after a band step that ran slow:
            ``torchbridge.pair_split.Team``; the same values at any count); the rest of the
            call on one thread. A cov that is not exactly symmetric is read through a
            symmetrised copy (p×p more memory; the same values).

    Returns:
        (out_mean ``batch_shape x p``, out_cov ``batch_shape x p x p``); out_cov is exactly
        symmetric and (methods "exact", "series") its diagonal is the exact ReLU variance.
        Differentiable by autograd.
    """
    _check_method(method, terms)
    bulk = compiled_bulk() if compiled else contextlib.nullcontext()
    with _pair_threads() as threads, bulk:  # the whole call, validation included (PAIR_THREADS)
        # the compiled bulk's steps on torch's OpenMP team (the load read a first time here)
        team = Team(threads if compiled and method == "exact" else 1)
        with team.step():  # the checks' symmetry pass, compiled with the bulk
            symmetric = _validate(mean, cov, check_psd)
        p = mean.shape[-1]
        batch = torch.broadcast_shapes(mean.shape[:-1], cov.shape[:-2])
        mean, cov = mean.expand(*batch, p), cov.expand(*batch, p, p)  # views, never written
        # written below: all of it by the compiled bulk, else the upper triangle and mirrored
        up = mean.new_empty(*mean.shape[:-1], p * p)
        bulk_args = (up, mean, cov, chunk, symmetric, team)
        rmean = _one_pass_bulk(*bulk_args) if method == "exact" else None
        if rmean is not None:  # the passes wrote both triangles
            return rmean, up.reshape(*mean.shape, p)
        pairs = relu_pair_covariances(mean, cov, method, terms, chunk, symmetric=symmetric)
        for rm, i, j, c in pairs:
            rmean = rm
            # in place on a fresh tensor (autograd records it): each upper-triangle value
            # (diagonal included) at (i, j); exactly symmetric: the lower triangle is the
            # upper one's mirror image (the places (j, i) are never written)
            up.index_copy_(-1, _flat_places(i, j, p), c)
        full = up.reshape(*mean.shape, p)
        return rmean, _mirrored(full)
