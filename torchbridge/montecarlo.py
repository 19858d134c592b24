"""Monte Carlo estimates of the output moments of a network under Gaussian input."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["monte_carlo_moments"]

_DEFAULT_BATCH = 1000


def _as_tensor(value: object, like: torch.Tensor, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        t = value.detach()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        t = torch.tensor(float(value))
    else:
        raise TypeError(f"{name} must be a number or a torch.Tensor, got {type(value).__name__}")
    if not t.is_floating_point():
        t = t.to(torch.float64)
    return t.to(device=like.device, dtype=torch.float64)


def _noise_factor(cov: torch.Tensor, mean: torch.Tensor, eps: float) -> tuple[str, torch.Tensor]:
    """Classify ``cov`` and return ``(kind, factor)`` in float64.

    kind "scalar": factor is the std (0-dim); "diag": per-coordinate stds (n,);
    "full": a matrix L (n, n) with L L^T = cov. ``eps`` is the machine epsilon of the
    dtype ``cov`` was given in (sets the tolerance of the symmetry and PSD checks).
    """
    n = mean.numel()
    if torch.isnan(cov).any():
        raise ValueError("cov contains NaN")
    if not torch.isfinite(cov).all():
        raise ValueError("cov contains infinite values")
    if cov.numel() == 1 and cov.ndim == 0:
        if cov < 0:
            raise ValueError(f"isotropic variance must be >= 0, got {cov.item()}")
        return "scalar", cov.sqrt()
    if cov.numel() == n and (cov.ndim == 1 or cov.shape == mean.shape):
        if (cov < 0).any():
            raise ValueError(f"diagonal variances must be >= 0 (min {cov.min().item():.3g})")
        return "diag", cov.reshape(-1).sqrt()
    if cov.shape == (n, n):
        scale = cov.abs().max().clamp_min(1e-300)
        if not torch.allclose(cov, cov.T, rtol=0.0, atol=100 * eps * scale.item()):
            raise ValueError("covariance matrix is not symmetric")
        sym = 0.5 * (cov + cov.T)
        factor, info = torch.linalg.cholesky_ex(sym)
        if int(info) == 0:
            return "full", factor
        evals, evecs = torch.linalg.eigh(sym)
        tol = 10 * n * eps * evals.abs().max().clamp_min(1e-300)
        if evals.min() < -tol:
            raise ValueError(
                "covariance is not positive semi-definite "
                f"(min eigenvalue {evals.min().item():.6g})"
            )
        return "full", evecs * evals.clamp_min(0).sqrt()
    raise ValueError(
        f"cov of shape {tuple(cov.shape)} does not match mean of shape {tuple(mean.shape)} "
        f"(n = {n}): expected a scalar, ({n},) / {tuple(mean.shape)} diagonal variances or a "
        f"({n}, {n}) covariance matrix"
    )


def monte_carlo_moments(
    fn: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    cov: torch.Tensor | float,
    samples: int = 10_000,
    seed: int = 0,
    batch_size: int | None = None,
    full: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean and variance (or covariance) of ``fn(x)`` for ``x ~ N(mean, cov)``.

    Args:
        fn: maps a batch ``(b, *mean.shape)`` to ``(b, d)`` (extra trailing dims are flattened).
        mean: input mean, the model-input shape (e.g. ``(1, 28, 28)``) or ``(n,)``; its dtype
            (float32 or float64) and device are used for sampling and for ``fn``'s input.
        cov: a scalar (isotropic variance), ``n`` diagonal variances (shape ``(n,)`` or
            ``mean.shape``), or an ``(n, n)`` symmetric PSD covariance (sampled with its
            Cholesky factor; singular PSD matrices through an eigendecomposition).
        samples: number of samples (>= 2); seed: seeds a ``torch.Generator`` on mean's device.
        batch_size: samples per call of ``fn`` (default ``min(samples, 1000)``).
        full: return the ``(d, d)`` output covariance instead of the ``(d,)`` variances.

    Returns:
        ``(out_mean (d,), out_var (d,) or out_cov (d, d))`` in mean's dtype; the statistics are
        accumulated in float64 with a chunk-wise Welford/Chan update and are unbiased
        (divided by ``samples - 1``).
    """
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"mean must be a torch.Tensor, got {type(mean).__name__}")
    if mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mean must be float32 or float64, got {mean.dtype}")
    if mean.ndim == 0 or mean.numel() == 0:
        raise ValueError(f"mean must have at least one element and dimension, got {mean.shape}")
    if torch.isnan(mean).any():
        raise ValueError("mean contains NaN")
    if not torch.isfinite(mean).all():
        raise ValueError("mean contains infinite values")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
        raise ValueError(f"samples must be an int >= 2, got {samples!r}")
    if batch_size is None:
        batch_size = min(samples, _DEFAULT_BATCH)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")

    dtype, device = mean.dtype, mean.device
    cov_eps = torch.finfo(
        cov.dtype if isinstance(cov, torch.Tensor) and cov.is_floating_point() else torch.float64
    ).eps
    kind, factor = _noise_factor(_as_tensor(cov, mean, "cov"), mean, cov_eps)
    factor = factor.to(dtype)
    mu = mean.detach().reshape(-1)
    n = mu.numel()
    gen = torch.Generator(device=device).manual_seed(seed)

    count = 0
    acc_mean: torch.Tensor | None = None
    acc_m2: torch.Tensor | None = None
    d = -1
    while count < samples:
        b = min(batch_size, samples - count)
        z = torch.randn(b, n, generator=gen, dtype=dtype, device=device)
        if kind == "full":
            x = mu + z @ factor.T
        else:
            x = mu + z * factor
        with torch.no_grad():
            out = fn(x.reshape(b, *mean.shape))
        if not isinstance(out, torch.Tensor) or out.ndim < 1 or out.shape[0] != b:
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ValueError(f"fn must return a (batch, d) tensor with batch = {b}, got {shape}")
        out = out.detach().reshape(b, -1).to(torch.float64)
        if d == -1:
            d = out.shape[1]
        elif out.shape[1] != d:
            raise ValueError(f"fn output size changed between batches: {d} then {out.shape[1]}")
        if not torch.isfinite(out).all():
            raise ValueError("fn returned NaN or infinite values")
        # Chan et al. parallel update: merge (count, mean, M2) with the batch's statistics.
        b_mean = out.mean(dim=0)
        centred = out - b_mean
        b_m2 = centred.T @ centred if full else (centred * centred).sum(dim=0)
        if acc_mean is None or acc_m2 is None:
            acc_mean, acc_m2 = b_mean, b_m2
        else:
            total = count + b
            delta = b_mean - acc_mean
            acc_mean = acc_mean + delta * (b / total)
            corr = torch.outer(delta, delta) if full else delta * delta
            acc_m2 = acc_m2 + b_m2 + corr * (count * b / total)
        count += b
    assert acc_mean is not None and acc_m2 is not None
    return acc_mean.to(dtype), (acc_m2 / (samples - 1)).to(dtype)
