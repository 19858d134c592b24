"""``output_moments``: output mean and variance of a piecewise-linear PyTorch model under
Gaussian input, in one call, by layer-wise propagation, two-stage linearization or Monte Carlo.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from torchbridge.linearize import two_stage_linearize
from torchbridge.montecarlo import monte_carlo_moments
from torchbridge.propagate.engine import (
    PropagateOptions,
    model_dtype,
    propagate_one,
    resolve_relu,
)
from torchbridge.propagate.lowering import commute_relu_max_pool, trace

__all__ = ["METHODS", "MonteCarloOptions", "OutputMoments", "output_moments"]

METHODS = ("propagate", "linearize", "montecarlo")


@dataclass(frozen=True)
class MonteCarloOptions:
    """Monte Carlo settings: ``samples`` per input, split in ``groups`` independent groups
    (seeds ``seed``, ``seed + 1``, …) whose spread gives the standard errors."""

    samples: int = 10_000
    seed: int = 0
    groups: int = 10

    def __post_init__(self) -> None:
        for name in ("samples", "groups"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 2:
                raise ValueError(f"{name} must be an int >= 2; got {v!r}")
        if self.samples < 2 * self.groups:
            raise ValueError(
                f"samples ({self.samples}) must be at least 2 × groups ({self.groups})"
            )


@dataclass
class OutputMoments:
    """Output moments for a batch of B inputs, model output flattened to d values.

    ``mean`` (B, d); ``var`` (B, d); ``cov`` (B, d, d) when requested (``full=True``);
    ``mean_se`` / ``var_se`` (B, d): Monte Carlo standard errors (method "montecarlo" only);
    ``peak_elements``: the largest number of covariance elements held (method "propagate").
    Unpacks as ``mean, var = ...`` (or ``mean, cov`` with ``full=True``).
    """

    mean: torch.Tensor
    var: torch.Tensor
    cov: torch.Tensor | None = None
    mean_se: torch.Tensor | None = None
    var_se: torch.Tensor | None = None
    method: str = "propagate"
    peak_elements: int | None = None

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.mean, self.var if self.cov is None else self.cov))


def _cov_kind(cov: object, batch: int, n: int, in_shape: tuple[int, ...], like: torch.Tensor):
    """(kind, per-input getter) for an isotropic / diagonal / full / per-input ``cov``."""
    if isinstance(cov, (int, float)) and not isinstance(cov, bool):
        cov = torch.tensor(float(cov))
    if not isinstance(cov, torch.Tensor):
        raise TypeError(f"cov must be a number or a torch.Tensor; got {type(cov).__name__}")
    cov = cov.to(dtype=like.dtype, device=like.device)
    if not bool(torch.isfinite(cov).all()):
        raise ValueError("cov contains NaN or Inf")
    if cov.ndim == 0:
        if cov < 0:
            raise ValueError(f"cov (an isotropic variance) must be >= 0; got {cov.item()}")
        return "scalar", lambda b: cov
    if tuple(cov.shape) in ((n,), in_shape):
        if bool((cov < 0).any()):
            raise ValueError("cov (diagonal variances) has a negative entry")
        flat = cov.reshape(n)
        return "diag", lambda b: flat
    if tuple(cov.shape) == (n, n):
        return "full", lambda b: cov
    if tuple(cov.shape) == (batch, n, n):
        return "full", lambda b: cov[b]
    if tuple(cov.shape) == (batch, n):
        return "diag", lambda b: cov[b]
    raise ValueError(
        f"cov has shape {tuple(cov.shape)}; for mean {(batch, *in_shape)} expected a scalar, "
        f"({n},), {in_shape}, ({n}, {n}), ({batch}, {n}) or ({batch}, {n}, {n})"
    )


def _prepare(model: nn.Module, mean: torch.Tensor) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module; got {type(model).__name__}")
    if not isinstance(mean, torch.Tensor):
        raise TypeError(f"mean must be a torch.Tensor; got {type(mean).__name__}")
    if mean.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"mean has dtype {mean.dtype}; use float32 or float64")
    if mean.ndim < 2:
        raise ValueError(
            f"mean must be a batch (B, *input_shape) as the model takes it; got shape "
            f"{tuple(mean.shape)} (add a batch dimension: mean[None])"
        )
    if not bool(torch.isfinite(mean).all()):
        raise ValueError("mean contains NaN or Inf")
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device != mean.device:
            raise ValueError(f"model is on {t.device} but mean is on {mean.device}")
        break
    dt = model_dtype(model)
    if dt is not None and dt != mean.dtype:  # compute in the dtype of the input
        model = copy.deepcopy(model).to(mean.dtype)
    return model


def output_moments(
    model: nn.Module,
    mean: torch.Tensor,
    cov: torch.Tensor | float,
    *,
    method: str = "propagate",
    full: bool = False,
    relu_index: int | str = -1,
    options: PropagateOptions | MonteCarloOptions | None = None,
) -> OutputMoments:
    """Output mean and variance (or covariance) of ``model(x)``, x ~ N(mean, cov).

    Args:
        model: a piecewise-linear ``nn.Module`` (BatchNorm and Dropout in eval mode; any module
            ``torch.fx`` can trace: residual additions, functional relu/flatten, …).
        mean: ``(B, *input_shape)`` float32/float64, on the model's device; the model is run
            in this dtype (a float32 model is copied to float64 for float64 input).
        cov: a scalar (isotropic variance σ²), ``(n,)`` or ``input_shape`` (diagonal),
            ``(n, n)`` (full, shared by the batch), ``(B, n)`` or ``(B, n, n)`` (per input),
            n = numel of one input.
        method: "propagate" (layer-wise propagation with the exact ReLU kernels; options
            :class:`PropagateOptions`), "linearize" (two-stage linearization at the ReLU
            ``relu_index``: an index, a module path or a graph node name; paper Sec. 3.3;
            options: ``PropagateOptions.relu_method``) or "montecarlo" (options
            :class:`MonteCarloOptions`; returns standard errors).
        full: also return the ``(B, d, d)`` output covariance.
        relu_index: the ReLU of "linearize" (default -1: the last one, the paper's choice).
        options: per-method options (defaults when None).

    Returns:
        :class:`OutputMoments` (``mean, var = output_moments(...)``).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}; got {method!r}")
    model = _prepare(model, mean)
    batch, in_shape = mean.shape[0], tuple(mean.shape[1:])
    n = math.prod(in_shape)
    kind, cov_of = _cov_kind(cov, batch, n, in_shape, mean)
    if method == "montecarlo":
        opts = options if options is not None else MonteCarloOptions()
        if not isinstance(opts, MonteCarloOptions):
            raise TypeError("options for method 'montecarlo' must be a MonteCarloOptions")
        return _montecarlo(model, mean, cov_of, full, opts)
    opts = options if options is not None else PropagateOptions()
    if not isinstance(opts, PropagateOptions):
        raise TypeError(f"options for method {method!r} must be a PropagateOptions")
    if method == "linearize" and isinstance(model, nn.Sequential) and isinstance(relu_index, int):
        return _linearize_sequential(model, mean, cov_of, full, relu_index, opts)
    gm = commute_relu_max_pool(trace(model))
    exact = (lambda node: True) if method == "propagate" else _only(resolve_relu(gm, relu_index))
    means, second, peak = [], [], 0
    with torch.set_grad_enabled(opts.differentiable and torch.is_grad_enabled()):
        for b in range(batch):
            r = propagate_one(gm, mean[b : b + 1], cov_of(b), kind, opts, exact, full)
            means.append(r.mean)
            second.append(r.cov if full else r.var)
            peak = max(peak, r.peak_elements)
    m = torch.stack(means)
    s = torch.stack(second)
    var = s.diagonal(dim1=-2, dim2=-1) if full else s
    return OutputMoments(m, var, s if full else None, method=method, peak_elements=peak)


