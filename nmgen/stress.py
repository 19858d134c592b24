"""Held-out random stress set for the relative-accuracy bars (issue #10).

``nmgen stress`` draws seeded random points (μ/σ from −38 to 1e8, |ρ| up to 1 with ±1 and
1 − 10⁻ᵈ, σ from 1e-3 to 1e3), evaluates the pair kernels (``relu_cross_moment``,
``relu_cross_covariance``) and the one-variable kernels (``relu_mean``,
``relu_second_moment``, ``relu_variance``) in both backends at float64 and float32 (float32
runs use the float32-rounded points and references computed at those points), and reports per
kernel, backend and dtype the max relative error where the reference is a normal number
(float64 ≥ 1e-300, float32 ≥ 1e-35), the worst point, and the count of negative/NaN values
of positive quantities and of covariances whose sign differs from ρ's.

The pair references are independent of the kernels' ρ-integral forms: Rosenbaum's closed
form for E[relu x1 · relu x2] with Φ2 by mpmath quadrature of its definition
(``bvn_cdf_mp``), and C = E − m(h)m(k), each at two working precisions (``DPS_LO``,
``DPS_HI`` digits); a point whose two values differ by more than 1e-20 relative is listed as
uncertified and not counted. The one-variable references are the tail-factored quadratures
of ``derivations/reference.py`` (certified by their own error estimates).
"""

from __future__ import annotations

import math
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import mpmath as mp
import numpy as np

from nmgen.derivations.reference import (
    ReferenceError,
    relu_mean_ref,
    relu_second_moment_ref,
    relu_variance_ref,
    standard_pair_closed_form,
)

DPS_LO, DPS_HI = 40, 55
NORMAL = {"float64": 1e-300, "float32": 1e-35}
PAIR_KERNELS = ("relu_cross_moment", "relu_cross_covariance")
SINGLE_KERNELS = ("relu_mean", "relu_second_moment", "relu_variance")
POSITIVE = {"relu_cross_moment", "relu_mean", "relu_second_moment", "relu_variance"}


def draw_points(
    n: int, seed: int, pow2_sigma: bool = False
) -> list[tuple[float, float, float, float, float]]:
    """``n`` seeded points (μ1, μ2, σ1, σ2, ρ): h = μ/σ from a mixture of [−38, 10] (half),
    the deep tail [−38, −10], log-uniform [1, 1e8] and [−3, 3]; ρ uniform on (−1, 1) (40%),
    ±(1 − 10^−U(1, 8)) (30%), ±U(0.9, 1) (20%), ±1 (10%); σ log-uniform on [1e-3, 1e3], or
    with ``pow2_sigma`` rounded to a power of 2 (then μ/σ is exact in floating point and the
    error excludes the rounding of μ/σ, whose condition number is ≈ h²)."""
    rng = np.random.default_rng(seed)

    def draw_h() -> float:
        u = rng.uniform()
        if u < 0.5:
            return float(rng.uniform(-38.0, 10.0))
        if u < 0.7:
            return float(rng.uniform(-38.0, -10.0))
        if u < 0.85:
            return float(10.0 ** rng.uniform(0.0, 8.0))
        return float(rng.uniform(-3.0, 3.0))

    def draw_rho() -> float:
        u, sign = rng.uniform(), float(rng.choice([-1.0, 1.0]))
        if u < 0.4:
            return float(rng.uniform(-1.0, 1.0))
        if u < 0.7:
            return sign * (1.0 - 10.0 ** -rng.uniform(1.0, 8.0))
        if u < 0.9:
            return sign * float(rng.uniform(0.9, 1.0))
        return sign

    pts = []
    for _ in range(n):
        h, k, r = draw_h(), draw_h(), draw_rho()
        s1, s2 = (float(10.0 ** rng.uniform(-3.0, 3.0)) for _ in range(2))
        if pow2_sigma:
            s1, s2 = (2.0 ** round(math.log2(v)) for v in (s1, s2))
        pts.append((h * s1, k * s2, s1, s2, r))
    return pts


def pair_reference(pt: tuple) -> tuple[float, float] | None:
    """(E[relu x1 relu x2], Cov[relu x1, relu x2]) at ``pt`` as floats, None if the two
    precisions disagree beyond 1e-20 relative (uncertified)."""
    m1, m2, s1, s2, r = pt
    with mp.workdps(DPS_HI + 30):
        h, k = mp.mpf(m1) / mp.mpf(s1), mp.mpf(m2) / mp.mpf(s2)
        scale = mp.mpf(s1) * mp.mpf(s2)
    lo = standard_pair_closed_form(h, k, r, DPS_LO)
    hi = standard_pair_closed_form(h, k, r, DPS_HI)
    out = []
    with mp.workdps(DPS_HI):
        for a, b in zip(lo, hi, strict=True):
            if abs(a - b) > mp.mpf(10) ** -20 * abs(b):
                return None
            out.append(float(b * scale))
    return out[0], out[1]


def single_reference(pt: tuple) -> tuple[float, float, float] | None:
    """(mean, second moment, variance) of relu(μ1 + σ1 Z), None where uncertified."""
    m1, _, s1, _, _ = pt
    try:
        return tuple(
            float(f(m1, s1)) for f in (relu_mean_ref, relu_second_moment_ref, relu_variance_ref)
        )
    except ReferenceError:
        return None


