"""Monte Carlo estimates of the output moments of a network under Gaussian input."""

from __future__ import annotations

from collections.abc import Callable

import torch

from torchbridge.covariance import CovKind, read_covariance, require_tensor

__all__ = ["monte_carlo_moments"]

_DEFAULT_BATCH = 1000


def _noise_factor(
    cov: torch.Tensor | float, mean: torch.Tensor, cov_kind: CovKind | None
) -> tuple[str, torch.Tensor]:
    """Validate ``cov`` for inputs shaped like ``mean``; return ``(kind, factor)`` in float64.

    kind "iso": factor is the std (0-dim); "diag": per-coordinate stds (n,); "full": a matrix
    L (n, n) with L Lᵀ = cov (Cholesky; an eigendecomposition for a singular PSD cov). cov is
    checked in its own dtype (a Python number: float64, never through float32), then the
    factor is computed in float64.
    """
    n = mean.numel()
    if isinstance(cov, torch.Tensor):
        require_tensor(cov, "cov")
        cov = cov.detach()
        if tuple(cov.shape) == tuple(mean.shape) and mean.shape != (n,) and cov_kind != "full":
            cov = cov.reshape(n)  # variances given in the input's own shape
        like = cov
    else:
        like = torch.empty((), dtype=torch.float64, device=mean.device)
    icov = read_covariance(cov, n, (), like, cov_kind)
    if icov.batch_shape != ():
        raise ValueError(
            f"cov has batch shape {tuple(icov.batch_shape)} (cov_kind={icov.kind!r}); "
            "monte_carlo_moments takes one covariance for its one mean"
        )
    value = icov.value.to(device=mean.device, dtype=torch.float64)
    if icov.kind == "iso":
        return "iso", value.sqrt()
    if icov.kind == "diag":
        return "diag", value.sqrt()
    sym = 0.5 * (value + value.T)  # rounding only: cov was checked symmetric
    factor, info = torch.linalg.cholesky_ex(sym)
    if int(info) == 0:
        return "full", factor
    evals, evecs = torch.linalg.eigh(sym)
    return "full", evecs * evals.clamp_min(0).sqrt()


def _factor_in(factor: torch.Tensor, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The float64 noise factor in mean's ``dtype``; ValueError if it overflows, or if a
    user-given standard deviation ("iso"/"diag") underflows to a subnormal or 0."""
    out = factor.to(dtype)
    if not bool(torch.isfinite(out).all()):
        raise ValueError(
            f"cov's standard deviations (up to {float(factor.abs().max()):.3e}) overflow mean's "
            f"dtype {dtype}; use a float64 mean"
        )
    lost = (factor != 0) & (out.abs() < torch.finfo(dtype).tiny) & (kind != "full")
    if bool(lost.any()):
        raise ValueError(
            f"cov's standard deviations (down to {float(factor[lost].abs().min()):.3e}) underflow "
            f"mean's dtype {dtype}; use a float64 mean"
        )
    return out


def monte_carlo_moments(
    fn: Callable[[torch.Tensor], torch.Tensor],
    mean: torch.Tensor,
    cov: torch.Tensor | float,
    samples: int = 10_000,
    seed: int = 0,
    batch_size: int | None = None,
    full: bool = False,
    *,
    cov_kind: CovKind | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Monte Carlo mean and variance (or covariance) of ``fn(x)`` for ``x ~ N(mean, cov)``.

    Args:
        fn: maps a batch ``(b, *mean.shape)`` to ``(b, d)`` (extra trailing dims are flattened).
        mean: input mean, the model-input shape (e.g. ``(1, 28, 28)``) or ``(n,)``; its dtype
            (float32 or float64) and device are used for sampling and for ``fn``'s input.
        cov: a Python number or 0-dim tensor (isotropic variance), ``n`` diagonal variances
            (shape ``(n,)`` or ``mean.shape``), or an ``(n, n)`` symmetric PSD covariance
            (sampled with its Cholesky factor; singular PSD matrices through an
            eigendecomposition); any float dtype, validated in its own dtype as in
            ``torchbridge.covariance`` and sampled with a factor computed in float64.
        samples: number of samples (>= 2); seed: seeds a ``torch.Generator`` on mean's device.
        batch_size: samples per call of ``fn`` (default ``min(samples, 1000)``).
        full: return the ``(d, d)`` output covariance instead of the ``(d,)`` variances.
        cov_kind: "iso" | "diag" | "full" states how ``cov`` is read; None reads it from the
            shape where only one reading exists (``torchbridge.covariance``).

    Nothing passed in is modified (``fn`` gets fresh samples).

    Returns:
        ``(out_mean (d,), out_var (d,) or out_cov (d, d))`` in mean's dtype; the statistics are
        accumulated in float64 with a chunk-wise Welford/Chan update and are unbiased
        (divided by ``samples - 1``).
    """
    require_tensor(mean, "mean")
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
    kind, factor = _noise_factor(cov, mean, cov_kind)
    factor = _factor_in(factor, kind, dtype)
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