def _only(node):
    return lambda other: other is node


def _linearize_sequential(model, mean, cov_of, full, relu_index, opts) -> OutputMoments:
    """The paper's two-stage linearization (``two_stage_linearize``) of an nn.Sequential."""
    method = opts.relu_method if opts.relu_method != "approx" else "exact"
    means, second = [], []
    with torch.no_grad():
        for b in range(mean.shape[0]):
            g = two_stage_linearize(model, mean[b], relu_index)
            m, s = g.moments(mean[b].reshape(-1), cov_of(b), method=method, full=full)
            means.append(m)
            second.append(s)
    m, s = torch.stack(means), torch.stack(second)
    var = s.diagonal(dim1=-2, dim2=-1) if full else s
    return OutputMoments(m, var, s if full else None, method="linearize")


def _montecarlo(model, mean, cov_of, full, opts: MonteCarloOptions) -> OutputMoments:
    """Monte Carlo in ``groups`` independent groups: the pooled mean and (co)variance, and
    standard errors from the spread of the group estimates (no normality assumed)."""
    G = opts.groups
    sizes = [opts.samples // G + (1 if g < opts.samples % G else 0) for g in range(G)]
    out_m, out_s, m_se, v_se = [], [], [], []
    for b in range(mean.shape[0]):
        gm_, gs_ = [], []
        for g in range(G):
            m, s = monte_carlo_moments(
                model, mean[b], cov_of(b), samples=sizes[g], seed=opts.seed + g, full=full
            )
            gm_.append(m.double())
            gs_.append(s.double())
        gm, gs = torch.stack(gm_), torch.stack(gs_)
        k = torch.tensor(sizes, dtype=torch.float64, device=gm.device)
        N = k.sum()
        m = (k[:, None] * gm).sum(0) / N
        dm = gm - m
        shape = (-1, 1, 1) if full else (-1, 1)
        between = dm[:, :, None] * dm[:, None, :] if full else dm.square()
        s = (((k - 1).reshape(shape) * gs).sum(0) + (k.reshape(shape) * between).sum(0)) / (N - 1)
        gv = gs.diagonal(dim1=-2, dim2=-1) if full else gs
        out_m.append(m)
        out_s.append(s)
        m_se.append(gm.std(0) / math.sqrt(G))
        v_se.append(gv.std(0) / math.sqrt(G))
    dt = mean.dtype
    m = torch.stack(out_m).to(dt)
    s = torch.stack(out_s).to(dt)
    var = s.diagonal(dim1=-2, dim2=-1) if full else s
    return OutputMoments(
        m,
        var,
        s if full else None,
        torch.stack(m_se).to(dt),
        torch.stack(v_se).to(dt),
        method="montecarlo",
    )
