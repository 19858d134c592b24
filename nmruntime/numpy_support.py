"""Argument preparation for the generated NumPy kernels (no sympy, no mpmath)."""

from __future__ import annotations

import numpy as np

_FLOATS = (np.float32, np.float64)


def prepare(
    name: str,
    values: tuple,
    names: tuple[str, ...],
    kinds: tuple[str, ...],
    validate: bool = True,
):
    """Convert, type-check, broadcast and domain-check kernel arguments.

    Args:
        name: kernel name (for error messages).
        values: the raw arguments (array_like).
        names: argument names; kinds: "real" | "extreal" (±inf allowed) | "nonneg" | "corr"
            per argument.
        validate: check the values (finite, σ >= 0, |ρ| <= 1); False skips those checks
            (dtypes, devices and shapes are always checked): no data-dependent Python
            control flow, for hot loops and ``torch.compile``.

    Returns:
        tuple of ndarrays of one common float dtype (float32 only if every floating input is
        float32; Python numbers and integer arrays count as float64 unless all arrays are
        float32) and one broadcast shape.

    Raises:
        TypeError: an argument of an unsupported dtype (complex, float16, object, ...).
        ValueError: NaN or infinite values, a negative standard deviation, a correlation
            outside [-1, 1], or shapes that do not broadcast.
    """
    arrays = []
    float_dtypes = []
    for n, v in zip(names, values, strict=True):
        a = np.asarray(v)
        if a.dtype.kind in "biu":
            arrays.append((a.astype(np.float64), False))
            continue
        if a.dtype.type not in _FLOATS:
            raise TypeError(f"{name}: argument {n!r} has dtype {a.dtype}; use float32 or float64")
        arrays.append((a, not isinstance(v, float)))
        if not isinstance(v, float):
            float_dtypes.append(a.dtype)
    dtype = np.result_type(*float_dtypes) if float_dtypes else np.dtype(np.float64)
    cast = [a.astype(dtype, copy=False) for a, _ in arrays]
    try:
        out = np.broadcast_arrays(*cast)
    except ValueError:
        shapes = ", ".join(f"{n}{tuple(np.shape(a))}" for n, a in zip(names, cast, strict=True))
        raise ValueError(f"{name}: argument shapes do not broadcast: {shapes}") from None
    if not validate:
        return tuple(out)
    for n, a, kind in zip(names, out, kinds, strict=True):
        if kind == "extreal" and np.any(np.isnan(a)):
            raise ValueError(f"{name}: argument {n!r} contains NaN")
        if kind != "extreal" and not np.all(np.isfinite(a)):
            what = "NaN" if np.any(np.isnan(a)) else "an infinite value"
            raise ValueError(f"{name}: argument {n!r} contains {what}")
        if kind == "nonneg" and np.any(a < 0):
            raise ValueError(
                f"{name}: argument {n!r} is a standard deviation and must be >= 0; "
                f"got minimum {a.min()}"
            )
        if kind == "corr" and np.any(np.abs(a) > 1):
            raise ValueError(
                f"{name}: argument {n!r} is a correlation and must lie in [-1, 1]; "
                f"got max |{n}| = {np.abs(a).max()}"
            )
    return tuple(out)
