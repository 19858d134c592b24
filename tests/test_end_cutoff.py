"""The θ-integral's last end piece is cut where e^G is provably negligible (issue #10).

h, k of one sign (hk > 0) with ρ < 0 put a narrow bump of e^G at the start of the end part
(G falls off double-exponentially in v = −log cos θ); a rule spread to ``_V_MAX`` missed it:
the cross moment at (h, k, ρ) = (−0.3, −0.3, −0.99) was off by 6.6e-9 relative, (−0.5, −0.5,
−0.95) by 2.2e-10 (found by comparing `bivariate_normal_cdf` and the cross moment with
mpmath off the verify grid). References: mpmath quadratures of the definitions; points seeded, held out.
"""

import numpy as np
import pytest
import torch
from nmgen.derivations.reference import relu_cross_moment_ref, to_float
from nmgen.generated import numpy_kernels as nk
from nmgen.generated import torch_kernels as tk


def _points(n: int = 8, seed: int = 1130) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    pts = [(-0.3, -0.3, -0.99), (-0.5, -0.5, -0.95), (-0.3, -0.3, -0.5)]
    for _ in range(n):
        h = float(rng.uniform(-1.5, -0.05))
        pts.append((h, h * float(rng.uniform(0.7, 1.0)), float(-rng.uniform(0.3, 0.999))))
    return pts


POINTS = _points()


def _eval(kernel: str, backend: str, p) -> float:
    args = (p[0], p[1], 1.0, 1.0, p[2])
    if backend == "numpy":
        return float(getattr(nk, kernel)(*args))
    return float(getattr(tk, kernel)(*torch.tensor(args, dtype=torch.float64).unbind(0)))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cross_moment_same_sign_negative_rho(backend):
    worst = max(
        abs(
            _eval("relu_cross_moment", backend, p)
            / to_float(relu_cross_moment_ref(p[0], p[1], 1.0, 1.0, p[2], dps=30))
            - 1
        )
        for p in POINTS
    )
    assert worst <= 1e-12, worst
