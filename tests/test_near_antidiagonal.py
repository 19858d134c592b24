"""Cross moment near h = −k with ρ < 0 (held-out seeded draws) against the mpmath oracle.

The θ-integral's end part has a cut-off at cos θ ≈ |h + k|; one Gauss–Legendre rule over it
gave 7e-5 relative error before the end part was split there (nmruntime/relu_pair.py).
"""

import numpy as np
import pytest
import torch
from nmgen.derivations.reference import relu_cross_moment_ref, to_float
from nmgen.generated import numpy_kernels as nk
from nmgen.generated import torch_kernels as tk


def _points(n: int = 12, seed: int = 20261130) -> list[tuple[float, float, float]]:
    rng = np.random.default_rng(seed)
    pts = []
    for _ in range(n):
        h = float(rng.uniform(-3, 3))
        pts.append((h, -h + float(rng.uniform(-0.3, 0.3)), float(rng.uniform(-0.99, -0.01))))
    return pts + [(0.7543370689272084, -0.7501275713610936, -0.7832460126576214)]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_cross_moment_near_antidiagonal_relative(backend: str) -> None:
    worst = 0.0
    for h, k, r in _points():
        ref = to_float(relu_cross_moment_ref(h, k, 1.0, 1.0, r, dps=30))
        if backend == "numpy":
            v = float(nk.relu_cross_moment(h, k, 1.0, 1.0, r))
        else:
            v = float(tk.relu_cross_moment(torch.tensor(h, dtype=torch.float64), k, 1.0, 1.0, r))
        worst = max(worst, abs(v / ref - 1.0))
    assert worst <= 1e-12, worst
