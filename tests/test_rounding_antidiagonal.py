"""Cross moment where μ1/σ1 + μ2/σ2 is a rounding residue (h = −k up to 1 ulp), ρ < 0.

Found on the paper's own Fig. 2 grid (`nm fig2`): (μ1, μ2, σ1, σ2) = (−1.2, 1.8, 0.8, 1.2)
gives h + k = 2.2e-16 in float64, and the exact kernel was off by 1e-5 relative at ρ = −0.1
(3e-5 at −0.5) while at h + k = 0 exactly it was right. The references are the mpmath
quadrature of the definition; the points are every such (μ, σ) combination of the grid
(held out: none was used to tune the kernel), at the grid's negative ρ.
"""

import numpy as np
import pytest
import torch
from nmgen.derivations.reference import relu_cross_moment_ref, to_float
from nmgen.generated import numpy_kernels as nk
from nmgen.generated import torch_kernels as tk


def _rounding_points() -> list[tuple[float, float, float, float]]:
    mu = np.round(np.arange(-2.0, 2.0001, 0.2), 10)
    sg = np.round(np.arange(0.2, 2.0001, 0.2), 10)
    pts = []
    for m1 in mu:
        for m2 in mu:
            for s1 in sg:
                for s2 in sg:
                    d = m1 / s1 + m2 / s2
                    if 0 < abs(d) < 1e-14 and m1 < 0:
                        pts.append((float(m1), float(m2), float(s1), float(s2)))
    return pts


POINTS = _rounding_points()
RHOS = (-0.1, -0.5, -0.7)


def test_the_grid_has_such_points():
    assert (-1.2, 1.8, 0.8, 1.2) in POINTS and len(POINTS) >= 4


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cross_moment_at_rounding_antidiagonal(backend: str) -> None:
    worst, where = 0.0, None
    for m1, m2, s1, s2 in POINTS[:6]:
        for r in RHOS:
            ref = to_float(relu_cross_moment_ref(m1, m2, s1, s2, r, dps=30))
            if backend == "numpy":
                v = float(nk.relu_cross_moment(m1, m2, s1, s2, r))
            else:
                t = torch.tensor([m1, m2, s1, s2, r], dtype=torch.float64)
                v = float(tk.relu_cross_moment(*t.unbind(0)))
            if abs(v / ref - 1.0) > worst:
                worst, where = abs(v / ref - 1.0), (m1, m2, s1, s2, r)
    assert worst <= 1e-12, (worst, where)
