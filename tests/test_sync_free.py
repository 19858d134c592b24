"""Sync-free, compilable kernels (issue #13, Deliver 1 and 4).

The printed torch kernels have no data-dependent Python control flow; the runtime they call
branches on values only on eager CPU (gathers), and is masked arithmetic when traced by
``torch.compile`` or on an accelerator (``nmruntime.torch_support.sync_free``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from nmgen.generated import torch_kernels as TK

from nmruntime import pair_direct as pd
from nmruntime import relu_pair
from nmruntime.torch_support import force_sync_free
from torchbridge.moments import _pair_blocks_nd, _pair_covariances, _safe_sqrt
from torchbridge.propagate.approx import dvi_relu_moments

D = torch.float64


def _pairs(n: int, seed: int = 0, dtype=D) -> list[torch.Tensor]:
    """Random pairs over the regimes: bulk, tails (|μ/σ| to 12), |ρ| near and at 1."""
    g = torch.Generator().manual_seed(seed)
    m1 = torch.randn(n, generator=g, dtype=D) * 4
    m2 = torch.randn(n, generator=g, dtype=D) * 4
    s1 = torch.rand(n, generator=g, dtype=D) + 0.05
    s2 = torch.rand(n, generator=g, dtype=D) + 0.05
    r = torch.rand(n, generator=g, dtype=D) * 2 - 1
    r[: n // 8] = torch.sign(r[: n // 8]) * (1 - 10 ** -(6 * torch.rand(n // 8, generator=g)))
    r[n // 8 : n // 8 + 4] = torch.tensor([1.0, -1.0, 0.0, 0.99])
    return [v.to(dtype) for v in (m1, m2, s1, s2, r)]


def test_no_value_dependent_python_in_generated_torch_kernels():
    src = Path(TK.__file__).read_text()
    assert not re.search(r"\bbool\(|\.item\(\)|\.any\(\)|\.all\(\)|\.tolist\(\)", src)
    assert not re.search(r"^\s*if .*_rest", src, re.M)


@pytest.mark.parametrize("name", ["relu_cross_covariance", "relu_cross_moment"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sync_free_path_matches_the_gathering_path(name, dtype, monkeypatch):
    """The masked path (compile / accelerators), run on the CPU, gives the eager values.

    Same algorithm and the same elementary functions on both paths: eager CPU's extra long
    Mehler pass (which the masked path skips: its quadrature takes those elements) is switched
    off here, and so is its NumPy quadrature of few float64 elements (``_cov_std_few``: SciPy's
    and NumPy's functions round otherwise, up to ~250 eps apart on these deep tails where each
    path is up to ~1,000 eps from mpmath); they are checked against mpmath in
    tests/test_pair_mehler_long.py and tests/test_pair_routes.py. So are eager CPU's float64
    group 0.925 ≤ |ρ| < 0.99 and its ρ < 0 tail route (the masked path sends those pairs to
    the closed form, Mehler's series and the quadrature: session 22 measured 34 of these
    3,000 pairs more than 16 eps apart, the eager values within 40 eps of mpmath there and the
    masked ones up to 160; tests/test_pair_direct.py checks the new routes against mpmath)."""
    monkeypatch.setattr(relu_pair, "_MEHLER_LONG_TERMS", 0)
    monkeypatch.setattr(relu_pair, "_QUAD_NUMPY_MAX", 0)
    monkeypatch.setattr(pd, "_DIRECT_WIDE64", (pd._DIRECT_GROUPS[-1][0], 80))
    monkeypatch.setattr(pd, "_NEG_TAIL_B", math.inf)
    args = _pairs(3000, dtype=dtype)
    f = getattr(TK, name)
    ref = f(*args)
    with force_sync_free():
        got = f(*args)
    tol = 16 * torch.finfo(dtype).eps  # measured: 8.3 eps (float64), 1.2 eps (float32)
    assert torch.isfinite(got).all()
    assert ((got - ref).abs() <= tol * ref.abs() + 1e-300).all()


def test_sync_free_gradients_are_finite_and_equal():
    args = [v.requires_grad_() for v in _pairs(400, seed=1)]
    g_ref = torch.autograd.grad(TK.relu_cross_covariance(*args).sum(), args)
    with force_sync_free():
        g = torch.autograd.grad(TK.relu_cross_covariance(*args).sum(), args)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def test_relu_cross_moment_compiles_with_fullgraph():
    """Issue bar: torch.compile(fullgraph=True) of relu_cross_moment succeeds (any graph
    break raises); the compiled values equal the eager ones."""
    args = _pairs(256, seed=2)
    cf = torch.compile(TK.relu_cross_moment, fullgraph=True, backend="eager", dynamic=False)
    got = cf(*args, validate=False)
    ref = TK.relu_cross_moment(*args)
    assert torch.allclose(got, ref, rtol=1e-14, atol=0)


def test_dvi_compiles_with_fullgraph():
    """The DVI baseline of `nm bench floor --compiled` ("DVI, torch.compile") traces as one
    graph (its argument checks are eager only: they branched on values and broke the graph);
    the compiled values equal the eager ones."""
    p = 16
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(p, generator=g, dtype=D)
    w = torch.randn(p, 4, generator=g, dtype=D)
    cov = w @ w.T / 4 + 0.05 * torch.eye(p, dtype=D)
    torch._dynamo.reset()
    got = torch.compile(dvi_relu_moments, fullgraph=True, backend="eager")(mean, cov)
    ref = dvi_relu_moments(mean, cov)
    for a, b in zip(got, ref, strict=True):
        assert torch.allclose(a, b, rtol=1e-14, atol=0)


def test_pair_loop_has_no_graph_break():
    """Issue bar: relu_moments' pair loop (one block of ``_pair_covariances``, exact method)
    traces as one graph: torch._dynamo.explain counts 0 graph breaks."""
    p = 24
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(p, generator=g, dtype=D)
    w = torch.randn(p, 4, generator=g, dtype=D)
    cov = w @ w.T / 4 + 0.05 * torch.eye(p, dtype=D)
    sigma = _safe_sqrt(cov.diagonal())
    rmean, _ = TK.relu_mean_variance(mean, sigma)
    i, j, nd = next(_pair_blocks_nd(p, 1 << 20, mean.device))

    def block(mean, cov, sigma, rmean):
        return _pair_covariances(mean, cov.flatten(), sigma, rmean, "exact", 0, i, j, nd)

    explained = torch._dynamo.explain(block)(mean, cov, sigma, rmean)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got = torch.compile(block, fullgraph=True, backend="eager")(mean, cov, sigma, rmean)
    assert torch.allclose(got, block(mean, cov, sigma, rmean), rtol=1e-14, atol=0)