def _references(pts: Sequence[tuple], jobs: int) -> tuple[list, list]:
    if jobs > 1:
        ctx = multiprocessing.get_context("fork")
        with ProcessPoolExecutor(jobs, mp_context=ctx) as ex:
            pair = list(ex.map(pair_reference, pts, chunksize=2))
            single = list(ex.map(single_reference, pts, chunksize=2))
        return pair, single
    return [pair_reference(p) for p in pts], [single_reference(p) for p in pts]


def _evaluate(name: str, backend: str, dtype: str, cols: list[np.ndarray]) -> np.ndarray:
    if backend == "numpy":
        from nmgen.generated import numpy_kernels as mod

        return np.asarray(getattr(mod, name)(*[c.astype(dtype) for c in cols]), dtype=np.float64)
    import torch

    from nmgen.generated import torch_kernels as mod

    tdt = {"float64": torch.float64, "float32": torch.float32}[dtype]
    out = getattr(mod, name)(*[torch.tensor(c, dtype=tdt) for c in cols])
    return out.detach().double().numpy()


@dataclass
class StressRow:
    kernel: str
    backend: str
    dtype: str
    points: int
    max_rel_err: float
    worst_point: str
    bad_sign: int
    uncertified: int


def run(
    n: int = 200, seed: int = 20261130, jobs: int | None = None, pow2_sigma: bool = False
) -> list[StressRow]:
    """Rows (kernel, backend, dtype) of the stress set's relative errors (``draw_points``)."""
    jobs = jobs or os.cpu_count() or 1
    base = draw_points(n, seed, pow2_sigma)
    rows = []
    for dtype in ("float64", "float32"):
        pts = np.array(base, dtype=np.float64)
        if dtype == "float32":
            pts = pts.astype(np.float32).astype(np.float64)
        tuples = [tuple(float(v) for v in p) for p in pts]
        pair, single = _references(tuples, jobs)
        for names, refs, ncols in ((PAIR_KERNELS, pair, 5), (SINGLE_KERNELS, single, 2)):
            keep = [i for i, r in enumerate(refs) if r is not None]
            cols = [pts[keep, 0], pts[keep, 1], pts[keep, 2], pts[keep, 3], pts[keep, 4]]
            cols = cols if ncols == 5 else [cols[0], cols[2]]
            for j, name in enumerate(names):
                ref = np.array([refs[i][j] for i in keep])
                for backend in ("numpy", "torch"):
                    got = _evaluate(name, backend, dtype, cols)
                    normal = np.abs(ref) >= NORMAL[dtype]
                    err = np.where(np.isfinite(got), np.abs(got - ref), np.inf)
                    rel = np.where(normal, err / np.where(normal, np.abs(ref), 1.0), 0.0)
                    if name in POSITIVE:
                        bad = (got < 0) | np.isnan(got)
                    else:  # Cov has the sign of ρ (0 allowed only below the normal range)
                        bad = (got * cols[4] < 0) | np.isnan(got)
                    bad = bad | ((~normal) & (got * ref < 0))
                    w = int(np.argmax(rel)) if len(rel) else 0
                    where = ", ".join(f"{c[w]:.6g}" for c in cols) if len(rel) else ""
                    rows.append(
                        StressRow(
                            name,
                            backend,
                            dtype,
                            len(keep),
                            float(rel.max()) if len(rel) else 0.0,
                            f"({where})",
                            int(bad.sum()),
                            len(refs) - len(keep),
                        )
                    )
    return rows


def format_rows(rows: list[StressRow]) -> str:
    lines = [
        "| kernel | backend | dtype | points | max rel err | worst point (μ1, μ2, σ1, σ2, ρ) "
        "| negative/NaN/sign | uncertified |",
        "|" + "---|" * 8,
    ]
    for r in rows:
        lines.append(
            f"| {r.kernel} | {r.backend} | {r.dtype} | {r.points} | {r.max_rel_err:.2e} | "
            f"{r.worst_point} | {r.bad_sign} | {r.uncertified} |"
        )
    return "\n".join(lines)


def worst_points(n: int, seed: int, name: str, dtype: str, top: int = 10) -> list:
    """The ``top`` points of kernel ``name`` with the largest relative error (debugging)."""
    base = draw_points(n, seed)
    pts = np.array(base, dtype=np.float64)
    if dtype == "float32":
        pts = pts.astype(np.float32).astype(np.float64)
    tuples = [tuple(float(v) for v in p) for p in pts]
    idx = PAIR_KERNELS.index(name) if name in PAIR_KERNELS else SINGLE_KERNELS.index(name)
    fn = pair_reference if name in PAIR_KERNELS else single_reference
    out = []
    for t in tuples:
        ref = fn(t)
        if ref is None or abs(ref[idx]) < NORMAL[dtype]:
            continue
        cols = [np.array([v]) for v in (t if name in PAIR_KERNELS else (t[0], t[2]))]
        for backend in ("numpy", "torch"):
            got = float(_evaluate(name, backend, dtype, cols)[0])
            rel = abs(got - ref[idx]) / abs(ref[idx]) if math.isfinite(got) else math.inf
            out.append((rel, backend, t, got, ref[idx]))
    return sorted(out, reverse=True)[:top]
