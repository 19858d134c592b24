"""Elementwise building blocks of the pair routes (``nmruntime.relu_pair``,
``nmruntime.pair_direct``), one algorithm for NumPy and PyTorch: the ops namespaces
(``numpy_ops``, ``torch_ops``), Φ (``_ncdf``), masked or gathered branches (``_on``,
``o_where``, ``sync_free``) and the per-variant code objects that ``torch.compile`` needs
(``renamed``)."""

from __future__ import annotations

import math
import types
from types import SimpleNamespace

import numpy as np

_INV_2PI = 1.0 / (2.0 * math.pi)
_SQRT1_2 = math.sqrt(0.5)


def numpy_ops() -> SimpleNamespace:
    """Array operations of the NumPy backend (float64 throughout)."""
    import scipy.special as sc

    return SimpleNamespace(
        stop=lambda v: v,
        where=np.where,
        exp=np.exp,
        expm1=np.expm1,
        sqrt=np.sqrt,
        sin=np.sin,
        cos=np.cos,
        asin=np.arcsin,
        acos=np.arccos,
        log=np.log,
        sinh=np.sinh,
        cosh=np.cosh,
        asinh=np.arcsinh,
        abs=np.abs,
        minimum=np.minimum,
        maximum=np.maximum,
        clip=np.clip,
        erfc=_erfc_numpy,
        erf=sc.erf,
        erfcx=sc.erfcx,
        full_like=np.full_like,
        node=lambda v, like: np.asarray(v, dtype=like.dtype),
        matvec=lambda f, w: f @ w,
    )


def _erfc_numpy(x):
    """erfc for NumPy, down to the smallest subnormal: SciPy's (Cephes) erfc returns 0 above
    x ≈ 26.55 where the value is still a subnormal number (down to 4.9e-324 at x ≈ 27.2);
    there erfcx(x)·e^{−x²} instead (the rounding of x² moves the exponent by < 1e-13)."""
    import scipy.special as sc

    out = sc.erfc(x)
    big = np.asarray(x) > 26.0
    if big.any():
        out = np.where(big, sc.erfcx(x) * np.exp(-np.square(x)), out)
    return out


def _t(v, like):
    """``v`` as a tensor of ``like``'s dtype and device (Python floats included); a positive
    float below the dtype's smallest normal (the 1e-300 guards) becomes that normal, so a
    guard never rounds to 0 in float32."""
    import torch

    if isinstance(v, torch.Tensor):
        return v
    if isinstance(v, float) and 0.0 < v < torch.finfo(like.dtype).tiny:
        v = torch.finfo(like.dtype).tiny
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _tiny(v: float, like) -> float:
    """``v``, or the smallest normal of ``like``'s dtype if 0 < v is below it (a 1e-300 guard
    must not round to 0 in float32)."""
    import torch

    return max(v, torch.finfo(like.dtype).tiny) if 0.0 < v else v


def _tmin(a, b):
    """min(a, b); a Python-float ``b`` is a clamp bound (no tensor made: no host-to-device
    copy on an accelerator)."""
    import torch

    if isinstance(b, float):
        return torch.clamp(a, max=_tiny(b, a))
    return torch.minimum(a, _t(b, a))


def _tmax(a, b):
    """max(a, b); a Python-float ``b`` is a clamp bound (see ``_tmin``)."""
    import torch

    if isinstance(b, float):
        return torch.clamp(a, min=_tiny(b, a))
    return torch.maximum(a, _t(b, a))


def torch_ops() -> SimpleNamespace:
    """Tensor operations of the PyTorch backend (the input's dtype and device)."""
    import torch

    return SimpleNamespace(
        stop=torch.Tensor.detach,
        where=torch.where,
        exp=torch.exp,
        expm1=torch.expm1,
        sqrt=torch.sqrt,
        sin=torch.sin,
        cos=torch.cos,
        asin=torch.asin,
        acos=torch.acos,
        log=torch.log,
        sinh=torch.sinh,
        cosh=torch.cosh,
        asinh=torch.asinh,
        abs=torch.abs,
        minimum=_tmin,
        maximum=_tmax,
        clip=lambda x, lo, hi: _tmin(_tmax(x, lo), hi),
        erfc=torch.special.erfc,
        erf=torch.special.erf,
        erfcx=torch.special.erfcx,
        full_like=torch.full_like,
        node=lambda v, like: torch.as_tensor(v, dtype=like.dtype, device=like.device),
        matvec=lambda f, w: f @ w,
    )


def _ncdf(o, x):
    """Φ(x) = erfc(−x/√2)/2."""
    return 0.5 * o.erfc(x * -_SQRT1_2)


def normal_cdf_torch(x):
    """Φ(x) for a tensor, by the same formula as the pair routes (``_ncdf``): a caller that
    evaluates it once per variable and passes the gathered values as ``cdf`` to the torch
    binding's covariance gets the same bits."""
    return _ncdf(_torch_ops_cached(), x)


def sync_free(x) -> bool:
    """``nmruntime.torch_support.sync_free`` for tensors; False for NumPy arrays and scalars."""
    if isinstance(x, (np.ndarray, np.generic)):
        return False
    from nmruntime.torch_support import sync_free as torch_sync_free

    return torch_sync_free(x)


def _on(mask, fn, *args, safe: tuple, outputs: int = 0):
    """fn(*args) on the elements where ``mask`` holds (inputs of ``mask``'s shape), zeros
    elsewhere; ``outputs`` > 0: fn returns that many such arrays, and so does this.

    Eager CPU (and NumPy): gathering keeps each element to the pieces of its own branch (a
    ρ ≥ 0 pair never pays for the ρ < 0 integrals). ``sync_free``: masked arithmetic instead,
    fn on every element with the arguments replaced by the finite point ``safe`` outside
    ``mask`` (so neither values nor gradients of the discarded lanes can be NaN).
    """
    if sync_free(args[0]):
        masked = [o_where(mask, a, v) for a, v in zip(args, safe, strict=True)]
        vals = fn(*masked)
        if not outputs:
            return o_where(mask, vals, 0.0 * vals)
        return tuple(o_where(mask, v, 0.0 * v) for v in vals)
    outs = [0.0 * args[0] for _ in range(max(outputs, 1))]
    if mask.sum() != 0:
        vals = fn(*(a[mask] for a in args))
        for out, v in zip(outs, vals if outputs else (vals,), strict=True):
            out[mask] = v
    return tuple(outs) if outputs else outs[0]


def o_where(mask, a, b):
    """``where`` for tensors (with a Python-float ``b``) and arrays."""
    if isinstance(a, np.ndarray):
        return np.where(mask, a, b)
    import torch

    return torch.where(mask, a, b)


_TORCH_OPS: list = [None]  # torch_ops(), made outside compiled code (read by _closed_low)


def renamed(fn, name: str):
    """``fn`` under a code object of its own named ``name``: dynamo keys its cache (and its
    limit of 8 recompiles) on the code object, so a function compiled for several constants
    (rule sizes, flags) needs one code object per variant."""
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


#: The smallest normal number (float64, float32), keyed by "float64 or not" through eps.
_TINY_NORMAL = {True: 2.2250738585072014e-308, False: 1.1754943508222875e-38}


def _torch_ops_cached() -> SimpleNamespace:
    """``torch_ops()``, made once (outside compiled code)."""
    if _TORCH_OPS[0] is None:
        _TORCH_OPS[0] = torch_ops()
    return _TORCH_OPS[0]
