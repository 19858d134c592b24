"""Lemma 4 series kernel: finite value, NaN gradient at small σ (issue #10, reproduced).

The series kernel (derivations/lemma4_series.py, series_kernel.py) belongs to another
helper; these tests record the reproduction and flip to passing (strict xfail) when fixed.
"""

from __future__ import annotations

import pytest
import torch
from nmgen.generated import torch_kernels as TK

CASES = [
    # (terms, dtype, mu1, mu2, sigma1, sigma2, rho): finite value, NaN gradient (measured)
    (50, torch.float64, 1.0, 1.0, 1e-6, 2e-6, -0.5),
    (5, torch.float32, 1.0, 1.0, 1e-6, 2e-6, -0.5),
    (10, torch.float32, 0.0, 0.5, 1e-4, 2e-4, -0.8),
]


@pytest.mark.xfail(strict=True, reason="series kernel: NaN gradient at small σ (issue #10, open)")
@pytest.mark.parametrize("case", CASES, ids=[f"terms{c[0]}-{c[1]}" for c in CASES])
def test_series_gradient_finite_at_small_sigma(case):
    terms, dtype, *vals = case
    args = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in vals]
    value = TK.relu_cross_moment_series(*args, terms)
    assert torch.isfinite(value)
    grads = torch.autograd.grad(value, args, allow_unused=True)
    assert all(g is None or bool(torch.isfinite(g)) for g in grads)
