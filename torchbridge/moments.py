"""Moments of relu(z), z ~ N(mean, cov), and of g(x) = B relu(Ax + c1) + c2.

Built only on the generated kernels (``nmgen.generated.torch_kernels``). The p×p ReLU
covariance is evaluated pair by pair on the upper triangle only (so the result is exactly
symmetric and costs half), in row blocks of at most ``chunk`` pairs, so a call that needs only
the output variance of g never holds more than O(p · block) temporaries.

Methods for the off-diagonal cross moments E[relu(z_i) relu(z_j)]:
- ``"exact"``: ``relu_cross_moment`` (closed form through the bivariate normal CDF; ours).
- ``"series"``: ``relu_cross_moment_series`` (Lemma 4 truncated to ``terms`` terms; the paper).
- ``"zero_mean"``: ``relu_cross_moment_zero_mean`` (Lemma 3 / Theorem 2: exact only when the
  mean is 0; for a non-zero mean it reproduces the paper's "old" variance, which ignores the
  mean: the covariance is that of relu(z − mean)).
The diagonal is always the exact ReLU variance (Lemma 1), and the output mean is always
Theorem 1 (exact for any mean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from nmgen.generated import torch_kernels as K

METHODS = ("exact", "series", "zero_mean")
DEFAULT_CHUNK = 1 << 20


def _check_method(method: str, terms: int) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    if method == "series" and not isinstance(terms, int):
        raise TypeError(f"terms must be an int; got {type(terms).__name__}")


def _safe_sqrt(v: torch.Tensor) -> torch.Tensor:
    """sqrt with a zero (not infinite) gradient at 0."""
    pos = v > 0
    return torch.where(pos, torch.sqrt(torch.where(pos, v, torch.ones_like(v))), 0.0)


def _validate(mean: torch.Tensor, cov: torch.Tensor, check_psd: bool) -> None:
    if mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mean has dtype {mean.dtype}; use float32 or float64")
    if cov.dtype != mean.dtype:
        raise TypeError(f"cov has dtype {cov.dtype} but mean has {mean.dtype}")
    p = mean.shape[-1]
    if cov.shape[-2:] != (p, p):
        raise ValueError(f"cov must be (..., {p}, {p}) for mean (..., {p}); got {tuple(cov.shape)}")
    if not bool(torch.isfinite(mean.detach()).all()):
        raise ValueError("mean contains NaN or Inf")
    c = cov.detach()
    if not bool(torch.isfinite(c).all()):
        raise ValueError("cov contains NaN or Inf")
    scale = c.diagonal(dim1=-2, dim2=-1).abs().amax(-1, keepdim=True).unsqueeze(-1) + 1e-300
    if bool(((c - c.transpose(-1, -2)).abs() > 1e-10 * scale).any()):
        raise ValueError("cov is not symmetric")
    if bool((c.diagonal(dim1=-2, dim2=-1) < 0).any()):
        raise ValueError("cov is not positive semi-definite: negative variance on its diagonal")
    if check_psd:
        tol = 1e-10 * c.diagonal(dim1=-2, dim2=-1).sum(-1).abs().amax().item()
        _, info = torch.linalg.cholesky_ex(c + tol * torch.eye(p, dtype=c.dtype, device=c.device))
        if bool((info != 0).any()):
            lam = torch.linalg.eigvalsh(c).amin().item()
            raise ValueError(f"cov is not positive semi-definite (min eigenvalue {lam:.3e})")


def _pair_blocks(p: int, chunk: int, device) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Upper-triangle index pairs (i <= j), in row blocks of about ``chunk`` pairs."""
    rows = max(1, chunk // max(p, 1))
    cols = torch.arange(p, device=device)
    for r0 in range(0, p, rows):
        r = torch.arange(r0, min(p, r0 + rows), device=device)
        ii, jj = torch.nonzero(cols[None, :] >= r[:, None], as_tuple=True)
        yield r[ii], jj


def _cross_kernel(method: str, terms: int) -> Callable:
    if method == "exact":
        return lambda m1, m2, s1, s2, r: K.relu_cross_moment(m1, m2, s1, s2, r)
    if method == "series":
        return lambda m1, m2, s1, s2, r: K.relu_cross_moment_series(m1, m2, s1, s2, r, terms)
    return lambda m1, m2, s1, s2, r: K.relu_cross_moment_zero_mean(s1, s2, r)


def _pair_covariances(
    mean: torch.Tensor, cov: torch.Tensor, sigma: torch.Tensor, rmean: torch.Tensor,
    method: str, terms: int, i: torch.Tensor, j: torch.Tensor,
) -> torch.Tensor:
    """Cov[relu(z_i), relu(z_j)] for index pairs i <= j (i == j gives the exact variance)."""
    s1, s2 = sigma[..., i], sigma[..., j]
    denom = s1 * s2
    pos = denom > 0
    rho = torch.where(pos, cov[..., i, j] / torch.where(pos, denom, 1.0), 0.0).clamp(-1.0, 1.0)
    m1, m2 = mean[..., i], mean[..., j]
    if method == "zero_mean":  # Theorem 2: the mean of z is ignored (taken as 0)
        e = K.relu_cross_moment_zero_mean(s1, s2, rho)
        m0 = 0.3989422804014327 * sigma  # E[relu(z)] = σ/√(2π) at zero mean (Remark 1)
        off = e - m0[..., i] * m0[..., j]
        var = K.relu_variance(torch.zeros_like(sigma), sigma)
    else:
        off = _cross_kernel(method, terms)(m1, m2, s1, s2, rho) - rmean[..., i] * rmean[..., j]
        _, var = K.relu_mean_variance(mean, sigma)
    return torch.where(i == j, var[..., i], off)


def relu_pair_covariances(
    mean: torch.Tensor, cov: torch.Tensor, method: str = "exact", terms: int = 5,
    chunk: int = DEFAULT_CHUNK,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Yield (rmean, i, j, C_ij) over upper-triangle blocks of Cov[relu(z)] (no p×p tensor).

    ``rmean`` is E[relu(z)] (``batch_shape x p``); ``C_ij`` is ``batch_shape x pairs``.
    Inputs must already be validated.
    """
    _check_method(method, terms)
    p = mean.shape[-1]
    sigma = _safe_sqrt(cov.diagonal(dim1=-2, dim2=-1))
    rmean, _ = K.relu_mean_variance(mean, sigma)
    for i, j in _pair_blocks(p, chunk, mean.device):
        yield rmean, i, j, _pair_covariances(mean, cov, sigma, rmean, method, terms, i, j)


def relu_moments(
    mean: torch.Tensor,
    cov: torch.Tensor,
    method: str = "exact",
    terms: int = 5,
    *,
    chunk: int = DEFAULT_CHUNK,
    check_psd: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and covariance of relu(z), z ~ N(mean, cov).

    Args:
        mean: ``batch_shape x p`` tensor, float32 or float64.
        cov: ``batch_shape x p x p`` symmetric PSD tensor, same dtype/device.
        method: "exact" | "series" | "zero_mean" (see module docstring).
        terms: number of series terms for "series" (1, 5, 10, 20 or 50).
            With "zero_mean" the covariance (diagonal included) is Theorem 2's, computed
            as if the mean were 0; the returned mean is still Theorem 1's.
        chunk: pairs evaluated at once (memory bound).
        check_psd: also run a Cholesky PSD check (O(p³); symmetry, finiteness and the
            diagonal are always checked).

    Returns:
        (out_mean ``batch_shape x p``, out_cov ``batch_shape x p x p``); out_cov is exactly
        symmetric and (methods "exact", "series") its diagonal is the exact ReLU variance.
        Differentiable by autograd.
    """
    _check_method(method, terms)
    _validate(mean, cov, check_psd)
    p = mean.shape[-1]
    out = mean.new_zeros(*mean.shape[:-1], p * p)
    rmean = None
    for rmean, i, j, c in relu_pair_covariances(mean, cov, method, terms, chunk):
        out[..., i * p + j] = c  # in-place on a fresh tensor: autograd records the copies
        out[..., j * p + i] = c
    return rmean, out.reshape(*mean.shape, p)
