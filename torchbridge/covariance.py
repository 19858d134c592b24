"""How a Gaussian input covariance is read, and the checks it passes before it is used.

An input x ~ N(mean, Σ) with n coordinates takes its covariance in one of three kinds,
named by ``cov_kind``:

* ``"iso"``: Σ = s·I_n; ``cov`` holds the variance s (a Python number, or a tensor whose
  shape is a batch shape: one variance per batch element);
* ``"diag"``: Σ = diag(v); ``cov`` holds v, ``batch_shape x n``;
* ``"full"``: ``cov`` is Σ itself, ``batch_shape x n x n``.

Batch dimensions broadcast against the mean's. With ``cov_kind=None`` the kind is read from
the shape only where no other reading exists: a Python number or a 0-dim tensor is "iso";
otherwise each of "diag" and "full" whose batch dimensions broadcast *into* the mean's batch
shape is a candidate, and exactly one may remain. A batch of n means (n, n) with an (n, n)
``cov`` fits both "one shared full Σ" and "n diagonals", so it raises and asks for
``cov_kind`` (for n = 1 both readings are the same matrix: "full").

The user's Σ is validated as given, before anything maps it (e.g. A Σ Aᵀ):

* finite, and float32/float64;
* "iso"/"diag": every variance ≥ 0;
* "full": symmetric, |Σ_ij − Σ_ji| ≤ ``SYMMETRY_TOL``·eps·max_k Σ_kk per matrix (never
  symmetrised silently beyond that rounding level); diagonal ≥ 0; and (``check_psd``) positive
  semi-definite within rounding, λ_min(Σ) ≥ −``PSD_TOL``·n·eps·max_k Σ_kk, checked by a
  Cholesky factorization of Σ + that tolerance × I (eigenvalues only for the error message).

eps is the machine epsilon of the dtype Σ is checked in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Literal

import torch

from nmruntime.torch_support import compiled_graph

__all__ = [
    "COV_KINDS",
    "PSD_TOL",
    "SYMMETRY_TOL",
    "CovKind",
    "InputCovariance",
    "check_full_covariance",
    "read_covariance",
    "require_tensor",
]

CovKind = Literal["full", "diag", "iso"]
COV_KINDS: tuple[str, ...] = ("full", "diag", "iso")
#: Symmetry tolerance, in units of eps × (largest diagonal entry).
SYMMETRY_TOL = 100
#: PSD tolerance on the smallest eigenvalue, in units of n × eps × (largest diagonal entry).
PSD_TOL = 10
_FLOATS = (torch.float32, torch.float64)


def require_tensor(value: object, name: str) -> torch.Tensor:
    """``value`` if it is a float32/float64 ``torch.Tensor``; otherwise a TypeError naming it."""
    if not isinstance(value, torch.Tensor):
        kind = type(value).__module__.split(".")[0] + "." + type(value).__name__
        hint = " (convert it with torch.as_tensor)" if kind.startswith("numpy.") else ""
        if isinstance(value, (list, tuple)):
            hint = " (convert it with torch.tensor(..., dtype=torch.float64))"
        raise TypeError(
            f"{name} must be a torch.Tensor, got {kind.removeprefix('builtins.')}{hint}"
        )
    if value.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {value.dtype}; use torch.float32 or torch.float64")
    return value


@dataclass(frozen=True)
class InputCovariance:
    """A validated input covariance: ``kind`` and its ``value`` (see the module docstring).

    ``value`` is the user's tensor (a fresh one for a Python number), never modified;
    ``batch_shape`` is its batch shape (for "iso": the whole shape).
    """

    kind: str
    value: torch.Tensor
    batch_shape: torch.Size

    def project(self, A: torch.Tensor) -> torch.Tensor:
        """A Σ Aᵀ, ``batch_shape x p x p`` for A (p, n); the n×n Σ is never formed for
        "iso"/"diag". Symmetric up to rounding only; see ``AffineReLUAffine.hidden_gaussian``.
        """
        if self.kind == "iso":
            return self.value[..., None, None] * (A @ A.T)
        if self.kind == "diag":
            return (A * self.value[..., None, :]) @ A.T
        return A @ self.value @ A.T


def _shape(t: tuple[int, ...]) -> str:
    return str(tuple(t))


def _broadcasts_into(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        return tuple(torch.broadcast_shapes(shape, target)) == tuple(target)
    except RuntimeError:
        return False


def _broadcasts(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    try:
        torch.broadcast_shapes(shape, target)
    except RuntimeError:
        return False
    return True


def _infer_kind(cov: torch.Tensor, n: int, batch_shape: tuple[int, ...]) -> str:
    if cov.ndim == 0:
        return "iso"
    shape = tuple(cov.shape)
    candidates = []
    if cov.ndim >= 2 and shape[-2:] == (n, n) and _broadcasts_into(shape[:-2], batch_shape):
        candidates.append("full")
    if shape[-1] == n and _broadcasts_into(shape[:-1], batch_shape):
        candidates.append("diag")
    if len(candidates) == 1 or (candidates and n == 1):
        return candidates[0]
    if candidates:
        raise ValueError(
            f"cov of shape {_shape(shape)} with means of batch shape {_shape(batch_shape)} "
            f"(n = {n}) can be read as one {n}×{n} full covariance per batch element or as "
            f"{n} diagonal variances per batch element: pass cov_kind='full' or cov_kind='diag'"
        )
    raise ValueError(
        f"cov has shape {_shape(shape)}; for means of batch shape {_shape(batch_shape)} and "
        f"n = {n} expected a scalar (isotropic), (..., {n}) diagonal variances or a "
        f"(..., {n}, {n}) matrix (or pass cov_kind to state which)"
    )


def _check_shape(cov: torch.Tensor, kind: str, n: int, batch_shape: tuple[int, ...]) -> None:
    shape = tuple(cov.shape)
    if kind == "iso":
        ok, want, batch = True, "a scalar or a batch-shaped tensor of variances", shape
    elif kind == "diag":
        ok, want, batch = shape[-1:] == (n,), f"(..., {n})", shape[:-1]
    else:
        ok, want, batch = shape[-2:] == (n, n), f"(..., {n}, {n})", shape[:-2]
    if not ok:
        raise ValueError(f"cov with cov_kind={kind!r} must have shape {want}; got {_shape(shape)}")
    if not _broadcasts(batch, batch_shape):
        raise ValueError(
            f"cov has batch shape {_shape(batch)} (cov_kind={kind!r}), which does not broadcast "
            f"with the means' batch shape {_shape(batch_shape)}"
        )


def all_finite(x: torch.Tensor) -> bool:
    """Whether every element of ``x`` is finite: one sum (NaN and ±Inf make it non-finite)
    and, only where the sum is not finite (NaN, Inf, or an overflow of large finite values),
    the elementwise test. One pass without a temporary instead of two with a bool tensor."""
    x = x.detach()
    if x.numel() == 0 or math.isfinite(float(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


#: rows per band of ``exactly_symmetric``: each band's columns right of it against the
#: transposed rows below it, then its diagonal block. On the 2-core Xeon of issue #13 (p = 1024,
#: 1 thread, medians of 15): 2.39 ms in bands of 128 (2.56 ms of 64) against 7.11 ms for
#: ``torch.equal(c, c.mT)``, whose transposed operand is read column by column (float32: 2.21
#: vs 6.70 ms).
SYMMETRY_BAND = 128


def exactly_symmetric(c: torch.Tensor) -> bool:
    """Whether ``c`` (``batch_shape x n x n``) equals its transpose element for element, read
    in row bands of ``SYMMETRY_BAND`` (each element of the strict triangles once, against its
    mirror image in a block of whole cache lines). False where an entry is NaN."""
    n = c.shape[-1]
    for a in range(0, n, SYMMETRY_BAND):
        b = min(n, a + SYMMETRY_BAND)
        if not torch.equal(c[..., a:b, b:], c[..., b:, a:b].mT):
            return False
        if not torch.equal(c[..., a:b, a:b], c[..., a:b, a:b].mT):
            return False
    return True


#: rows per block of ``_positive_definite``'s blocked Cholesky factorization. On the 2-core
#: Xeon of issue #13 (torch 2.13 with MKL 2024.2, medians of 7–9), against
#: ``torch.linalg.cholesky_ex`` on the same matrix: float64 p = 1024 8.8 vs 22.5 ms (1 thread)
#: and 5.5 vs 12.5 ms (2 threads); p = 2048 68 vs 145 ms (1 thread); float32 p = 1024 5.7 vs
#: 19.0 ms. With the whole trailing square updated (not only its lower part) and the factor
#: written back: 11.1, 6.7, 90 and 6.7 ms. Blocks of 128 rows: 8.2, 5.2, 74 and 5.2 ms; of 64
#: and 512 rows slower still (whole-square updates, p = 1024, 1 thread: 12.6 and 15.5 ms
#: against 10.9 ms for 256).
CHOLESKY_BLOCK = 256


def _positive_definite(a: torch.Tensor) -> bool:
    """Whether every matrix of ``a`` (``batch_shape x n x n``, symmetric) has a Cholesky
    factor, i.e. is positive definite in floating point.

    One CPU matrix with n ≥ 2·``CHOLESKY_BLOCK``: a right-looking blocked factorization that
    keeps only the decision (``a`` is overwritten: each trailing part becomes its Schur
    complement). Per block of rows, ``torch.linalg.cholesky_ex`` of the diagonal block
    (stopping at the first without a factor), a triangular solve for the panel L21 = A21 L11⁻ᵀ
    below it and a matrix product per block column for A22 −= L21 L21ᵀ on and below the
    diagonal. The same test as one ``cholesky_ex`` call, in under half its time here (MKL's
    factorization runs far below its matrix product's speed; see ``CHOLESKY_BLOCK``).
    Otherwise one ``torch.linalg.cholesky_ex`` (``a`` unchanged)."""
    n = a.shape[-1]
    if a.ndim != 2 or a.device.type != "cpu" or n < 2 * CHOLESKY_BLOCK:
        _, info = torch.linalg.cholesky_ex(a)
        return not bool((info != 0).any())
    for k in range(0, n, CHOLESKY_BLOCK):
        e = min(n, k + CHOLESKY_BLOCK)
        low, info = torch.linalg.cholesky_ex(a[k:e, k:e])
        if int(info) != 0:
            return False
        if e < n:
            panel = torch.linalg.solve_triangular(low, a[e:, k:e].mT, upper=False).mT
            for j in range(e, n, CHOLESKY_BLOCK):
                f = min(n, j + CHOLESKY_BLOCK)
                a[j:, j:f].addmm_(panel[j - e :], panel[j - e : f - e].mT, alpha=-1.0)
    return True


def _symmetry_gap(c: torch.Tensor) -> torch.Tensor:
    """max |c − cᵀ| per matrix (``batch_shape``); NaN where c has a NaN."""
    return (c - c.transpose(-1, -2)).abs().amax((-2, -1))


def check_full_covariance(
    cov: torch.Tensor, check_psd: bool = True, name: str = "cov", check_finite: bool = False
) -> bool:
    """Raise ValueError unless ``cov`` (``batch_shape x n x n``, finite) is symmetric with a
    non-negative diagonal and (``check_psd``) PSD within the module's stated tolerances.
    ``check_finite``: first raise ValueError("<name> contains NaN or Inf") where an entry is
    not finite (with the compiled symmetry pass a finite gap max |c − cᵀ| proves it: an
    infinite or NaN entry makes its gap NaN or infinite; no separate pass then).

    Returns True where ``cov`` was found exactly symmetric (tested on CPU only: False on an
    accelerator or with n = 0, meaning "not known")."""
    c = cov.detach()
    n = c.shape[-1]
    if n == 0:
        return False
    fused = compiled_graph(c, "symmetry_gap", _symmetry_gap)  # the compiled bulk: one pass
    gap = None if fused is None else fused(c)
    if check_finite and (gap is None or not bool(torch.isfinite(gap).all())) and not all_finite(c):
        raise ValueError(f"{name} contains NaN or Inf")
    eps = torch.finfo(c.dtype).eps
    diag = c.diagonal(dim1=-2, dim2=-1)
    top = diag.abs().amax(-1).clamp_min(torch.finfo(c.dtype).tiny)[..., None, None]
    lim = SYMMETRY_TOL * eps * top
    if gap is not None:
        exact, bad = bool((gap == 0).all()), bool((gap > lim[..., 0, 0]).any())
    else:
        exact = c.device.type == "cpu" and exactly_symmetric(c)
        bad = not exact and bool((_symmetry_gap(c) > lim[..., 0, 0]).any())
    if bad:
        asym = (c - c.transpose(-1, -2)).abs()
        where = [int(v) for v in (asym > lim).nonzero()[0]]
        raise ValueError(
            f"{name} is not symmetric: |{name}[i, j] − {name}[j, i]| = "
            f"{float(asym[tuple(where)]):.3e} at (i, j) = {tuple(where[-2:])} exceeds "
            f"{SYMMETRY_TOL}·eps·max diagonal = {float((SYMMETRY_TOL * eps * top).amax()):.3e}; "
            "it is not symmetrised silently: pass (cov + cov.mT) / 2 if that is what you mean"
        )
    if bool((diag < 0).any()):
        where = [int(v) for v in (diag < 0).nonzero()[0]]
        raise ValueError(
            f"{name} is not positive semi-definite: negative variance "
            f"{float(diag[tuple(where)]):.6g} on its diagonal at {name}{(*where, where[-1])}"
        )
    if not check_psd:
        return exact
    zero_diag = (diag == 0).all(-1)  # PSD with a zero diagonal means the zero matrix
    zeros = bool(zero_diag.any())
    if zeros and bool((zero_diag & (c != 0).flatten(-2).any(-1)).any()):
        raise ValueError(
            f"{name} is not positive semi-definite: its diagonal is zero but not all its entries"
        )
    tol = PSD_TOL * n * eps * top
    shifted = c.clone(memory_format=torch.contiguous_format)  # Σ + tol·I, in one copy
    shifted.diagonal(dim1=-2, dim2=-1).add_(tol[..., 0])
    if zeros:  # zero matrices (PSD) get the identity: the tolerance would be subnormal there
        shifted[zero_diag] = torch.eye(n, dtype=c.dtype, device=c.device)
    if not _positive_definite(shifted):
        lam = torch.linalg.eigvalsh(c).amin(-1)
        rel = (lam / top[..., 0, 0]).amin()
        raise ValueError(
            f"{name} is not positive semi-definite: smallest eigenvalue {float(lam.amin()):.3e} "
            f"({float(rel):.3e} × its largest variance) is below the tolerance −{PSD_TOL}·n·eps"
            f"·max diagonal (n = {n}, eps = {eps:.2e})"
        )
    return exact


def read_covariance(
    cov: torch.Tensor | float,
    n: int,
    batch_shape: tuple[int, ...],
    like: torch.Tensor,
    cov_kind: CovKind | None = None,
    check_psd: bool = True,
) -> InputCovariance:
    """Read and validate the user's ``cov`` for inputs of n coordinates.

    Args:
        cov: a Python number (isotropic variance) or a float32/float64 tensor of the dtype and
            device of ``like``; see the module docstring for the shapes of each kind.
        n: number of input coordinates; batch_shape: the means' batch shape.
        like: a tensor of the dtype and device the covariance must have (a Python number is
            converted to it through float64, so 1e-50 and 1e300 survive in float64).
        cov_kind: "full" | "diag" | "iso", or None to read it from the shape where the shape
            allows a single reading.
        check_psd: run the O(n³) PSD check of a full Σ (symmetry, finiteness and the
            diagonal are always checked).

    Returns:
        The validated ``InputCovariance``; raises TypeError / ValueError naming ``cov`` or
        ``cov_kind`` otherwise.
    """
    if cov_kind is not None and cov_kind not in COV_KINDS:
        raise ValueError(f"cov_kind must be one of {COV_KINDS} or None; got {cov_kind!r}")
    if isinstance(cov, Real) and not isinstance(cov, bool) and not isinstance(cov, torch.Tensor):
        if cov_kind not in (None, "iso"):
            raise TypeError(
                f"cov is a Python number, which is an isotropic variance, but cov_kind="
                f"{cov_kind!r}: pass a tensor of shape (..., {n}) for 'diag' or "
                f"(..., {n}, {n}) for 'full'"
            )
        value = torch.tensor(float(cov), dtype=torch.float64).to(like.dtype).to(like.device)
        if not bool(torch.isfinite(value)):
            raise ValueError(f"cov = {cov!r} is not finite in {like.dtype}")
        if cov != 0 and abs(float(value)) < torch.finfo(like.dtype).tiny:
            raise ValueError(f"cov = {cov!r} underflows {like.dtype} (use float64)")
        cov = value
    else:
        cov = require_tensor(cov, "cov")
        if cov.dtype != like.dtype:
            raise TypeError(
                f"cov has dtype {cov.dtype} but the computation is in {like.dtype}; convert it "
                "(nothing is cast silently)"
            )
        if cov.device != like.device:
            raise ValueError(f"cov is on {cov.device} but the computation is on {like.device}")
    kind = _infer_kind(cov, n, batch_shape) if cov_kind is None else cov_kind
    _check_shape(cov, kind, n, batch_shape)
    c = cov.detach()
    if not all_finite(c):
        raise ValueError("cov contains NaN or Inf")
    if kind in ("iso", "diag"):
        if bool((c < 0).any()):
            raise ValueError(
                f"cov is not positive semi-definite: negative variance {float(c.amin()):.6g} "
                f"(cov_kind={kind!r})"
            )
        batch = cov.shape if kind == "iso" else cov.shape[:-1]
    else:
        check_full_covariance(cov, check_psd)
        batch = cov.shape[:-2]
    return InputCovariance(kind, cov, torch.Size(batch))
