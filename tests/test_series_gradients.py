"""Lemma 4 series kernel: finite gradients wherever the value is finite (issue #10).

At small σ, exp(−x²) and exp(−b²) of the series' recurrences underflow to 0 while the
products of their multipliers overflow; 0·inf made the gradient NaN (61 of 360 probed cases
before the fix in ``derivations/lemma4_series._tail_program``). The probe grid below is the
one that found them; the gradient is also checked against central differences where the
function is smooth at a representable scale.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from nmgen.generated import torch_kernels as TK

POINTS = [(1.0, 1.0, -0.5), (0.0, 0.5, -0.8), (-0.3, 0.7, 0.4), (0.2, -0.1, 0.9), (1.0, -2.0, -0.3)]
SIGMAS = [10.0**-e for e in range(1, 9)]
TERMS = [1, 5, 10, 20, 50]


def _f64(values):
    return [torch.tensor(v, dtype=torch.float64) for v in values]


def _grads(terms, dtype, m1, m2, s1, s2, r):
    args = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in (m1, m2, s1, s2, r)]
    value = TK.relu_cross_moment_series(*args, terms)
    return value, torch.autograd.grad(value, args, allow_unused=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_series_gradient_finite_where_value_finite(dtype):
    bad = []
    for terms, s, (m1, m2, r) in itertools.product(TERMS, SIGMAS, POINTS):
        value, grads = _grads(terms, dtype, m1, m2, s, 2 * s, r)
        assert torch.isfinite(value), (terms, s, m1, m2, r)
        if not all(g is None or bool(torch.isfinite(g)) for g in grads):
            bad.append((terms, s, m1, m2, r))
    assert not bad, f"{len(bad)} NaN/inf gradients, e.g. {bad[:3]}"


@pytest.mark.parametrize("terms", [5, 50])
def test_series_gradient_matches_central_differences(terms):
    x = (0.3, -0.2, 0.5, 0.7, -0.4)
    _, grads = _grads(terms, torch.float64, *x)
    for i, g in enumerate(grads):
        step = 1e-6
        up, dn = list(x), list(x)
        up[i] += step
        dn[i] -= step
        fd = (
            TK.relu_cross_moment_series(*_f64(up), terms)
            - TK.relu_cross_moment_series(*_f64(dn), terms)
        ) / (2 * step)
        assert abs(float(g) - float(fd)) <= 1e-7 * max(1.0, abs(float(fd))), (
            i,
            float(g),
            float(fd),
        )
