"""Mehler's expansion route of the ReLU covariance (nmruntime.relu_pair._cov_mehler)
against the mpmath reference of the definition (issue #13: the bulk of the pairs)."""

from __future__ import annotations

import numpy as np
import torch
from nmgen.derivations.cross_covariance import relu_cross_covariance_ref
from nmgen.derivations.reference import to_float
from nmgen.generated import torch_kernels as TK

from nmruntime import pair_ops as po
from nmruntime import relu_pair as rp


def test_accepted_mehler_values_match_mpmath():
    rng = np.random.default_rng(5)
    n = 4000
    h = torch.tensor(rng.uniform(-6, 6, n))
    k = torch.tensor(rng.uniform(-6, 6, n))
    r = torch.tensor(rng.uniform(-0.8, 0.8, n))
    c, ok = rp._cov_mehler(po.torch_ops(), h, k, r, 256.0, 2.0**-52)
    assert ok.double().mean() > 0.3  # the route takes a good share of this box
    idx = torch.nonzero(ok).squeeze(1)[:: max(1, int(ok.sum()) // 5)][:5]
    for i in idx.tolist():
        want = to_float(relu_cross_covariance_ref(float(h[i]), float(k[i]), 1.0, 1.0, float(r[i])))
        assert abs(float(c[i]) - want) <= 1e-13 * abs(want), (float(h[i]), float(k[i]), float(r[i]))
        got = TK.relu_cross_covariance(h[i : i + 1], k[i : i + 1], 1.0, 1.0, r[i : i + 1])
        assert abs(float(got) - want) <= 1e-13 * abs(want)


def test_mehler_route_rejects_where_it_cannot_converge():
    """Outside |ρ| ≤ 0.8, |h|, |k| ≤ 38.5, |ρ|(h² + k²) ≤ 120 nothing is accepted and every
    value stays finite (float32: the scaled terms must not overflow)."""
    h = torch.tensor([1e4, 0.5, -40.0, 20.0, 0.3, -7.0])
    k = torch.tensor([2e4, 0.5, 0.0, -20.0, 0.2, 0.0])
    r = torch.tensor([-0.5, 0.95, 0.3, 0.5, 0.1, 0.3])
    c, ok = rp._cov_mehler(po.torch_ops(), h, k, r, 32.0, 2.0**-23)
    assert torch.isfinite(c).all()
    assert ok.tolist() == [False, False, False, False, True, True]
