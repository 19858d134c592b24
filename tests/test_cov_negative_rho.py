"""Covariance for ρ < 0 with h + k ≥ −4: the quadrature route in both backends (issue #10).

NumPy used its Owen's-T Φ2 (absolute accuracy) there: 1.2e-11 relative at the stress point
(μ1, μ2, σ1, σ2, ρ) = (8.391, −0.332, 1.494, 0.0483, −0.087) of `nmgen stress --n 60 --seed
31337`. References: Rosenbaum's closed form with Φ2 by quadrature of its definition at 60 digits
(``standard_pair_closed_form``), at the exact standardized inputs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from nmgen.derivations.reference import standard_pair_closed_form
from nmgen.generated import numpy_kernels as nk
from nmgen.generated import torch_kernels as tk


def _points(seed: int = 99, n: int = 14) -> list[tuple[float, float, float]]:
    """(h, k, ρ): the stress point's h, k and seeded held-out draws with h + k ≥ −4, ρ < 0,
    one of h, k in a tail (so Φ2 is small next to 1)."""
    rng = np.random.default_rng(seed)
    pts = [(8.391 / 1.494, -0.332 / 0.0483, -0.087)]
    while len(pts) < n:
        h = float(rng.uniform(3.0, 9.0)) * float(rng.choice([-1.0, 1.0]))
        k = float(rng.uniform(-9.0, 9.0))
        if h + k >= -4.0 and min(h, k) < -3.0:
            pts.append((h, k, float(-rng.uniform(0.01, 0.99))))
    return pts


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_covariance_negative_rho_relative(backend: str) -> None:
    worst = 0.0
    for h, k, r in _points():
        _, ref = standard_pair_closed_form(h, k, r, 60)
        if backend == "numpy":
            v = float(nk.relu_cross_covariance(h, k, 1.0, 1.0, r))
        else:
            v = float(
                tk.relu_cross_covariance(
                    *(torch.tensor(x, dtype=torch.float64) for x in (h, k)), 1.0, 1.0, r
                )
            )
        worst = max(worst, abs(v / float(ref) - 1.0))
    assert worst <= 1e-12, worst
